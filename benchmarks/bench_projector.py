"""The projector with REGAP against the projector without it, the unfused code and torch.compile of it.

Two systems' projectors, forward + backward of one stage-1 step (weights trained, vision features
frozen), every contender timed in one interleaved set with the same method:

* LLaVA-1.5: ``Linear(Dv, D) -> GELU -> Linear(D, D)`` at B=32, Ni=576, Dv=1024, D=4096, bf16;
* MiniGPT-4: one ``Linear(768, D)`` after the Q-Former's 32 query tokens, D = 4096 and 5120.

Contenders: ``plain_no_regap`` (transformers' module, no REGAP: the bar), ``unfused_eager`` (the
plain module + the reference gap loss on its outputs), ``unfused_compiled`` (the same, forward
through ``torch.compile``; its backward is AOTAutograd's), ``plain_plus_fused_gap_loss`` (the plain
module + ``fused_gap_loss``) and ``fused_<backend>`` (``projector_gap_loss`` on a regap_fast
projector, for every backend that runs here, ``torch`` included: the algebra in PyTorch ops).

``profile_steps`` gives the per-kernel device time of chosen contenders (torch.profiler), so the
difference between two contenders can be read kernel by kernel.

Runs on the CPU too, at tiny shapes (``rehearse=True``): the GPU script's code paths are tested in
CI before a GPU ever runs them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import regap_fast
from common import peak_memory_bytes, time_interleaved
from regap_fast import backends

LLAVA = dict(B=32, Ni=576, Nt=128, Dv=1024, D=4096, V=32000)
MINIGPT4 = [dict(B=32, Ni=32, Nt=64, Dv=768, D=4096, V=32000), dict(B=32, Ni=32, Nt=64, Dv=768, D=5120, V=32000)]
TINY_LLAVA = dict(B=2, Ni=12, Nt=6, Dv=8, D=32, V=50)
TINY_MINIGPT4 = [dict(B=2, Ni=4, Nt=6, Dv=8, D=24, V=50)]
REGAP_WEIGHT = 0.1
PROFILED = ("plain_no_regap", "unfused_compiled", "fused_torch", "fused_triton", "fused_cuda")

Step = Callable[..., object]


def projector_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Every backend whose projector family runs here (torch always does)."""
    return [b for b in ("torch", "triton", "cuda") if not backends.why_unavailable(b, device, dtype, "projector")]


def mlp_flops(M: int, Dv: int, D: int) -> float:
    """fwd: x W1^T, h W2^T; bwd: dE W2, dE^T h, dpre^T x (x needs no gradient in stage 1)."""
    return 2 * M * (Dv * D + D * D) + 2 * M * (2 * D * D + Dv * D)


def linear_flops(M: int, Dv: int, D: int) -> float:
    """fwd: x W^T; bwd: dE^T x (x needs no gradient)."""
    return 2 * M * Dv * D * 2


def input_sets(shape: dict, device, dtype, count: int = 2) -> list[tuple]:
    """``count`` sets of (x, dE, caption ids, caption mask): two LLaVA sets are beyond the L2 cache."""
    B, Ni, Nt, Dv, D, V = (shape[k] for k in ("B", "Ni", "Nt", "Dv", "D", "V"))
    sets = []
    for s in range(count):
        g = torch.Generator(device=device).manual_seed(100 + s)
        x = torch.randn(B, Ni, Dv, device=device, dtype=dtype, generator=g)
        dE = torch.randn(B, Ni, D, device=device, dtype=dtype, generator=g) * 1e-3
        ids = torch.randint(0, V, (B, Nt), device=device, generator=g)
        lengths = torch.randint(Nt // 2, Nt + 1, (B,), device=device, generator=g)
        tm = torch.arange(Nt, device=device)[None, :] < lengths[:, None]
        sets.append((x, dE, ids, tm))
    return sets


def _plain_llava(shape, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=shape["Dv"], num_attention_heads=4),
                      text_config=LlamaConfig(hidden_size=shape["D"], num_attention_heads=4),
                      projector_hidden_act="gelu")
    return LlavaMultiModalProjector(cfg).to(device, dtype)


