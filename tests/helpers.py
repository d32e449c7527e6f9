"""What several test modules share: the device, backend parameters, independent float64 references,
input generators, and the unfused projector step the fused projectors are checked against.

tests/conftest.py sets TRITON_INTERPRET before anything imports regap_fast; this module is imported
by the test modules, after it.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from regap_fast import FusedLlavaProjector, backends, fused_gap_loss, projector_gap_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def all_backend_params(family: str = "gap_loss"):
    """torch, plus every kernel backend; a missing one is a visible skip, not a silent drop."""
    params = [pytest.param("torch")]
    for name in ("triton", "cuda"):
        reason = backends.why_unavailable(name, DEVICE, torch.float32, family)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if name == "cuda":
            marks.append(pytest.mark.cuda_ext)
        params.append(pytest.param(name, marks=marks))
    return params


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


def assert_sum_close(got, ref, mag, what, rel=1e-5):
    """fp32 sums: |got - ref| <= rel * sum|terms| (a missed or doubled term is far larger)."""
    err = (got.double() - ref).abs()
    bound = rel * mag + 1e-30
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} sums off, worst "
                           f"{(err / bound.clamp(min=1e-30)).max().item():.3g}x the bound")


def assert_rounded_close(got, ref64, dtype, what, atol=1e-6, ulps=1.0):
    """got (dtype) vs a float64 value: within `ulps` units in the last place of dtype (relative),
    plus an absolute floor for values computed with cancellation in fp32 (as PyTorch computes them)."""
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), ref64, rtol=ulps * eps * 1.01, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# fp32 erf's absolute error, in units of fp32's eps (2^-23). PyTorch's vectorised CPU erf (AVX2 and AVX-512
# alike) evaluates Abramowitz & Stegun 7.1.26, whose own error is 1.5e-7 (1.3 eps), in about ten fp32
# operations (a division, a 5-term Horner polynomial, exp(-z^2) whose argument's rounding is amplified by
# z^2) that add a few eps more; CUDA's erff is within 2 ulp. 8 eps bounds them all.
ERF32_ABS_ERR = 8 * 2.0 ** -23


def gelu_error_bound(x, dtype, ulps=1.0):
    """Largest |GELU_dtype(x) - GELU64(x)| the math allows: the final rounding to dtype (``ulps`` of the
    value, at least one subnormal step of dtype, where tiny values land) plus what fp32's erf error becomes
    in 0.5 * x * (1 + erf(x / sqrt 2)) — 0.5 |x| ERF32_ABS_ERR, the term that dominates where 1 + erf
    cancels (x < -2: GELU tiny, x not)."""
    x = x.double()
    ref = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    info = torch.finfo(dtype)
    rounding = torch.clamp(ulps * info.eps * ref.abs(), min=info.smallest_normal * info.eps)
    return rounding + 0.5 * x.abs() * ERF32_ABS_ERR


def assert_gelu_close(h, pre, what="h"):
    """h = GELU(pre) (exact erf) against float64, within ``gelu_error_bound``."""
    x = pre.double()
    ref = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    err = (h.double() - ref).abs()
    bound = gelu_error_bound(pre, h.dtype) * 1.01 + 1e-45
    bad = (err > bound) & ~(h.isnan() & ref.isnan())
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} values off, worst "
                           f"{(err / bound).max().item():.3g}x the bound")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# --------------------------------------------------------------------------------------------------
# projectors
# --------------------------------------------------------------------------------------------------


def unfused_projector_step(proj, x, ids, table, im, tm, lam, probe, squared=False):
    """What a user would write without this library: the projector, then the gap on its outputs."""
    if isinstance(proj, FusedLlavaProjector):
        e = F.linear(F.gelu(F.linear(x, proj.linear_1.weight, proj.linear_1.bias)),
                     proj.linear_2.weight, proj.linear_2.bias)
    else:
        e = F.linear(x, proj.weight, proj.bias)
    txt = F.embedding(ids, table)
    gap = fused_gap_loss(e, txt.to(e.dtype), im, tm, squared=squared, backend="torch")
    return e, gap, (e.float() * probe).sum() + lam * gap


def check_projector(proj, x, ids, table, im, tm, backend, tol_out, tol_grad, squared=False):
    proj.backend = backend
    lam = 0.7
    probe = torch.randn(x.shape[0], x.shape[1], proj.out_features if hasattr(proj, "out_features")
                        else proj.linear_2.out_features, device=x.device)
    params = [p for p in proj.parameters()] + [x, table]

    e, gap = projector_gap_loss(proj, x, ids, table, im, tm, squared=squared)
    loss = (e.float() * probe).sum() + lam * gap
    grads = torch.autograd.grad(loss, params)

    e_ref, gap_ref, loss_ref = unfused_projector_step(proj, x, ids, table, im, tm, lam, probe, squared)
    grads_ref = torch.autograd.grad(loss_ref, params)

    assert e.dtype == e_ref.dtype and e.shape == e_ref.shape
    assert rel_err(e, e_ref) < tol_out
    assert rel_err(gap, gap_ref) < tol_out, (gap, gap_ref)
    names = [n for n, _ in proj.named_parameters()] + ["x", "embed_table"]
    for name, g, r in zip(names, grads, grads_ref):
        assert g is not None and torch.isfinite(g).all(), name
        assert rel_err(g, r) < tol_grad, (name, rel_err(g, r))


# a projector step in the compute dtype against float64: (outputs and gap, gradients); the dtype's rounding
PROJECTOR_TOL = {torch.float32: (3e-6, 3e-5), torch.float16: (2e-3, 8e-3), torch.bfloat16: (1.5e-2, 4e-2)}


def check_projector_float64(proj, x, ids, table, im, tm, backend, tol_out, tol_grad, squared=False):
    """The fused step in the projector's dtype against the unfused step in float64 on the same values."""
    import copy

    proj.backend = backend
    probe = torch.randn(x.shape[0], x.shape[1], proj.out_features, device=x.device)
    e, gap = projector_gap_loss(proj, x, ids, table, im, tm, squared=squared)
    params = list(proj.parameters()) + [x, table]
    grads = torch.autograd.grad((e.float() * probe).sum() + 0.7 * gap, params)
    ref = copy.deepcopy(proj).double()
    x64, table64 = x.detach().double().requires_grad_(True), table.detach().double().requires_grad_(True)
    e64, gap64, loss64 = unfused_projector_step(ref, x64, ids, table64, im, tm, 0.7, probe.double(), squared)
    grads64 = torch.autograd.grad(loss64, list(ref.parameters()) + [x64, table64])
    assert rel_err(e, e64) < tol_out and rel_err(gap, gap64) < tol_out, (rel_err(e, e64), rel_err(gap, gap64))
    names = [n for n, _ in proj.named_parameters()] + ["x", "embed_table"]
    for name, g, r in zip(names, grads, grads64):
        assert g.dtype == x.dtype and torch.isfinite(g).all(), name
        assert rel_err(g, r) < tol_grad, (name, rel_err(g, r))


