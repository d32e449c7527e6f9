"""Independent float64 references and input generators for the op tests."""

import torch


def random_tokens(B, N, D, dtype, device, noncontiguous=False):
    """Random [B, N, D] tokens; optionally a non-contiguous view (strided along every axis)."""
    if not noncontiguous:
        return torch.randn(B, N, D, device=device).to(dtype)
    # a [B, N, D] view with all three strides unusual: transposed storage and a step of 2 along D
    base = torch.randn(N, B, 2 * D + 1, device=device).to(dtype)
    return base.transpose(0, 1)[:, :, 1::2]


def random_mask(B, N, device, p=0.7, empty_rows=()):
    """Random bool mask with the given rows entirely False."""
    m = torch.rand(B, N, device=device) < p
    for r in empty_rows:
        m[r] = False
    return m


def poison_masked(x, mask, value=float("nan")):
    """Put NaN in the masked-out positions (they must never be read)."""
    if mask is None:
        return x
    x = x.clone()
    x[~mask] = value
    return x


def gaps_float64(img, txt, im=None, tm=None, squared=False):
    """Per-sample gaps and validity, one sample at a time with boolean indexing, in float64."""
    gaps, valid = [], []
    for b in range(img.shape[0]):
        xi = img[b].double()
        xt = txt[b].double()
        if im is not None:
            xi = xi[im[b]]
        if tm is not None:
            xt = xt[tm[b]]
        ok = xi.shape[0] > 0 and xt.shape[0] > 0
        if ok:
            d = xi.mean(0) - xt.mean(0)
            g = (d * d).sum() if squared else torch.linalg.vector_norm(d)
        else:
            g = torch.zeros((), dtype=torch.float64, device=img.device)
        gaps.append(g)
        valid.append(ok)
    return torch.stack(gaps), torch.tensor(valid, device=img.device)


def loss_float64(img, txt, im=None, tm=None, reduction="mean", squared=False):
    gaps, valid = gaps_float64(img, txt, im, tm, squared)
    if reduction == "none":
        return gaps
    if reduction == "sum":
        return gaps.sum()
    return gaps.sum() / max(int(valid.sum()), 1)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