def contenders(kind: str, shape: dict, device, dtype) -> dict[str, Step]:
    """name -> step(x, dE, ids, tm) returning the weight gradients; every step trains the same weights."""
    torch.manual_seed(0)
    if kind == "llava":
        plain = _plain_llava(shape, device, dtype)
        make_fused = lambda b: regap_fast.FusedLlavaProjector(shape["Dv"], shape["D"], backend=b)  # noqa: E731
    else:
        plain = torch.nn.Linear(shape["Dv"], shape["D"]).to(device, dtype)
        make_fused = lambda b: regap_fast.FusedLinearProjector(shape["Dv"], shape["D"], backend=b)  # noqa: E731
    table = torch.randn(shape["V"], shape["D"], device=device, dtype=dtype)
    params = list(plain.parameters())

    def grads(outputs, seeds, ps=params):
        return torch.autograd.grad(outputs, ps, seeds)

    def unfused_forward(x, ids, tm):
        e = plain(x)
        return e, regap_fast.gap_loss_reference(e, F.embedding(ids, table), None, tm)

    compiled_forward = torch.compile(unfused_forward)
    steps: dict[str, Step] = {
        "plain_no_regap": lambda x, dE, ids, tm: grads(plain(x), dE),
        "unfused_eager": lambda x, dE, ids, tm: _with_gap(grads, unfused_forward(x, ids, tm), dE),
        "unfused_compiled": lambda x, dE, ids, tm: _with_gap(grads, compiled_forward(x, ids, tm), dE),
    }

    def plain_plus_fused_loss(x, dE, ids, tm):
        e = plain(x)
        return _with_gap(grads, (e, regap_fast.fused_gap_loss(e, F.embedding(ids, table), None, tm)), dE)

    steps["plain_plus_fused_gap_loss"] = plain_plus_fused_loss
    for b in projector_backends(torch.device(device), dtype):
        proj = make_fused(b).to(device, dtype)
        proj.load_state_dict(plain.state_dict())
        fparams = list(proj.parameters())

        def fused(x, dE, ids, tm, proj=proj, fparams=fparams):
            out = regap_fast.projector_gap_loss(proj, x, ids, table, None, tm)
            return _with_gap(lambda o, s: grads(o, s, fparams), out, dE)

        steps[f"fused_{b}"] = fused
    return steps


def _with_gap(grads, embeds_and_gap, dE):
    e, gap = embeds_and_gap
    return grads((e, REGAP_WEIGHT * gap), (dE, None))


def gradient_differences(steps: dict[str, Step], inputs: tuple) -> dict[str, float]:
    """Each contender's largest relative weight-gradient difference from the unfused eager step."""
    ref = steps["unfused_eager"](*inputs)
    out = {}
    for name, fn in steps.items():
        if name in ("plain_no_regap", "unfused_eager"):
            continue
        got = fn(*inputs)
        out[name] = max(((a.float() - r.float()).norm() / r.float().norm().clamp(min=1e-30)).item()
                        for a, r in zip(got, ref))
    return out


def bench(kind: str, shape: dict, device, dtype, floor_flop_per_s: float, rounds: int = 15) -> dict:
    """Time (interleaved, every contender alike), peak memory and fraction of the matmul floor."""
    steps = contenders(kind, shape, device, dtype)
    sets = input_sets(shape, device, dtype)
    M = shape["B"] * shape["Ni"]
    flops = (mlp_flops if kind == "llava" else linear_flops)(M, shape["Dv"], shape["D"])
    floor_ms = flops / floor_flop_per_s * 1e3
    res = {"shape": dict(shape, dtype=str(dtype).removeprefix("torch."), regap_weight=REGAP_WEIGHT), "flops": flops,
           "matmul_floor_ms": floor_ms, "grad_rel_diff_vs_unfused": gradient_differences(steps, sets[0]),
           "results": {}}
    calls = {name: [(lambda fn=fn, s=s: fn(*s)) for s in sets] for name, fn in steps.items()}
    # compile's first calls (tracing, autotuning) happen in the warm-up, before any timed round
    timings = time_interleaved(calls, warmup=1 if rounds == 1 else 3, rounds=rounds, per_round=1 if rounds == 1 else 2)
    for name, fn in steps.items():
        r = {"time": timings[name], "peak_mem_bytes": peak_memory_bytes(lambda fn=fn: fn(*sets[0]))}
        r["matmul_floor_fraction"] = floor_ms / r["time"]["median_ms"]
        res["results"][name] = r
    plain = res["results"]["plain_no_regap"]
    for r in res["results"].values():
        r["time_vs_plain"] = r["time"]["median_ms"] / plain["time"]["median_ms"]
        r["peak_mem_vs_plain"] = r["peak_mem_bytes"] / max(plain["peak_mem_bytes"], 1)
    return res