def check_under_autocast(proj):
    """fp32 weights, autocast to fp16: outputs in fp16, the pooled output in fp32 (the mean of the plain
    outputs), fp32 gradients: like nn.Linear under autocast."""
    x = torch.randn(2, 9, proj.in_features, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out, pooled = proj(x, return_pooled=True)
        plain = proj(x)
    assert out.dtype == plain.dtype == torch.float16 and pooled.dtype == torch.float32
    assert rel_err(out, plain) < 2e-3 and rel_err(pooled, plain.double().mean(1)) < 2e-3
    (pooled.sum() + out.float().sum()).backward()
    weight = next(proj.parameters())
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()


def check_float64_exact(projector_class):
    """In float64 (the torch backend) the fused math and the unfused one agree to rounding."""
    proj = projector_class(10, 14).to(DEVICE).double()
    x, ids, table, im, tm = projector_inputs(3, 6, 4, 10, 14, 30, torch.float64, True)
    check_projector(proj, x, ids, table, im, tm, "torch", tol_out=1e-13, tol_grad=1e-12)


def projector_inputs(B, Ni, Nt, Dv, D, V, dtype, masks):
    x = torch.randn(B, Ni, Dv, device=DEVICE, dtype=dtype).requires_grad_(True)
    ids = torch.randint(0, V, (B, Nt), device=DEVICE)
    table = (torch.randn(V, D, device=DEVICE, dtype=dtype) * 0.5).requires_grad_(True)
    im = random_mask(B, Ni, DEVICE, p=0.8, empty_rows=(0,) if B > 2 else ()) if masks else None
    tm = random_mask(B, Nt, DEVICE, p=0.8) if masks else None
    if tm is not None:
        tm[:, 0] = True
    return x, ids, table, im, tm


# --------------------------------------------------------------------------------------------------
# tiny models and images
# --------------------------------------------------------------------------------------------------


TINY_TEXT = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def blip2_config(num_query_tokens=3, vision_layers=2):
    """A tiny Blip2Config dict (model_type blip-2): 32 px images, patch 16 (4 patches + CLS)."""
    return dict(model_type="blip-2", num_query_tokens=num_query_tokens,
                vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=vision_layers,
                                   num_attention_heads=2, image_size=32, patch_size=16),
                qformer_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    cross_attention_frequency=1, encoder_hidden_size=24))


