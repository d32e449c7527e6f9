"""apply_regap on every family of vlm_families.FAMILIES (tiny random models from each family's own configs).

Every expectation comes from an unpatched copy of the model: its LM loss, and the gap computed here in
float64 with boolean indexing from the ``inputs_embeds`` its language model received (a forward hook
written here, on the module the family table names) at the image and caption positions the batch
builder wrote down.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from regap_fast.integrations.transformers import RegapCallback, apply_regap, regap_state  # noqa: E402
from vlm_families import DOCS, FAMILIES, expected, make_batch, with_table  # noqa: E402

BY_ID = [pytest.param(f, id=f.name) for f in FAMILIES]


@pytest.mark.parametrize("family", BY_ID)
def test_loss_is_lm_loss_plus_weight_times_the_gap_at_the_llm_input(family):
    model = family.build()
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.3)
    assert (regap_state(model).fused is not None) == family.fast
    batch, image_pos, caption = make_batch(family)
    ref, gap, loss = expected(vanilla, family, batch, image_pos, caption, 0.3)
    out = model(**batch)
    assert gap > 1e-3  # a real gap, not a trivially zero one
    torch.testing.assert_close(out.lm_loss, ref.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.regap_gap.double(), gap, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", BY_ID)
def test_gradients_match_the_reference_and_reach_the_connector(family):
    model = family.build()  # eval mode: no dropout, so two runs agree
    vanilla = copy.deepcopy(model)
    apply_regap(model, regap_weight=0.5)
    batch, image_pos, caption = make_batch(family)
    model(**batch).loss.backward()
    _, _, loss = expected(vanilla, family, batch, image_pos, caption, 0.5)
    loss.backward()
    theirs = dict(vanilla.named_parameters())
    for name, p in model.named_parameters():
        if theirs[name].grad is None:  # e.g. a vision layer after the one the features come from
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    lm_only = copy.deepcopy(vanilla)
    lm_only.zero_grad()
    lm_only(**batch).loss.backward()
    connector = dict(lm_only.get_submodule(family.connector).named_parameters())
    moved = [n for n, p in model.get_submodule(family.connector).named_parameters()
             if not torch.allclose(p.grad, connector[n].grad, rtol=1e-3, atol=1e-6)]
    assert moved, "the REGAP term does not reach the connector"


@pytest.mark.parametrize("family", BY_ID)
def test_outputs_are_bitwise_vanilla_without_labels_or_with_weight_zero(family):
    model = family.build()
    vanilla = copy.deepcopy(model)
    batch, _, _ = make_batch(family)
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    apply_regap(model, regap_weight=0.5)
    assert torch.equal(model(**unlabeled).logits, vanilla(**unlabeled).logits)
    apply_regap(model, regap_weight=0.0)  # re-applying updates the weight
    out, ref = model(**batch), vanilla(**batch)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    assert "regap_gap" not in out


@pytest.mark.parametrize("family", BY_ID)
def test_save_pretrained_loads_in_vanilla_transformers_with_equal_logits(family, tmp_path):
    model = family.build()
    keys = set(model.state_dict())
    apply_regap(model, regap_weight=0.2)
    with torch.no_grad():  # a trained connector: what is saved must be the patched model's weights
        for p in model.get_submodule(family.connector).parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, family.cls).from_pretrained(tmp_path).eval()
    assert set(loaded.state_dict()) == keys
    batch, _, _ = make_batch(family)
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(loaded(**unlabeled).logits, model(**unlabeled).logits)


@pytest.mark.slow
@pytest.mark.parametrize("family", BY_ID)
def test_one_trainer_step(family, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = family.build().train()
    apply_regap(model, regap_weight=0.5)
    batch, _, _ = make_batch(family)
    connector = [p.detach().clone() for p in model.get_submodule(family.connector).parameters()]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, learning_rate=1e-2,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[batch], data_collator=lambda items: items[0])
    RegapCallback.attach(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1 and logged[0]["regap_gap"] > 1e-3
    after = list(model.get_submodule(family.connector).parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, connector))


def test_the_docs_table_is_the_family_table():
    """docs/integrations.md's family table is generated: `python tests/integrations/vlm_families.py` writes it."""
    text = DOCS.read_text()
    assert with_table(text) == text, "run: python tests/integrations/vlm_families.py"
    assert all(f"`{f.cls}`" in text for f in FAMILIES)
