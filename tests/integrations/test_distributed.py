"""The patched model as users distribute it: DDP and FSDP2 under torchrun, DeepSpeed ZeRO-2 and ZeRO-3
through the Trainer (2 processes on gloo, DeepSpeed on its CPU accelerator), for one family of each path
(dist_worker.FAMILY_NAMES). Each gives the loss of one process (DDP and FSDP2: and the averaged
gradients); every run has a timeout, so a hang fails instead of stalling the suite."""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dist_worker import FAMILY_NAMES, WEIGHT  # noqa: E402
from vlm_families import BY_NAME, expected, make_batch  # noqa: E402

from regap_fast.integrations.transformers import RegapCallback, apply_regap  # noqa: E402

HERE = Path(__file__).resolve().parent
TIMEOUT = 300  # seconds for a whole 2-process run (~20 s here)
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (CI installs it: DS_BUILD_OPS=0 pip install "
                                            "deepspeed)")


def torchrun(mode: str, out: Path) -> list:
    """Both ranks' results of ``dist_worker.py MODE`` started as users start it: python -m torch.distributed.run."""
    paths = [str(HERE), str(HERE.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_worker.py"), mode, str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    return [torch.load(out / f"{mode}-rank{rank}.pt") for rank in (0, 1)]


def one_process(family, seed: int):
    """(loss, connector gradients) of the patched model on make_batch(seed), in this process."""
    model = apply_regap(family.build(), regap_weight=WEIGHT)
    batch, _, _ = make_batch(family, seed=seed)
    out = model(**batch)
    out.loss.backward()
    return float(out.loss), {n: p.grad for n, p in model.get_submodule(family.connector).named_parameters()}


@pytest.mark.slow
def test_ddp_and_fsdp2_under_torchrun_give_the_one_process_loss_and_gradients(tmp_path):
    ranks = torchrun("torch", tmp_path)
    for name in FAMILY_NAMES:
        (loss0, grads0), (loss1, grads1) = (one_process(BY_NAME[name], seed) for seed in (0, 1))
        for mode in ("ddp", "fsdp2"):
            for rank, loss in enumerate((loss0, loss1)):
                assert ranks[rank][name, mode][0] == pytest.approx(loss, rel=1e-6), (name, mode, rank)
                for n, g in ranks[rank][name, mode][1].items():  # the ranks' gradients averaged
                    torch.testing.assert_close(g, (grads0[n] + grads1[n]) / 2, rtol=1e-5, atol=1e-7,
                                               msg=f"{name} {mode} {n}")


def step_loss(family) -> float:
    """The logged loss of one Trainer step over make_batch seeds 0 and 1 as micro-batches: the LM loss as the
    Trainer weighs it (token-weighted over the step where the model takes num_items_in_batch, else the mean of the
    micro-batch means), plus lambda * the mean of the per-sample gaps over the step (by hand)."""
    from helpers import gaps_float64
    from vlm_families import received_embeds

    vanilla = family.build().train()
    lm, tokens, gap_sum, samples = [], [], 0.0, 0
    for seed in (0, 1):
        batch, image_pos, caption = make_batch(family, seed=seed)
        out, embeds = received_embeds(copy.deepcopy(vanilla), family, batch)
        gaps, valid = gaps_float64(embeds, embeds, image_pos, caption)
        lm.append(float(out.loss))
        tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
        gap_sum, samples = gap_sum + float(gaps.sum()), samples + int(valid.sum())
    if getattr(vanilla, "accepts_loss_kwargs", True):
        lm_loss = sum(n * x for n, x in zip(tokens, lm)) / sum(tokens)
    else:
        lm_loss = sum(lm) / len(lm)
    return lm_loss + WEIGHT * gap_sum / samples


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_one_process_trainer_step_over_two_micro_batches(name, tmp_path):
    """The reference for DeepSpeed below: the Trainer in one process, the two batches accumulated."""
    from transformers import Trainer, TrainingArguments

    family = BY_NAME[name]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    model = apply_regap(family.build().train(), regap_weight=WEIGHT)
    data = [make_batch(family, seed=s)[0] for s in (0, 1)]
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=lambda items: items[0])
    RegapCallback.attach(trainer)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == [pytest.approx(step_loss(family), rel=1e-5)]


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_through_the_trainer_gives_the_one_process_loss(stage, tmp_path):
    ranks = torchrun(f"zero{stage}", tmp_path)
    for name in FAMILY_NAMES:
        want = step_loss(BY_NAME[name])
        assert ranks[0][name] == ranks[1][name] == [pytest.approx(want, rel=1e-5)], name


def test_inside_ddp_one_process_gloo(tmp_path):
    """find_unused_parameters, as the Trainer sets it: DDP rebuilds the output from its fields, lm_loss and
    regap_gap included."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    family = BY_NAME["LLaVA-1.5"]
    model = apply_regap(family.build().train(), regap_weight=0.5)
    plain = copy.deepcopy(model)
    batch, _, _ = make_batch(family)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        out = ddp(**batch)
        out.loss.backward()
    finally:
        dist.destroy_process_group()
    ref = plain(**batch)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    assert torch.equal(out.regap_gap, ref.regap_gap) and torch.equal(out.lm_loss, ref.lm_loss)
    theirs = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None or theirs[name].grad is not None:
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.slow
def test_inside_fsdp2_one_process_gloo(tmp_path):
    """fully_shard on each decoder layer and the root (FSDP2); the gradients arrive as DTensors."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    family = BY_NAME["LLaVA-1.5"]
    model = family.build().train()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5)
    batch, image_pos, caption = make_batch(family)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model)
        out = model(**batch)
        out.loss.backward()
        grad = model.model.multi_modal_projector.linear_1.weight.grad.full_tensor()
    finally:
        dist.destroy_process_group()
    _, _, loss = expected(vanilla, family, batch, image_pos, caption, 0.5)
    loss.backward()
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, vanilla.model.multi_modal_projector.linear_1.weight.grad, rtol=1e-4, atol=1e-6)
