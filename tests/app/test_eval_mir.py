"""MIR: the streaming, exact computation against (a) a float64 Fréchet distance with scipy.linalg.sqrtm and
(b) a re-implementation of the published procedure (all rows in memory, text-centric scale, 3-sigma rows
replaced by the per-dimension median, then the distance), on the same inputs."""

import numpy as np
import pytest
import torch
from helpers import frechet_sqrtm, published_mir

from regap_fast import modality_integration_rate
from regap_fast.eval.mir import MIRAccumulator, _keys_to_float, _ordered_keys, trace_sqrt_product

scipy_linalg = pytest.importorskip("scipy.linalg")



def states(n_image, n_text, d, layers, seed, outliers=0):
    g = torch.Generator().manual_seed(seed)
    image, text = [], []
    for layer in range(layers):
        x = torch.randn(n_image, d, generator=g) * (1 + layer) + 0.5
        y = torch.randn(n_text, d, generator=g) @ torch.randn(d, d, generator=g) / d ** 0.5 + 0.1 * layer
        for rows in (x, y)[:2 if outliers else 0]:
            rows[torch.randperm(rows.shape[0], generator=g)[:outliers]] *= 25  # far beyond 3 sigma
        image.append(x)
        text.append(y)
    return image, text


def test_ordered_keys_round_trip_and_order():
    x = torch.tensor([-3.5, -0.0, 0.0, 1e-30, -1e-30, 2.0, float("inf"), -float("inf"), 7.25])
    keys = _ordered_keys(x)
    assert torch.equal(_keys_to_float(keys), x)
    assert torch.equal(keys.argsort(stable=True), x.argsort(stable=True)) or \
        torch.equal(x[keys.argsort()], x.sort().values)


@pytest.mark.parametrize("rows_b", [40, 10])  # B positive definite (Cholesky), singular (A's square root)
def test_trace_sqrt_product_equals_sqrtm(rows_b):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 24, generator=g, dtype=torch.float64), torch.randn(rows_b, 24, generator=g,
                                                                               dtype=torch.float64)
    s_a, s_b = a.T @ a / 39, b.T @ b / (rows_b - 1)
    expected = np.trace(scipy_linalg.sqrtm(s_a.numpy() @ s_b.numpy()).real)
    # sqrtm itself is less accurate on a singular product (the square root of a zero eigenvalue)
    assert trace_sqrt_product(s_a, s_b) == pytest.approx(expected, rel=1e-9 if rows_b > 24 else 1e-6)


@pytest.mark.parametrize("n_image,n_text", [(300, 200), (20, 50), (300, 20)])  # 20 < D: a singular covariance
def test_no_outliers_matches_float64_reference(n_image, n_text):
    image, text = states(n_image, n_text, 32, 3, seed=2)
    mir, per_layer = modality_integration_rate(image, text, chunk_rows=37)
    ref_mir, ref_layers = published_mir(image, text)
    for got, ref in zip(per_layer, ref_layers):
        assert got == pytest.approx(ref, rel=1e-6)
    assert mir == pytest.approx(ref_mir, rel=1e-6)


@pytest.mark.parametrize("n_image,n_text", [(401, 250), (400, 251)])  # odd and even counts: the lower median
def test_outlier_replacement_matches_published_procedure(n_image, n_text):
    image, text = states(n_image, n_text, 16, 2, seed=3, outliers=5)
    acc = MIRAccumulator(2)
    while acc.passes_needed:
        for layer in range(2):
            for s in range(0, max(n_image, n_text), 64):
                acc.add(layer, image[layer][s:s + 64], text[layer][s:s + 64])
        acc.next_pass()
    result = acc.result()
    assert all(k == (5, 5) for k in result.outliers)  # the rule fired on both sets
    ref_mir, ref_layers = published_mir(image, text)
    for got, ref in zip(result.per_layer, ref_layers):
        assert got == pytest.approx(ref, rel=1e-6)
    assert result.mir == pytest.approx(ref_mir, rel=1e-6)
    # the exact median the passes found is torch.median's
    image_set = acc.sets[0][0]
    assert torch.equal(image_set.median, image[0].median(dim=0).values)


def test_outliers_change_the_result():
    """The replacement matters: without it the distance differs (so the test above can fail)."""
    image, text = states(200, 200, 8, 1, seed=4, outliers=4)
    _, with_rule = modality_integration_rate(image, text)
    assert with_rule[0] != pytest.approx(frechet_sqrtm(image[0], text[0]) / float(text[0].norm(dim=-1).mean()) ** 2,
                                         rel=1e-3)


def test_scale_invariance_and_chunking():
    image, text = states(100, 80, 12, 2, seed=5)
    mir, per_layer = modality_integration_rate(image, text, chunk_rows=None)
    mir2, per_layer2 = modality_integration_rate([3 * x for x in image], [3 * y for y in text], chunk_rows=7)
    assert mir2 == pytest.approx(mir, rel=1e-7)  # 3 * x rounds in float32
    assert per_layer2 == pytest.approx(per_layer, rel=1e-7)


def test_bad_inputs_are_one_line():
    with pytest.raises(ValueError, match="layers"):
        modality_integration_rate([torch.zeros(3, 2)], [])
    with pytest.raises(ValueError, match="at least 2 rows"):
        modality_integration_rate([torch.zeros(1, 2)], [torch.ones(4, 2)])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        modality_integration_rate([torch.zeros(3)], [torch.ones(4, 2)])
