"""regap_fast.core, the REGAP term every model builds: the caption rule, the image -> sample mapping, and
modality_gap in each of its forms (dense embeddings, per-image means, caption ids) against a float64
computation by hand; a RegapError for each bad input."""

import pytest
import torch
from helpers import gaps_float64

from regap_fast.core import RegapError, caption_mask, gap_samples, image_owners, modality_gap


def test_caption_tokens_are_labelled_and_not_special():
    ids = torch.tensor([[1, 7, 7, 9, 10, 11, 2, 0]])
    labels = torch.tensor([[-100, -100, -100, 9, 10, 11, 2, -100]])
    assert caption_mask(ids, labels, [0, 1, 2, 7]).tolist() == [[False] * 3 + [True] * 3 + [False] * 2]
    assert caption_mask(ids, labels, [0, 1, 2, 7, 10]).tolist() == [[False] * 3 + [True, False, True] + [False] * 2]
    within = torch.tensor([[True] * 5 + [False] * 3])  # e.g. a labelled separator after the caption
    assert caption_mask(ids, labels, torch.tensor([2]), within=within).tolist() == [[False] * 3 + [True] * 2 +
                                                                                    [False] * 3]
    with pytest.raises(RegapError, match="must align with input_ids"):
        caption_mask(ids, labels[:, :-1], [0])


def test_images_are_mapped_to_their_samples_in_order():
    """Sample 0 holds two images of 2 tokens, sample 1 none, sample 2 one."""
    positions = torch.zeros(3, 10, dtype=torch.bool)
    positions[0, :4] = True
    positions[2, 5:7] = True
    assert image_owners(positions, 3).tolist() == [0, 0, 2]
    pooled = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 5.0]])  # one mean per image
    ids = torch.zeros(3, 10, dtype=torch.long)
    caption = torch.ones(3, 10, dtype=torch.bool)
    table = torch.zeros(1, 2)  # every caption token embeds to 0: the gap is the norm of the image mean
    gaps = modality_gap(pooled, ids, positions, caption, embedding_weight=table, reduction="none")
    torch.testing.assert_close(gaps, torch.tensor([20.0 ** 0.5, 0.0, 50.0 ** 0.5]))
    assert gap_samples(positions, caption).tolist() == [True, False, True]
    positions[2, 7] = True  # 3 image tokens in a sample: no whole number of images
    with pytest.raises(RegapError, match="cannot tell which sample"):
        image_owners(positions, 3)
    with pytest.raises(RegapError, match="cannot tell which sample"):
        image_owners(positions, 4)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_form_of_the_gap_is_the_float64_gap_with_its_gradients(reduction, squared):
    """One sequence, two position masks (the generic path) == per-image means + caption ids (the fast path)."""
    B, N, D, per_image = 3, 12, 5, 3
    table = torch.randn(20, D, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 20, (B, N))
    image_pos = torch.zeros(B, N, dtype=torch.bool)
    image_pos[0, 1:7] = True  # two images
    image_pos[2, 2:5] = True  # one image; sample 1 has none
    caption = (torch.arange(N) >= 8) & (torch.arange(N) < torch.tensor([[12], [10], [9]]))
    image_tokens = torch.randn(int(image_pos.sum()), D, dtype=torch.float64, requires_grad=True)
    embeds = table[ids].masked_scatter(image_pos.unsqueeze(-1), image_tokens)  # what the LLM receives

    ref, valid = gaps_float64(embeds, embeds, image_pos, caption, squared=squared)
    expected = {"none": ref, "sum": ref.sum(), "mean": ref.sum() / valid.sum()}[reduction]
    per_image_means = image_tokens.view(-1, per_image, D).mean(1)
    forms = {"dense": modality_gap(embeds, embeds, image_pos, caption, reduction=reduction, squared=squared,
                                   backend="torch"),
             "pooled": modality_gap(per_image_means, ids, image_pos, caption, embedding_weight=table,
                                    reduction=reduction, squared=squared, backend="torch"),
             "mixed": modality_gap(per_image_means, embeds, image_pos, caption, reduction=reduction,
                                   squared=squared, backend="torch")}
    probe = torch.randn_like(ref) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    want = torch.autograd.grad((expected * probe).sum(), (image_tokens, table), retain_graph=True)
    for name, got in forms.items():
        torch.testing.assert_close(got, expected, msg=name)
        for g, w in zip(torch.autograd.grad((got * probe).sum(), (image_tokens, table), retain_graph=True), want):
            torch.testing.assert_close(g, w, msg=name)


def test_bad_inputs_are_one_regap_error_each():
    e = torch.randn(2, 4, 3)
    m = torch.ones(2, 4, dtype=torch.bool)
    cases = [
        ((e.long(), e, m, m), {}, "image must be a float tensor"),
        ((e, e[0], m, m), {}, "caption must be"),
        ((e[:, 0], e, None, m), {}, "per-image means need image_mask"),
        ((e, torch.zeros(2, 4, dtype=torch.long), m, m), {}, "need embedding_weight"),
        ((e, e, m.long(), m), {}, "image_mask must be a bool tensor"),
        ((e, e, m, m[:, :3]), {}, "caption_mask must be a bool tensor"),
        ((e, e[:1], m, m[:1]), {}, "image side has 2 samples, caption side 1"),
        ((e, torch.randn(2, 4, 5), m, m), {}, "embedding sizes differ"),
        ((e, e, m, m), {"reduction": "avg"}, "reduction must be one of"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(RegapError, match=message):
            modality_gap(*args, **kwargs)
