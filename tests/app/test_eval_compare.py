"""compare: gap and unsafe rate side by side from the files the other two commands write, and their
correlation against hand values."""

import csv
import json
import math

import pytest

from regap_fast.eval import compare, write_compare
from regap_fast.eval.compare import format_compare

pytest.importorskip("scipy")


def write_run(d, gap, unsafe, n=100, judge=None, centroid=None):
    """The parts of gap.json and safety.json that compare reads (written as the commands write them)."""
    d.mkdir(parents=True)
    (d / "gap.json").write_text(json.dumps({"n_pairs": 50, "gap": {"mean": gap},
                                            "centroid_distance": centroid if centroid is not None else gap / 2}))
    rate = lambda k: {"n": n, "unsafe": k, "rate": k / n, "ci95": [k / n - 0.05, k / n + 0.05]}
    report = {"judge": judge or {"name": "refusal", "mode": "substring"}, "n_prompts": n,
              "unsafe_rate": {"none": rate(unsafe // 3), "white": rate(unsafe)},
              "summary": {"text_only": rate(unsafe // 3), "image": rate(unsafe)}}
    (d / "safety.json").write_text(json.dumps(report))
    return d


def test_compare_side_by_side_and_correlation(tmp_path):
    gaps, unsafe = [2.0, 1.5, 1.0, 0.5], [60, 45, 50, 20]
    dirs = [write_run(tmp_path / f"lambda{i}", g, u) for i, (g, u) in enumerate(zip(gaps, unsafe))]
    result = compare(dirs)
    assert [r["run"] for r in result["runs"]] == ["lambda0", "lambda1", "lambda2", "lambda3"]
    assert [r["gap"] for r in result["runs"]] == gaps
    assert [r["unsafe_rate"] for r in result["runs"]] == [0.6, 0.45, 0.5, 0.2]
    assert result["judge"] == "refusal"
    # by hand: x = gaps, y = rates
    x, y = gaps, [0.6, 0.45, 0.5, 0.2]
    mx, my = sum(x) / 4, sum(y) / 4
    r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert result["correlation"]["pearson"]["r"] == pytest.approx(r)
    # ranks of y: 4, 2, 3, 1 against 4, 3, 2, 1: d^2 = 0 + 1 + 1 + 0 -> rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert result["correlation"]["spearman"]["rho"] == pytest.approx(0.8)

    text_only = compare(dirs, safety_metric="none", gap_metric="centroid_distance")
    assert [r["unsafe_rate"] for r in text_only["runs"]] == [0.2, 0.15, 0.16, 0.06]
    assert [r["gap"] for r in text_only["runs"]] == [1.0, 0.75, 0.5, 0.25]

    write_compare(result, tmp_path / "cmp")
    rows = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").read_text().splitlines()))
    assert [float(r["unsafe_rate"]) for r in rows] == [0.6, 0.45, 0.5, 0.2]
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text()) == result
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert "Spearman rho = 0.800" in format_compare(result)


def test_compare_few_runs_and_same_names(tmp_path):
    a = write_run(tmp_path / "a" / "ckpt", 1.0, 10)
    b = write_run(tmp_path / "b" / "ckpt", 2.0, 20)
    result = compare([a, b])
    assert result["correlation"]["pearson"] is None and "at least 3" in result["correlation"]["note"]
    assert [r["run"] for r in result["runs"]] == [str(a), str(b)]  # same leaf names: the paths
    write_compare(result, tmp_path / "out")  # the plot copes with no correlation
    assert "needs at least 3 points" in format_compare(result)


def test_compare_errors(tmp_path):
    good = write_run(tmp_path / "good", 1.0, 10)
    no_gap = tmp_path / "no_gap"
    no_gap.mkdir()
    with pytest.raises(FileNotFoundError, match="run `regap-fast gap MODEL ... --out"):
        compare([good, no_gap])
    other = write_run(tmp_path / "other", 2.0, 20, judge={"name": "guard", "model": "/x"})
    with pytest.raises(ValueError, match="different judges"):
        compare([good, other])
    with pytest.raises(ValueError, match="no unsafe rate for 'noise'.*image, none, white"):
        compare([good], safety_metric="noise")
    with pytest.raises(ValueError, match="unknown gap metric"):
        compare([good], gap_metric="median")
    (good / "gap.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        compare([good])


def test_compare_on_mir(tmp_path):
    """--gap-metric mir reads gap.json's MIR; a run measured without it is one clear error, and so is asking
    for the L2 gap of a run measured with MIR alone."""
    dirs = [write_run(tmp_path / f"r{i}", g, u) for i, (g, u) in enumerate(zip([1.0, 2.0, 3.0], [10, 30, 20]))]
    for d, value in zip(dirs, [0.4, 0.9, 1.3]):
        gap = json.loads((d / "gap.json").read_text())
        gap["mir"] = {"value": value, "per_layer": []}
        (d / "gap.json").write_text(json.dumps(gap))
    result = compare(dirs, gap_metric="mir")
    assert [r["gap"] for r in result["runs"]] == [0.4, 0.9, 1.3]
    assert result["correlation"]["spearman"]["rho"] == pytest.approx(0.5)
    assert "mir" in format_compare(result).splitlines()[0]
    plain = write_run(tmp_path / "plain", 1.0, 10)
    with pytest.raises(ValueError, match="has no MIR: measure it with `regap-fast gap MODEL ... --metric mir`"):
        compare([dirs[0], plain], gap_metric="mir")
    only_mir = tmp_path / "only"
    only_mir.mkdir()
    (only_mir / "gap.json").write_text(json.dumps({"n_pairs": 5, "mir": {"value": 1.0}}))
    (only_mir / "safety.json").write_text((dirs[0] / "safety.json").read_text())
    with pytest.raises(ValueError, match="has only MIR"):
        compare([dirs[0], only_mir])
