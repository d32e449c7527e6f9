"""Python-side cost of each op in eager mode: forward + backward at tiny sizes on the CPU, where the
dispatch is all there is (docs/ops.md, "Eager and compiled").

    OMP_NUM_THREADS=1 python benchmarks/dispatch_overhead.py

Process time (immune to other processes taking the cores), best of 20 x 300 calls, in microseconds.
"""

import time

import torch

from regap_fast import fused_gap_loss, linear_projector, llava_projector, masked_mean, pooled_text_embeddings


def best_us_per_call(fn, reps: int = 300, repeats: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        best = min(best, (time.process_time() - t0) / reps)
    return best * 1e6


def main() -> None:
    torch.manual_seed(0)
    B, n, Dv, D = 2, 4, 8, 8
    x = torch.randn(B, n, Dv, requires_grad=True)
    w1, b1 = torch.randn(D, Dv, requires_grad=True), torch.randn(D, requires_grad=True)
    w2, b2 = torch.randn(D, D, requires_grad=True), torch.randn(D, requires_grad=True)
    img, txt = torch.randn(B, n, D, requires_grad=True), torch.randn(B, 3, D, requires_grad=True)
    im = torch.rand(B, n) < 0.7
    im[:, 0] = True
    ids, table = torch.randint(0, 20, (B, 5)), torch.randn(20, D, requires_grad=True)
    F = torch.nn.functional
    cases = {
        "llava_projector": lambda: sum(t.sum() for t in llava_projector(x, w1, b1, w2, b2, backend="torch")).backward(),
        "linear_projector": lambda: sum(t.sum() for t in linear_projector(x, w1, b1, backend="torch")).backward(),
        "fused_gap_loss (image mask)": lambda: fused_gap_loss(img, txt, im, backend="torch").backward(),
        "masked_mean": lambda: masked_mean(img, im, backend="torch").sum().backward(),
        "pooled_text_embeddings": lambda: pooled_text_embeddings(ids, table, backend="torch").sum().backward(),
        "plain LLaVA projector (reference)": lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2).sum().backward(),
    }
    for name, fn in cases.items():
        print(f"{name:36s} {best_us_per_call(fn):7.1f} us per forward + backward")


if __name__ == "__main__":
    main()
