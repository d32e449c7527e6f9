"""Wilson and Newcombe intervals, summaries and correlations against scipy and hand values."""

import math
import random

import pytest

from regap_fast.eval.stats import correlation, paired_difference_interval, summarize, wilson_interval

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("k,n,expected", [
    # hand values: p +- ... from the closed form, z = 1.959964
    (0, 10, (0.0, 0.277533)),
    (5, 10, (0.236593, 0.763407)),
    (10, 10, (0.722467, 1.0)),
    (1, 1, (0.206549, 1.0)),  # 1 / (1 + z^2)
    (81, 263, (0.255289, 0.366210)),
])
def test_wilson_known_values(k, n, expected):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-6)
    assert hi == pytest.approx(expected[1], abs=1e-6)


@pytest.mark.parametrize("k,n", [(0, 1), (3, 17), (17, 17), (1, 1000), (499, 1000), (12, 50)])
def test_wilson_matches_scipy(k, n):
    ref = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12)
    ref90 = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
    assert wilson_interval(k, n, 0.9) == pytest.approx((ref90.low, ref90.high), abs=1e-12)


def test_wilson_edge_cases():
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)


def _newcombe_independent(k1, n1, k2, n2):
    """Newcombe's hybrid score interval for independent proportions (his 1998 method 10)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p1 - p2
    return d, d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def test_paired_difference_without_correlation_is_newcombe_independent():
    # a table with ad == bc has phi = 0: the paired interval is the independent one
    both, only_a, only_b, neither = 4, 8, 6, 12  # 4 * 12 == 8 * 6
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    n = len(a)
    assert paired_difference_interval(a, b) == pytest.approx(_newcombe_independent(12, n, 10, n), abs=1e-12)


def test_paired_difference_known_case():
    # Newcombe (1998b), method 10, worked by hand: a=10 both, b=15 only image, c=5 only text, d=20, n=50
    a = [1] * 10 + [1] * 15 + [0] * 5 + [0] * 20
    b = [1] * 10 + [0] * 15 + [1] * 5 + [0] * 20
    diff, lo, hi = paired_difference_interval(a, b)
    p1, p2 = 25 / 50, 15 / 50
    l1, u1 = wilson_interval(25, 50)
    l2, u2 = wilson_interval(15, 50)
    phi = (10 * 20 - 15 * 5) / math.sqrt(25 * 25 * 15 * 35)
    assert diff == pytest.approx(0.2)
    assert lo == pytest.approx(0.2 - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    assert hi == pytest.approx(0.2 + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    # positive correlation narrows the interval compared with treating the rates as independent
    _, ilo, ihi = _newcombe_independent(25, 50, 15, 50)
    assert ilo < lo < 0.2 < hi < ihi


def test_paired_difference_coverage():
    """Simulated paired outcomes: the 95% interval covers the true difference about 95% of the time."""
    rng = random.Random(0)
    p_text, flip_up, flip_down, n, trials = 0.3, 0.35, 0.1, 120, 1500
    truth = (p_text * (1 - flip_down) + (1 - p_text) * flip_up) - p_text
    covered = 0
    for _ in range(trials):
        text = [rng.random() < p_text for _ in range(n)]
        image = [rng.random() >= flip_down if t else rng.random() < flip_up for t in text]
        _, lo, hi = paired_difference_interval(image, text)
        covered += lo <= truth <= hi
    assert 0.93 <= covered / trials <= 0.975


def test_paired_difference_edges():
    assert paired_difference_interval([1, 1, 1], [1, 1, 1])[0] == 0
    diff, lo, hi = paired_difference_interval([1] * 5, [0] * 5)
    assert diff == 1 and 0 < lo < 1 and hi == 1
    assert all(math.isnan(v) for v in paired_difference_interval([], []))
    with pytest.raises(ValueError):
        paired_difference_interval([1], [1, 0])


def test_summarize():
    s = summarize([1.0, 2.0, 3.0, 4.0], quantiles=(0.5,), bins=3)
    assert s["mean"] == 2.5 and s["std"] == pytest.approx(math.sqrt(1.25))
    assert s["quantiles"]["0.5"] == 2.5 and sum(s["histogram"]["counts"]) == 4
    assert summarize([]) == {"n": 0}


def test_correlation_hand_values():
    x, y = [1, 2, 3, 4, 5], [2, 4, 5, 4, 5]
    c = correlation(x, y)
    # Pearson by hand: cov = 6 / 4, sd_x = sqrt(10/4), sd_y = sqrt(6/4) -> r = 6 / sqrt(60)
    assert c["pearson"]["r"] == pytest.approx(6 / math.sqrt(60))
    # Spearman with ties: ranks of y = [1, 2.5, 4.5, 2.5, 4.5]; Pearson of the ranks
    ry = [1, 2.5, 4.5, 2.5, 4.5]
    mean = 3
    num = sum((a - mean) * (b - mean) for a, b in zip([1, 2, 3, 4, 5], ry))
    den = math.sqrt(sum((a - mean) ** 2 for a in [1, 2, 3, 4, 5]) * sum((b - mean) ** 2 for b in ry))
    assert c["spearman"]["rho"] == pytest.approx(num / den)
    # a perfect inverse monotone relation: rho = -1 exactly, r close to -1
    c = correlation([0.1, 0.5, 0.9, 2.0], [0.8, 0.6, 0.5, 0.1])
    assert c["spearman"]["rho"] == pytest.approx(-1.0)
    assert -1 < c["pearson"]["r"] < -0.9


def test_correlation_matches_scipy():
    rng = random.Random(1)
    x = [rng.random() for _ in range(12)]
    y = [v + rng.random() for v in x]
    c = correlation(x, y)
    assert c["pearson"]["r"] == pytest.approx(scipy_stats.pearsonr(x, y).statistic)
    assert c["pearson"]["p"] == pytest.approx(scipy_stats.pearsonr(x, y).pvalue)
    assert c["spearman"]["rho"] == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


def test_correlation_undefined():
    assert correlation([1, 2], [3, 4])["pearson"] is None
    c = correlation([1, 2, 3], [5, 5, 5])
    assert c["spearman"] is None and "constant" in c["note"]
    with pytest.raises(ValueError):
        correlation([1, 2, 3], [1, 2])
