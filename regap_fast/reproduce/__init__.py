"""``regap-fast reproduce``: the paper's safety claim in miniature, as the study pre-registered in
docs/reproduce/PLAN.md, end to end through the library's own parts.

    regap-fast reproduce --study --out DIR          # the whole design: 8 stage-2 arms, 4 lambdas, 16 seeds
    regap-fast reproduce --out DIR                  # the default subset: 4 arms, lambda 0 vs 0.2, 8 seeds
    regap-fast reproduce --quick --out DIR          # the same four arms, one seed
    regap-fast reproduce --timing-probe --out DIR   # every arm once (seed 900): the study's projected time
    regap-fast reproduce --select-stage2 --out DIR --seeds 6 --first-seed 100   # how stage 2 was first chosen

A toy language in words (``language.py``) and a tokenizer trained on it; per data seed a tiny Llama
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
