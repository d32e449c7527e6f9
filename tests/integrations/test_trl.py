"""RegapSFTTrainer: TRL computes the SFT loss itself (from its fused LM head's log-probs); the trainer adds
lambda * gap to it. On LLaVA-1.5 with a collator of ours, and on VLMs of the generic path with TRL's own
VLM data collation (its processor-driven prompt-completion batches)."""

import copy

import pytest
import torch
from helpers import gaps_float64

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")

from regap_fast.integrations.transformers import RegapCallback, apply_regap  # noqa: E402
from tiny_processors import CAPTION_IDS, PROCESSORS, WORDS, needs, word_tokenizer  # noqa: E402
from vlm_families import BY_NAME, IMAGE, caption_items, collate, expected, make_batch  # noqa: E402

LLAVA = BY_NAME["LLaVA-1.5"]


def sft_config(tmp_path, **more):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True, **more)


@pytest.mark.slow
def test_sft_trainer_adds_the_gap_to_its_own_loss(tmp_path):
    import datasets

    from regap_fast.integrations.trl import RegapSFTTrainer

    model = LLAVA.build(seed=1).train()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5)
    rows = datasets.Dataset.from_list(caption_items(LLAVA, 8)).with_format("torch")  # TRL takes a datasets.Dataset
    args = sft_config(tmp_path, dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False)
    trainer = RegapSFTTrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                              processing_class=word_tokenizer({"<image>": IMAGE}))
    batch, image_pos, caption = make_batch(LLAVA)
    _, _, loss = expected(vanilla, LLAVA, batch, image_pos, caption, 0.5)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(batch)).double(), loss, rtol=1e-5, atol=1e-6)
    RegapCallback.attach(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["regap_gap"] > 0 for h in logged)


def vlm_rows(n=4):
    """TRL's conversational prompt-completion rows with one image each: a question, a caption."""
    import datasets
    from PIL import Image

    return datasets.Dataset.from_list([
        {"images": [Image.new("RGB", (16, 16), (50 * i % 256, 90, 30 * i % 256))],
         "prompt": [{"role": "user", "content": f"{WORDS[30]} {WORDS[31 + i]}"}],
         "completion": [{"role": "assistant", "content": " ".join(WORDS[i:i + 3 + i % 2])}]} for i in range(n)])


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=needs(n)) for n in ("Qwen2-VL", "Gemma 3")])
def test_sft_trainer_with_trls_vlm_collation_on_the_generic_path(name, tmp_path):
    from trl import SFTTrainer

    from regap_fast.integrations.trl import RegapSFTTrainer

    family = BY_NAME[name]
    model = family.build(seed=1).train()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5)
    processor, rows = PROCESSORS[name](), vlm_rows()
    trainer = RegapSFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=rows, processing_class=processor)
    plain = SFTTrainer(model=vanilla, args=sft_config(tmp_path / "plain"), train_dataset=rows,
                       processing_class=processor)
    batch = trainer.data_collator([rows[i] for i in range(2)])  # TRL's collation: the processor, labels
    ids, labels = batch["input_ids"], batch["labels"]
    caption = (labels != -100) & torch.isin(ids, torch.tensor(CAPTION_IDS))  # the words, not <|im_end|>
    assert caption.sum(1).tolist() == [3, 4]
    seen = []
    hook = vanilla.get_submodule(family.lm).register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
    lm_loss = plain.compute_loss(vanilla, dict(batch))
    hook.remove()
    gaps, valid = gaps_float64(seen[0], seen[0], ids == IMAGE, caption)
    reference = lm_loss.double() + 0.5 * gaps.sum() / valid.sum()
    torch.testing.assert_close(trainer.compute_loss(trainer.model, dict(batch)).double(), reference,
                               rtol=1e-5, atol=1e-6)
    RegapCallback.attach(trainer)
    trainer.train()
    assert all(h["regap_gap"] > 0 for h in trainer.state.log_history if "loss" in h)

