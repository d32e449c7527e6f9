"""safety-eval: generation cached as it comes, resumed after an interruption without repeating an
answer, and the report (rates, Wilson intervals, paired degradation) built from the verdicts."""

import csv
import json

import pytest
import torch

from regap_fast.eval import Prompt, RefusalJudge, evaluate
from regap_fast.eval.safety import format_report
from regap_fast.eval.stats import paired_difference_interval, wilson_interval


class Crash(Exception):
    pass


class FakeVLM:
    """``generate`` with the model API's signature: refuses without an image, complies with one."""

    image_size = 32

    def __init__(self, crash_at_call=None):
        self.calls, self.crash_at_call = [], crash_at_call

    def generate(self, prompts, images, *, max_new_tokens=64, do_sample=False, temperature=1.0, batch_size=8):
        assert len(prompts) == len(images) <= batch_size
        if self.crash_at_call is not None and len(self.calls) == self.crash_at_call:
            raise Crash
        self.calls.append(list(prompts))
        for im in images:
            assert im is None or im.size == (self.image_size, self.image_size)
        return ["I'm sorry, I cannot." if im is None else f"Sure, here is: {p}" for p, im in zip(prompts, images)]

    @property
    def generated(self):
        return [p for call in self.calls for p in call]


def prompts(n=5):
    return [Prompt(f"p{i}", f"request number {i}", "cat_a" if i % 2 else "cat_b") for i in range(n)]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_interrupted_run_resumes_without_repeating(tmp_path):
    conditions = ["none", "white", "noise"]
    vlm = FakeVLM(crash_at_call=4)  # 5 prompts x 3 conditions, batches of 2: 3 + 3 + 3 calls
    with pytest.raises(Crash):
        evaluate(vlm, prompts(), conditions, out_dir=tmp_path, batch_size=2, progress=False)
    done = lines(tmp_path / "responses.jsonl")
    assert len(done) == 5 + 2  # "none" (3 calls: 2 + 2 + 1), then one batch of "white" before the crash
    assert not (tmp_path / "safety.json").exists()

    resumed = FakeVLM()
    report = evaluate(resumed, prompts(), conditions, out_dir=tmp_path, batch_size=2, progress=False)
    # the 7 finished answers were not asked for again; the other 8 were, each once
    assert sorted(resumed.generated) == sorted([f"request number {i}" for i in range(2, 5)] * 1 +
                                               [f"request number {i}" for i in range(5)])
    assert len(resumed.calls) == 2 + 3  # white: 3 left -> 2 batches; noise: 5 -> 3
    records = lines(tmp_path / "responses.jsonl")
    assert len(records) == 15 and len({r["key"] for r in records}) == 15
    assert records[:7] == done  # nothing rewritten
    assert report["unsafe_rate"]["none"]["n"] == 5

    again = FakeVLM()
    assert evaluate(again, prompts(), conditions, out_dir=tmp_path, batch_size=2, progress=False) == report
    assert again.calls == []  # all cached, verdicts too
    assert len(lines(tmp_path / "verdicts.jsonl")) == 15


def test_partial_last_line_is_dropped_and_recomputed(tmp_path):
    evaluate(FakeVLM(), prompts(3), ["none"], out_dir=tmp_path, progress=False)
    path = tmp_path / "responses.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # a kill in the middle of writing the last record
    vlm = FakeVLM()
    with pytest.warns(UserWarning, match="incomplete last line"):
        evaluate(vlm, prompts(3), ["none"], out_dir=tmp_path, progress=False)
    assert vlm.generated == ["request number 2"]
    assert len(lines(path)) == 3  # valid JSONL again


def test_changed_settings_or_prompts(tmp_path):
    evaluate(FakeVLM(), prompts(2), ["none"], out_dir=tmp_path, progress=False, max_new_tokens=16)
    vlm = FakeVLM()
    evaluate(vlm, prompts(2), ["none"], out_dir=tmp_path, progress=False, max_new_tokens=32)
    assert len(vlm.generated) == 2  # other generation settings: other answers
    vlm = FakeVLM()
    evaluate(vlm, prompts(2), ["none"], out_dir=tmp_path, progress=False, max_new_tokens=16, model_name="other")
    assert len(vlm.generated) == 2  # another model: other answers
    changed = [Prompt("p0", "a different request"), Prompt("p1", "request number 1")]
    with pytest.raises(ValueError, match="prompt 'p0' under 'none' to a different request"):
        evaluate(FakeVLM(), changed, ["none"], out_dir=tmp_path, progress=False, max_new_tokens=16)
    # the typographic condition sends a fixed text: the request it renders is checked too
    evaluate(FakeVLM(), prompts(2), ["typo"], out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="prompt 'p0' under 'typo' to a different request"):
        evaluate(FakeVLM(), changed, ["typo"], out_dir=tmp_path, progress=False)


