"""MIR (Modality Integration Rate; Huang et al. 2024, arXiv 2410.07167), exact and with memory flat in N.

The published procedure (``shikiw/Modality-Integration-Rate``, ``mir.py`` and ``mir_util.py``; read, not
copied) for each LLM layer l >= 1 (the hidden states after decoder layer l; the input embeddings are skipped):

1. stack the image-token rows ``X`` and the text-token rows ``Y`` of all pairs (``[N_v, D]``, ``[N_t, D]``);
2. text-centric normalisation: scale both by ``c = 1 / mean_i ||Y_i||``;
3. in each of the two sets on its own, the rows whose norm is more than 3 standard deviations (unbiased)
   from the median norm (``torch.median``: the lower median) are replaced by the per-dimension lower median
   of the set's rows (outliers included);
4. the Fréchet distance ``||mu_v - mu_t||^2 + Tr(S_v) + Tr(S_t) - 2 Tr((S_v S_t)^{1/2})`` with unbiased
   covariances;

and MIR = log10 of the sum over layers. The reference keeps every row of every layer in memory and takes
the square root with ``scipy.linalg.sqrtm`` ("accurate") or 5 Newton–Schulz steps ("fast", inexact).

What this module does instead, and why it equals the above:

* Scaling commutes with everything: the outlier rule compares norms with norms (scale-free), the lower
  median of scaled values is the scaled lower median, and the Fréchet distance of ``cX, cY`` is ``c^2``
  times that of ``X, Y``. So the statistics are gathered on the unscaled rows and the distance multiplied by
  ``c^2`` at the end; ``c`` needs only the text rows' norms.
* Pass 1 (``MIRAccumulator.add`` while ``pass_index == 0``): per set, the row count, the fp64 sum and the
  fp64 ``D x D`` sum of outer products (around a shift, the first rows' mean, against cancellation), and
  every row's L2 norm (one scalar per row: the outlier rule needs their median and std).
* After it the outliers of each set are known by their position in the stream. If a set has none, its
  mean and covariance follow from the sums. If it has ``k`` outliers, the rows themselves are gone, so
  further passes over the same rows in the same order follow (``passes_needed``): they subtract the
  outliers' sums and outer products (found by position) and find the exact per-dimension lower median by a
  radix select on the float32 values' order-preserving bit patterns, 8 bits a pass (4 passes; a
  ``[D, 256]`` histogram per set, memory independent of N). The outliers are then put back as ``k``
  copies of the median: ``sum += k m``, ``outer += k m m^T``.
* ``Tr((S_v S_t)^{1/2})`` exactly: ``S_v S_t`` has the eigenvalues of the symmetric PSD matrix
  ``L^T S_v L`` (``S_t = L L^T``, Cholesky) or, when ``S_t`` is singular, of ``S_v^{1/2} S_t S_v^{1/2}``;
  the trace is the sum of the square roots of that matrix's eigenvalues (symmetric eigendecompositions in
  fp64, on the device the statistics live on: the GPU when present).

The median is taken of the rows cast to float32, as the reference casts them (``.float()``); a row's
outlier test uses its fp64 norm (the reference's fp32 norms can differ only for a row within rounding of
the 3-sigma boundary). The reference computes in float32; this module in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

OUTLIER_SIGMAS = 3.0
RADIX_BITS, RADIX_PASSES = 8, 4  # 4 x 8 = the 32 bits of a float32


def _ordered_keys(x):
    """int64 keys of float32 values whose order is the values' order (the usual sign-flip trick)."""
    import torch

    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    negative = bits >= 0x80000000
    return torch.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def _keys_to_float(keys):
    import torch

    positive = keys >= 0x80000000
    bits = torch.where(positive, keys & 0x7FFFFFFF, keys ^ 0xFFFFFFFF)
    bits = torch.where(bits >= 0x80000000, bits - (1 << 32), bits)  # back into int32's range
    return bits.to(torch.int32).view(torch.float32)