def profile_steps(kind: str, shape: dict, device, dtype, names=PROFILED, steps_per_profile: int = 3,
                  warmup: int = 3) -> dict:
    """Per-kernel device time of one step of each named contender: {name: {"kernels": [...], "total_us"}}."""
    from torch.profiler import ProfilerActivity, profile

    steps = contenders(kind, shape, device, dtype)
    inputs = input_sets(shape, device, dtype, count=1)[0]
    on_gpu = torch.device(device).type == "cuda"
    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    out = {}
    for name in names:
        if name not in steps:
            continue
        for _ in range(warmup):  # compile, autotune, cuBLAS workspaces
            steps[name](*inputs)
        if on_gpu:
            torch.cuda.synchronize()
        with profile(activities=[activity]) as prof:
            for _ in range(steps_per_profile):
                steps[name](*inputs)
            if on_gpu:
                torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            us = (ev.self_device_time_total if on_gpu else ev.self_cpu_time_total) / steps_per_profile
            if us > 0 and (not on_gpu or ev.device_type == torch.autograd.DeviceType.CUDA):
                rows.append({"kernel": ev.key[:120], "calls": ev.count // steps_per_profile, "us": us})
        rows.sort(key=lambda r: -r["us"])
        out[name] = {"kernels": rows, "total_us": sum(r["us"] for r in rows)}
    return out


def profile_markdown(profiles: dict, results: dict | None = None) -> str:
    """One table per contender: every kernel with its time per step, the sum, and (given the timed
    results) the device-timed step (the kernels plus the device's gaps between them) and the launch
    overhead: the step as launched minus the kernels' sum, what Python, dispatch and launches add
    when the step does not run ahead of the GPU (what CUDA graphs would save)."""
    lines = []
    for name, p in profiles.items():
        t = (results or {}).get(name, {}).get("time", {})
        step, launched = t.get("median_ms"), t.get("launched", {}).get("median_ms")
        gap = "" if step is None else f"; device-timed step {step * 1e3:.1f} us"
        if launched is not None:
            gap += f", as launched {launched * 1e3:.1f} us, launch overhead {launched * 1e3 - p['total_us']:.1f} us"
        lines += [f"### {name}: kernels {p['total_us']:.1f} us per step{gap}", "", "| kernel | calls | us per step |",
                  "| --- | --- | --- |"]
        lines += [f"| `{r['kernel']}` | {r['calls']} | {r['us']:.1f} |" for r in p["kernels"]]
        lines.append("")
    return "\n".join(lines)


def section(rehearse: bool, device, dtype, ceilings: dict, quick: bool = True, log=print) -> dict:
    """The whole projector section of the GPU report (tiny shapes on the CPU when rehearsing): LLaVA-1.5
    first, then its per-kernel profile (what decides the design), then MiniGPT-4's shapes."""
    llava = TINY_LLAVA if rehearse else LLAVA
    minigpt4 = TINY_MINIGPT4 if rehearse else MINIGPT4
    rounds = 1 if rehearse else 15
    rate = ceilings["bf16_matmul_flop_per_s"]
    out = {"llava": bench("llava", llava, device, dtype, rate, rounds=rounds), "minigpt4": []}
    _log_table(log, "LLaVA-1.5 projector", out["llava"])
    out["profile"] = profile_steps("llava", llava, device, dtype, steps_per_profile=1 if rehearse else 3,
                                   warmup=1 if rehearse else 3)
    for name, p in out["profile"].items():
        timed = out["llava"]["results"].get(name, {}).get("time", {})
        if "launched" in timed:  # what Python, dispatch and launches add to the kernels' sum
            p["launch_overhead_us"] = timed["launched"]["median_ms"] * 1e3 - p["total_us"]
        log(f"  profile {name:28s} {p['total_us']:.1f} us per step over {len(p['kernels'])} kernels, launch "
            f"overhead {p.get('launch_overhead_us', float('nan')):.1f} us")
    for shape in minigpt4:
        row = bench("linear", shape, device, dtype, rate, rounds=rounds)
        out["minigpt4"].append(row)
        _log_table(log, f"MiniGPT-4 projector {shape['Dv']} -> {shape['D']}", row)
    return out


def _log_table(log, title: str, res: dict) -> None:
    log(f"{title}: gradients vs unfused (max rel diff) {res['grad_rel_diff_vs_unfused']}")
    for name, r in res["results"].items():
        log(f"  {name:28s} {r['time']['median_ms']:.3f} ms  x{r['time_vs_plain']:.3f} of plain  "
            f"({r['matmul_floor_fraction']:.0%} of the matmul floor), peak {r['peak_mem_bytes'] / 2**20:.0f} MiB")