def test_report(tmp_path):
    report = evaluate(FakeVLM(), prompts(5), "none,white,typo", RefusalJudge(), out_dir=tmp_path, batch_size=4,
                      progress=False)
    rates = report["unsafe_rate"]
    assert (rates["none"]["unsafe"], rates["none"]["n"]) == (0, 5)
    assert (rates["white"]["unsafe"], rates["white"]["rate"]) == (5, 1.0)
    assert rates["white"]["ci95"] == pytest.approx(list(wilson_interval(5, 5)))
    assert rates["none"]["labels"] == {"refusal": 5} and rates["white"]["labels"] == {"no_refusal": 5}
    deg = report["degradation"]["white"]
    assert deg["diff"] == 1.0 and deg["n_pairs"] == 5
    assert deg["ci95"] == pytest.approx(list(paired_difference_interval([1] * 5, [0] * 5)[1:]))
    assert "none" not in report["degradation"]
    # per category: cat_a = p1, p3; cat_b = p0, p2, p4
    assert report["by_category"]["cat_a"]["white"]["n"] == 2
    assert report["by_category"]["cat_b"]["none"]["n"] == 3
    assert report["degradation_by_category"]["cat_b"]["typo"]["n_pairs"] == 3
    assert report["judge"]["name"] == "refusal" and report["settings"]["max_new_tokens"] == 128
    assert report["summary"]["image"]["n"] == 10 and report["summary"]["image"]["rate"] == 1.0
    # the typographic condition sends FigStep's prompt, and the judge reads the original request
    typo = [r for r in lines(tmp_path / "responses.jsonl") if r["condition"] == "typo"]
    assert all(r["text"].startswith("The image shows a list numbered 1, 2, and 3") for r in typo)
    assert typo[0]["request"] == "request number 0" and typo[0]["image"].startswith("typographic 32x32")

    assert json.loads((tmp_path / "safety.json").read_text()) == report
    rows = list(csv.DictReader((tmp_path / "safety.csv").read_text().splitlines()))
    assert len(rows) == 3 * 3  # (all, cat_a, cat_b) x 3 conditions
    white = next(r for r in rows if r["condition"] == "white" and r["category"] == "all")
    assert float(white["unsafe_rate"]) == 1.0 and float(white["degradation"]) == 1.0
    assert (tmp_path / "safety.png").stat().st_size > 1000
    text = format_report(report)
    assert "white" in text and "+100.0%" in text


def test_custom_judge_and_judge_resume(tmp_path):
    class Flaky:
        """Only ``judge``: unsafe for the even-numbered requests; crashes on its second call."""
        name = "flaky"

        def __init__(self, crash):
            self.calls, self.crash = 0, crash

        def judge(self, prompts, responses):
            self.calls += 1
            if self.crash and self.calls == 2:
                raise Crash
            return [int(p[-1]) % 2 == 0 for p in prompts]

    with pytest.raises(Crash):
        evaluate(FakeVLM(), prompts(4), ["none", "black"], Flaky(True), out_dir=tmp_path, progress=False,
                 judge_batch_size=3)
    judge = Flaky(False)
    vlm = FakeVLM()
    report = evaluate(vlm, prompts(4), ["none", "black"], judge, out_dir=tmp_path, progress=False,
                      judge_batch_size=3)
    assert vlm.calls == [] and judge.calls == 2  # 8 responses, 3 judged before the crash: 5 left = 2 calls
    assert report["judge"] == {"name": "flaky"}
    assert report["unsafe_rate"]["none"]["labels"] == {"unsafe": 2, "safe": 2}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        evaluate(FakeVLM(), [], out_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown condition"):
        evaluate(FakeVLM(), prompts(1), "none,benchmark:SD", out_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# the real model class (tiny, random weights)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vlm():
    from regap_fast.model import ModelConfig, VisionLanguageModel

    torch.manual_seed(0)
    return VisionLanguageModel.from_config(ModelConfig()).eval()


@pytest.mark.slow
def test_real_model_resume_gives_the_uninterrupted_answers(tiny_vlm, tmp_path):
    """Batched greedy generation with the real model, interrupted and resumed, ends with exactly the
    answers of a run that was never interrupted, each generated once."""
    ps = [Prompt("a", "how do i build a dangerous thing"), Prompt("b", "tell me"),
          Prompt("c", "a much longer request that needs more tokens than the others do")]
    conditions = ["none", "white", "noise", "typo"]
    kwargs = {"max_new_tokens": 5, "batch_size": 2, "progress": False}
    evaluate(tiny_vlm, ps, conditions, out_dir=tmp_path / "straight", **kwargs)

    calls, crash_at = [], [3]
    real_generate = tiny_vlm.generate

    def counted(prompts, images, **kw):
        if len(calls) in crash_at:
            raise Crash
        calls.append(len(prompts))
        return real_generate(prompts, images, **kw)

    tiny_vlm.generate = counted
    try:
        with pytest.raises(Crash):
            evaluate(tiny_vlm, ps, conditions, out_dir=tmp_path / "resumed", **kwargs)
        assert len(lines(tmp_path / "resumed" / "responses.jsonl")) == 5  # none: 2 + 1, white: 2
        calls.clear()
        crash_at.clear()
        evaluate(tiny_vlm, ps, conditions, out_dir=tmp_path / "resumed", **kwargs)
    finally:
        del tiny_vlm.generate
    assert sum(calls) == 12 - 5  # only the missing answers
    straight = {r["key"]: r["response"] for r in lines(tmp_path / "straight" / "responses.jsonl")}
    resumed = {r["key"]: r["response"] for r in lines(tmp_path / "resumed" / "responses.jsonl")}
    assert resumed == straight and len(straight) == 12
    assert any(straight.values())  # the model did produce text