def tiny_blip2_generation(text_config=TINY_TEXT, vocab=None):
    """A tiny Blip2ForConditionalGeneration (eval mode) with distinguishable query tokens."""
    from transformers import AutoConfig, Blip2Config, Blip2ForConditionalGeneration

    b = blip2_config()
    t = dict(text_config, vocab_size=vocab or 64)
    cfg = Blip2Config(vision_config=b["vision_config"], qformer_config=b["qformer_config"],
                      text_config=AutoConfig.for_model(t.pop("model_type"), **t).to_dict(),
                      num_query_tokens=b["num_query_tokens"])
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers zeroes the query tokens at init; make them tell apart
        model.query_tokens.normal_(std=0.5)
    return model


def images(n, seed=0, size=(40, 48)):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())
            for _ in range(n)]


# MIR (regap_fast.eval.mir) by its published procedure, independently of the streaming code
def frechet_sqrtm(x, y):
    """Float64 with scipy's general matrix square root of the product (the reference's "accurate" mode)."""
    import numpy as np

    x, y = x.double().numpy(), y.double().numpy()
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    from scipy.linalg import sqrtm

    root = sqrtm(s_x @ s_y)
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(root.real))


def published_mir(image_layers, text_layers, sigmas=3.0):
    """The published procedure as its paper and code describe it, written out plainly, in float64."""
    per_layer = []
    for x, y in zip(image_layers, text_layers):
        x, y = x.double().clone(), y.double().clone()
        c = 1.0 / y.norm(dim=-1).mean()
        x, y = c * x, c * y
        for rows in (x, y):
            norms = rows.norm(dim=-1)
            far = (norms - norms.median()).abs() > sigmas * norms.std()
            rows[far] = rows.median(dim=0).values
        per_layer.append(frechet_sqrtm(x, y))
    return math.log10(sum(per_layer)), per_layer


# Tiny judges: a Llama-Guard-like causal LM and a Beaver-dam-like multi-label classifier
# A Llama-Guard-like template: the conversation goes inside a fixed moderation instruction.
GUARD_TEMPLATE = (
    "<s> task : check the last agent message . "
    "{% for m in messages %}{{ 'user' if m['role'] == 'user' else 'agent' }} : {{ m['content'] }} {% endfor %}"
    "verdict :")
WORDS = ["unsafe", "safe", "S1", "S2", "task", "check", "the", "last", "agent", "message", ".", "user", ":",
         "verdict", "how", "do", "i", "make", "a", "cake", "sure", "here", "is", "sorry", "no"]


def _save_tiny_word_model(path, words: list, model_class: str, zero_output: bool, **config):
    """A tiny Llama of ``model_class`` (transformers' name) with a word-level tokenizer over ``words``, saved
    to ``path``. ``zero_output``: final norm weight 0, so every logit (or score) is 0."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words + ["<unk>", "<s>", "</s>", "<pad>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = config.pop("chat_template", None)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.5,  # varied outputs from random weights
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"], **config))
    if zero_output:
        with torch.no_grad():
            model.model.norm.weight.zero_()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_guard(path, unsafe_first: bool, constant_output: bool):
    """A tiny Llama + word-level tokenizer saved to ``path``. With ``constant_output`` every logit is
    zero (final norm weight 0), so greedy decoding emits token id 0: "unsafe" or "safe"."""
    words = (["unsafe", "safe"] if unsafe_first else ["safe", "unsafe"]) + WORDS[2:]
    return _save_tiny_word_model(path, words, "LlamaForCausalLM", constant_output, chat_template=GUARD_TEMPLATE)


# three of Beaver-dam's 14 category names, commas included as it spells them
BEAVER_CATEGORIES = ["animal_abuse", "controversial_topics,politics", "drug_abuse,weapons,banned_substance"]
BEAVER_WORDS = ["BEGINNING", "OF", "CONVERSATION:", "USER:", "ASSISTANT:", "how", "do", "i", "make", "a", "cake",
                "sure", "here", "is", "sorry", "no"]


def make_beaverdam(path, constant: bool = False):
    """A tiny LlamaForSequenceClassification, multi-label over BEAVER_CATEGORIES, with a word-level tokenizer.
    ``constant``: final norm weight 0, so every logit is 0 and every probability 0.5."""
    return _save_tiny_word_model(path, BEAVER_WORDS, "LlamaForSequenceClassification", constant,
                                 num_labels=len(BEAVER_CATEGORIES), problem_type="multi_label_classification",
                                 id2label=dict(enumerate(BEAVER_CATEGORIES)),
                                 label2id={c: i for i, c in enumerate(BEAVER_CATEGORIES)})