class _RowSet:
    """The streaming statistics of one set of rows (one modality at one layer)."""

    def __init__(self):
        self.n = 0
        self.shift = self.sum = self.outer = None  # fp64: sum(x - shift), sum((x - shift)(x - shift)^T)
        self.norms = []  # one fp64 tensor of row norms per batch
        self.outliers = None  # sorted row positions, after pass 1
        self.median = None  # the per-dimension lower median (float32 values), when there are outliers
        self._prefix = self._rank = self._hist = None
        self._seen = 0  # rows of the current later pass

    # pass 1 -------------------------------------------------------------------------------------------
    def observe(self, rows) -> None:
        import torch

        if rows.shape[0] == 0:
            return
        x = rows.double()
        if self.shift is None:
            d = x.shape[1]
            self.shift = x.mean(0)
            self.sum = torch.zeros(d, dtype=torch.float64, device=x.device)
            self.outer = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        elif x.shape[1] != self.shift.shape[0]:
            raise ValueError(f"rows of width {x.shape[1]} after rows of width {self.shift.shape[0]}")
        centred = x - self.shift
        self.sum += centred.sum(0)
        self.outer += centred.T @ centred
        self.norms.append(torch.linalg.vector_norm(x, dim=1))
        self.n += x.shape[0]

    def all_norms(self):
        import torch

        return torch.cat(self.norms) if self.norms else torch.zeros(0, dtype=torch.float64)

    def find_outliers(self) -> None:
        """The published rule: |norm - median norm| > 3 std (unbiased) of the norms."""
        import torch

        norms = self.all_norms()
        if norms.numel() < 2:
            self.outliers = torch.zeros(0, dtype=torch.int64)
            return
        median = norms.median()  # torch.median: the lower median, as the reference
        far = (norms - median).abs() > OUTLIER_SIGMAS * norms.std()
        self.outliers = far.nonzero().flatten().cpu()
        if self.outliers.numel():
            d = self.shift.shape[0]
            self._prefix = torch.zeros(d, dtype=torch.int64, device=self.shift.device)
            self._rank = torch.full((d,), (self.n - 1) // 2, dtype=torch.int64, device=self.shift.device)

    # later passes: the outliers' own contributions, the per-dimension median ------------------------
    def revisit(self, rows, pass_index: int) -> None:
        import torch

        start, self._seen = self._seen, self._seen + rows.shape[0]
        if not self.outliers.numel() or rows.shape[0] == 0:
            return
        if pass_index == 1:  # take the outliers out again
            here = self.outliers[(self.outliers >= start) & (self.outliers < self._seen)] - start
            if here.numel():
                x = rows[here.to(rows.device)].double() - self.shift
                self.sum -= x.sum(0)
                self.outer -= x.T @ x
        keys = _ordered_keys(rows)  # [n, D]
        level = 32 - RADIX_BITS * pass_index  # this pass sorts on bits [level, level + 8)
        match = (keys >> (level + RADIX_BITS)) == (self._prefix >> (level + RADIX_BITS))
        digit = (keys >> level) & ((1 << RADIX_BITS) - 1)
        d = keys.shape[1]
        slots = (torch.arange(d, device=keys.device) * (1 << RADIX_BITS) + digit)[match]
        if self._hist is None:
            self._hist = torch.zeros(d * (1 << RADIX_BITS), dtype=torch.int64, device=keys.device)
        self._hist += torch.bincount(slots, minlength=self._hist.numel())

    def end_pass(self, pass_index: int) -> None:
        import torch

        self._seen = 0
        if not self.outliers.numel():
            return
        level = 32 - RADIX_BITS * pass_index
        hist = self._hist.view(-1, 1 << RADIX_BITS)
        below = hist.cumsum(1)
        digit = (below <= self._rank[:, None]).sum(1)  # the bucket that holds the rank-th value
        self._rank -= torch.where(digit > 0, below.gather(1, (digit - 1).clamp(min=0)[:, None])[:, 0], 0)
        self._prefix |= digit << level
        self._hist = None
        if pass_index == RADIX_PASSES:
            self.median = _keys_to_float(self._prefix)
            k = self.outliers.numel()
            m = self.median.double() - self.shift
            self.sum += k * m
            self.outer += k * torch.outer(m, m)

    # result -------------------------------------------------------------------------------------------
    def moments(self):
        """(mean, unbiased covariance) in fp64 of the rows after the outlier replacement."""
        import torch

        if self.n < 2:
            raise ValueError(f"MIR needs at least 2 rows of each modality per layer, got {self.n}")
        mean_c = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean_c, mean_c)) / (self.n - 1)
        return self.shift + mean_c, (cov + cov.T) / 2


def trace_sqrt_product(cov_a, cov_b) -> float:
    """Tr((A B)^{1/2}) of two symmetric PSD matrices, exactly: the eigenvalues of A B are those of the
    symmetric PSD ``L^T A L`` for ``B = L L^T`` (a Cholesky factor: one eigenvalue-only decomposition), or,
    when B is singular, of ``A^{1/2} B A^{1/2}``; the trace is the sum of their square roots."""
    import torch

    factor, info = torch.linalg.cholesky_ex(cov_b)
    if int(info) == 0:
        inner = factor.T @ cov_a @ factor
    else:  # B singular (fewer rows than dimensions): A's square root from its eigendecomposition
        w, v = torch.linalg.eigh(cov_a)
        root_a = (v * w.clamp(min=0).sqrt()) @ v.T
        inner = root_a @ cov_b @ root_a
    return float(torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum())


def frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
    diff = mean_a - mean_b
    return float(diff @ diff + cov_a.trace() + cov_b.trace()) - 2 * trace_sqrt_product(cov_a, cov_b)


