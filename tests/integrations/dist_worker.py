"""One rank of test_distributed's runs, started by ``python -m torch.distributed.run --nproc_per_node 2``.

    dist_worker.py torch OUT     each family under DDP, then under FSDP2 (fully_shard per decoder layer +
                                 root): rank r's loss on its batch (make_batch seed r) and the synced
                                 connector gradients, to OUT/torch-rank{r}.pt
    dist_worker.py zero2|zero3 OUT   one Trainer step under DeepSpeed (CPU accelerator, gloo), each family:
                                 the logged loss, to OUT/zero{2,3}-rank{r}.pt
    dist_worker.py ga OUT        one Trainer step of 2 ranks x batch size 2 over test_recipes' four samples,
                                 each of test_recipes.GA_FAMILIES: the REGAP part of the synced gradients,
                                 to OUT/ga-rank{r}.pt

The families are test_distributed.FAMILY_NAMES (one per path: the fused projector and the generic one).
"""

import sys

import torch
import torch.distributed as dist

from regap_fast.integrations.transformers import RegapCallback, apply_regap
from vlm_families import BY_NAME, make_batch

FAMILY_NAMES = ("LLaVA-1.5", "Qwen2.5-VL")
WEIGHT = 0.5


def connector_grads(model, family, full):
    grads = {n: p.grad for n, p in model.get_submodule(family.connector).named_parameters()}
    return {n: (g.full_tensor() if full else g).detach().clone() for n, g in grads.items()}


def ddp_and_fsdp2(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for name in FAMILY_NAMES:
        family = BY_NAME[name]
        batch, _, _ = make_batch(family, seed=rank)
        model = apply_regap(family.build(), regap_weight=WEIGHT)
        # unused parameters (a vision layer after the one the features come from): as the Trainer does
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        out = ddp(**batch)
        out.loss.backward()
        results[name, "ddp"] = float(out.loss), connector_grads(model, family, full=False)
        model = apply_regap(family.build(), regap_weight=WEIGHT)
        for layer in model.get_submodule(family.lm).layers:
            fully_shard(layer)
        fully_shard(model)
        out = model(**batch)
        out.loss.backward()
        results[name, "fsdp2"] = float(out.loss), connector_grads(model, family, full=True)
    return results


def zero_config(stage: int) -> dict:
    """The Trainer's own optimizer and sizes ("auto"), ZeRO stage ``stage``."""
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}


def deepspeed_step(stage: int, out_dir: str) -> dict:
    """One Trainer step per family; the two ranks' batches are make_batch seeds 0 and 1."""
    import deepspeed.comm.torch
    from transformers import Trainer, TrainingArguments

    # no shared-memory all-reduce: DeepSpeed compiles it on first use (a minute on 2 cores); gloo does the collectives
    deepspeed.comm.torch.build_shm_op = lambda: None
    # built before any TrainingArguments: with ZeRO-3 on, transformers would build them partitioned (zero.Init),
    # which a model made from a config rather than from_pretrained does not survive
    models = {name: apply_regap(BY_NAME[name].build().train(), regap_weight=WEIGHT) for name in FAMILY_NAMES}
    results = {}
    for name, model in models.items():
        family = BY_NAME[name]
        args = TrainingArguments(output_dir=f"{out_dir}/{name}-zero{stage}", max_steps=1, per_device_train_batch_size=1,
                                 logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
                                 use_cpu=True, deepspeed=zero_config(stage))
        data = [make_batch(family, seed=s)[0] for s in (0, 1)]
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=lambda items: items[0])
        RegapCallback.attach(trainer)
        trainer.train()
        results[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return results


def main(mode: str, out_dir: str) -> None:
    if mode == "torch":
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        results = ddp_and_fsdp2(rank)
        dist.destroy_process_group()
    elif mode == "ga":
        import os
        from pathlib import Path

        from test_recipes import GA_FAMILIES, regap_part

        rank = int(os.environ["RANK"])
        results = {name: regap_part(BY_NAME[name], 2, 1, Path(out_dir) / name) for name in GA_FAMILIES}
    else:
        import os

        rank = int(os.environ["RANK"])
        results = deepspeed_step(int(mode[-1]), out_dir)
    torch.save(results, f"{out_dir}/{mode}-rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
