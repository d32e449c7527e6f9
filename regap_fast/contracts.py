"""The argument and result shapes every backend's primitives share (torch, Triton, CUDA): one definition each.

``broadcast_rows`` writes the backward of a masked mean: one vector per sample, scaled per side, to
every valid row of that side. Each side is described by a ``BroadcastSide``; ``None`` means the
side's gradient is not needed and nothing is written for it.

``gap_loss_forward`` returns its per-sample statistics as one ``[3, B]`` tensor (a custom op returns
tensors, not tuples of names); ``GapStats.of`` names its rows.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class BroadcastSide(NamedTuple):
    """One output of ``broadcast_rows``: ``out[b, n] = sign * g[b] * w[b] * inv[b] * v[b]`` on valid rows.

    The output is ``[B, rows, D]`` when ``mask`` is given (0 on masked-out rows) and ``[B, 1, D]``
    without one (the caller expands it over the ``rows`` tokens: no dense pass).
    """

    inv: Tensor                # [B] 1 / (valid rows of the sample), fp32
    rows: int                  # N, the tokens of this side
    mask: Optional[Tensor]     # [B, N] bool, or None: every row is valid
    sign: float = 1.0


class GapStats(NamedTuple):
    """The rows of ``gap_loss_forward``'s ``[3, B]`` stats tensor."""

    inv_image: Tensor    # 1 / n_image, 0 for a sample without image tokens
    inv_caption: Tensor  # 1 / n_caption, 0 for a sample without caption tokens
    weight: Tensor       # the sample's weight in the loss: valid flag, / n_valid for reduction="mean"

    @classmethod
    def of(cls, stats: Tensor) -> "GapStats":
        return cls(stats[0], stats[1], stats[2])