@dataclass
class MIRResult:
    mir: float
    per_layer: list  # the Fréchet distance of each layer (after the text-centric normalisation)
    scale: list  # c of each layer
    outliers: list  # (image, text) rows replaced at each layer
    rows: tuple  # (image rows, text rows) per layer


class MIRAccumulator:
    """Streaming MIR over layers: ``add(layer, image_rows, text_rows)`` for every batch, then, while
    ``passes_needed``, ``next_pass()`` and the same rows again in the same order; ``result()``.

    Memory: per layer and modality a ``D x D`` fp64 matrix, one scalar per row, and (only in the extra
    passes, only for a set with outliers) a ``[D, 256]`` histogram. ``device``: where the statistics live
    (default: the rows' device)."""

    def __init__(self, num_layers: int, device=None):
        if num_layers < 1:
            raise ValueError(f"MIR needs at least one layer, got {num_layers}")
        self.sets = [(_RowSet(), _RowSet()) for _ in range(num_layers)]
        self.device = device
        self.pass_index = 0

    def add(self, layer: int, image_rows, text_rows) -> None:
        import torch

        with torch.inference_mode():  # the statistics are inference tensors, wherever the caller runs
            self._add(layer, image_rows, text_rows)

    def _add(self, layer: int, image_rows, text_rows) -> None:
        image, text = self.sets[layer]
        if self.device is not None:
            image_rows, text_rows = image_rows.to(self.device), text_rows.to(self.device)
        if self.pass_index == 0:
            image.observe(image_rows)
            text.observe(text_rows)
        else:
            image.revisit(image_rows, self.pass_index)
            text.revisit(text_rows, self.pass_index)

    @property
    def passes_needed(self) -> bool:
        """Whether the rows must be streamed again (after pass 1: some set has outliers)."""
        if self.pass_index == 0:
            return True
        return self.pass_index <= RADIX_PASSES and any(s.outliers.numel() for pair in self.sets for s in pair)

    def next_pass(self) -> None:
        """End the current pass. Call ``passes_needed`` after it to know whether to stream again."""
        import torch

        with torch.inference_mode():
            self._end_pass()
        self.pass_index += 1

    def _end_pass(self) -> None:
        for pair in self.sets:
            for s in pair:
                if self.pass_index == 0:
                    if s.n < 2:
                        raise ValueError(f"MIR needs at least 2 rows of each modality per layer, got {s.n}")
                    s.find_outliers()
                else:
                    s.end_pass(self.pass_index)

    def result(self) -> MIRResult:
        import torch

        with torch.inference_mode():
            return self._result()

    def _result(self) -> MIRResult:
        if self.passes_needed:
            raise RuntimeError("MIRAccumulator.result() before every pass was streamed")
        per_layer, scales, outliers, rows = [], [], [], []
        for image, text in self.sets:
            scale = 1.0 / float(text.all_norms().mean())
            mu_v, s_v = image.moments()
            mu_t, s_t = text.moments()
            per_layer.append(scale * scale * frechet_distance(mu_v, s_v, mu_t, s_t))
            scales.append(scale)
            outliers.append((int(image.outliers.numel()), int(text.outliers.numel())))
            rows.append((image.n, text.n))
        total = sum(per_layer)
        return MIRResult(math.log10(total) if total > 0 else float("-inf"), per_layer, scales, outliers, rows)


def modality_integration_rate(image_states: Sequence, text_states: Sequence, *, device=None,
                              chunk_rows: Optional[int] = 4096) -> tuple[float, list]:
    """MIR and the per-layer Fréchet distances of the published procedure (see the module docstring).

    ``image_states`` / ``text_states``: one ``[N, D]`` tensor per layer (the image-token and the text-token
    hidden states of every pair, stacked; pass the layers to measure: the published procedure takes the
    outputs of decoder layers 1..L, not the input embeddings). Rows are streamed ``chunk_rows`` at a time
    through the same accumulator ``regap-fast gap --metric mir`` uses. Returns ``(mir, per_layer)``.
    """
    if len(image_states) != len(text_states):
        raise ValueError(f"{len(image_states)} layers of image states but {len(text_states)} of text states")
    acc = MIRAccumulator(len(image_states), device=device)
    step = chunk_rows or None
    while acc.passes_needed:
        for layer, (image, text) in enumerate(zip(image_states, text_states)):
            for rows, other in _chunks(image, text, step):
                acc.add(layer, rows, other)
        acc.next_pass()
    result = acc.result()
    return result.mir, result.per_layer


def _chunks(image, text, step):
    if image.dim() != 2 or text.dim() != 2:
        raise ValueError(f"each layer's states must be [N, D], got {tuple(image.shape)} and {tuple(text.shape)}")
    n = max(image.shape[0], text.shape[0])
    step = step or max(n, 1)
    empty_i, empty_t = image[:0], text[:0]
    for s in range(0, n, step):
        yield (image[s:s + step] if s < image.shape[0] else empty_i), (text[s:s + step] if s < text.shape[0]
                                                                     else empty_t)
