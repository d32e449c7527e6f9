"""``regap-fast reproduce``: the paper's safety claim in miniature, as the studies pre-registered in
docs/reproduce/PLAN-v3.md (the v2 toy, the default) and docs/reproduce/PLAN.md (the v1 toy, ``--toy v1``),
end to end through the library's own parts.

    regap-fast reproduce --study --out DIR          # PLAN-v3's study: 4 arms, lambda 0 vs 0.2, 24 pairs
    regap-fast reproduce --out DIR                  # its default subset: data seed 0, 8 seeds
    regap-fast reproduce --quick --out DIR          # the same four arms, one seed
    regap-fast reproduce --toy v1 --study --out DIR # the v1 study: 8 stage-2 arms, 4 lambdas, 16 seeds

The v2 toy: ``language2.py`` (private recipes), ``pipeline2.py`` (the base LM, its shallow alignment),
``gates.py`` (G1-G4), ``schedule2.py``, ``measure2.py``, ``judge2.py``, ``dose.py``, ``report2.py``. The v1
toy: a toy language in words (``language.py``) and a tokenizer trained on it; per data seed a tiny Llama
pretrained on it text only (the "safety-tuned LLM"); per (data seed, seed, lambda) one stage-1 model
(REGAP weight lambda; 0 is the baseline), from which every arm's stage 2 starts (``pipeline.py``,
``schedule.py``); every stage-1 and final model measured (``measure.py``: the three-way judge of
``judge.py`` and ``RefusalJudge`` on the same answers, gaps per image condition and LM layer,
benign requests). The report (``report.py`` computes, ``markdown.py`` prints, ``figures.py`` draws,
``answers.py`` samples the answers, ``checks.py`` the implementation checks): ``DIR/report.md``,
``DIR/summary.json``, figures and answer samples. The command line is ``cli.py``; this module only
hands its names on. See the README's reproduction section.
"""

from .cli import add_arguments, run, write_outputs

__all__ = ["add_arguments", "run", "write_outputs"]
