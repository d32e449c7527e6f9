"""`regap-fast gap` on transformers VLM folders (tiny model + processor written here, nothing from a hub), on
LLaVA-format image-caption data: the per-pair gaps against a float64 computation by hand from the
inputs_embeds the model's language model receives, caption positions read off the tokens."""

import csv
import json

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from helpers import gaps_float64, published_mir  # noqa: E402
from tiny_processors import CAPTION_IDS, PLAIN, PROCESSORS, WORDS, needs, save_folder  # noqa: E402
from vlm_families import BY_NAME, IMAGE  # noqa: E402

from regap_fast.cli import main  # noqa: E402

ASSISTANT = 10  # the role word's id (tiny_processors: markers, then "user", "assistant")
CAPTIONS = [" ".join(WORDS[i:i + n]) for i, n in ((0, 3), (5, 5), (12, 2), (20, 4))]
QUESTION = f"{WORDS[30]} {WORDS[31]}"


FOLDERS = [pytest.param(n, id=n, marks=needs(n)) for n in PROCESSORS]


def write_pairs(root):
    (root / "imgs").mkdir(parents=True)
    records = []
    for i, cap in enumerate(CAPTIONS):
        Image.new("RGB", (16 + 4 * i, 16), (60 * i % 256, 120, 200 - 40 * i)).save(root / "imgs" / f"{i}.png")
        records.append({"id": f"p{i}", "image": f"imgs/{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": cap}]})
    (root / "pairs.json").write_text(json.dumps(records))
    return root / "pairs.json"


def plain_batch(processor, name, question, answer, image):
    """The families without a chat template, their format spelled out: PaliGemma's prefix ``<image>question``
    and the answer as its suffix; BLIP-2's ``question answer`` with the tokenizer's special tokens, InstructBLIP's
    Q-Former reading the question alone."""
    if name == "PaliGemma":
        batch = processor(text=["<image>" + question], suffix=[answer], images=[[image]], return_tensors="pt")
        batch.pop("labels")
        return batch
    batch = processor(text=[f"{question} {answer}"], images=[[image]], return_tensors="pt")
    if name == "InstructBLIP":
        instruction = processor.qformer_tokenizer([question], return_tensors="pt")
        batch["qformer_input_ids"], batch["qformer_attention_mask"] = (instruction["input_ids"],
                                                                       instruction["attention_mask"])
    return batch


def gaps_by_hand(folder, name, root, rows=None):
    """Vanilla transformers on the folder, one pair at a time; the caption: the words after 'assistant' (after
    the question's words in the plain format). ``rows``: a dict that receives the image and caption rows of
    the hidden states after every decoder layer."""
    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    gaps = []
    for i, cap in enumerate(CAPTIONS):
        image = Image.open(root / "imgs" / f"{i}.png").convert("RGB")
        if name in PLAIN:
            batch = plain_batch(processor, name, QUESTION, cap, image)
        else:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                        {"role": "assistant", "content": [{"type": "text", "text": cap}]}]
            text = processor.apply_chat_template(messages, tokenize=False)
            batch = processor(text=[text], images=[[image]], add_special_tokens=False, return_tensors="pt")
        seen = []
        hook = model.get_submodule(BY_NAME[name].lm).register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True)
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        hook.remove()
        ids = batch["input_ids"]
        words = torch.isin(ids, torch.tensor(CAPTION_IDS))
        if name in PLAIN:
            caption = words & (words.cumsum(1) > len(QUESTION.split()))
        else:
            caption = words & (torch.arange(ids.shape[1]) > int((ids[0] == ASSISTANT).nonzero().max()))
        assert int(caption.sum()) == len(cap.split())
        g, valid = gaps_float64(seen[0], seen[0], ids == IMAGE, caption)
        assert valid.all()
        gaps.append(float(g[0]))
        if rows is not None:
            hidden = getattr(out, "hidden_states", None) or out.language_model_outputs.hidden_states
            for layer, h in enumerate(hidden[1:]):
                rows.setdefault("image", {}).setdefault(layer, []).append(h[0][ids[0] == IMAGE])
                rows.setdefault("caption", {}).setdefault(layer, []).append(h[0][caption[0]])
    return gaps


def run_gap(name, tmp_path, *flags):
    """`regap-fast gap` on a tiny folder of the family and the pairs; returns (folder, out)."""
    folder = save_folder(tmp_path / "model", name)
    data = write_pairs(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["gap", str(folder), "--data", str(data), "--out", str(out), "--batch-size", "3",
                 "--no-progress", *flags]) == 0
    return folder, out


@pytest.mark.parametrize("name", FOLDERS)
def test_gap_of_a_transformers_folder_is_the_gap_at_its_llm_input(name, tmp_path, capsys):
    folder, out = run_gap(name, tmp_path)
    assert "per-sample gap: mean" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "gap_samples.csv").read_text().splitlines()))
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(len(CAPTIONS))]
    expected = gaps_by_hand(folder, name, tmp_path / "data")
    torch.testing.assert_close(torch.tensor([float(r["gap"]) for r in rows], dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    result = json.loads((out / "gap.json").read_text())
    layers = BY_NAME[name].build().config.text_config.num_hidden_layers
    assert result["n_pairs"] == len(CAPTIONS) and len(result["per_layer"]) == layers + 1
    assert result["gap"]["mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


@pytest.mark.parametrize("name", FOLDERS)
def test_mir_of_a_transformers_folder_is_the_published_procedure_on_its_hidden_states(name, tmp_path, capsys):
    folder, out = run_gap(name, tmp_path, "--metric", "both")
    assert "MIR: " in capsys.readouterr().out
    rows = {}
    gaps_by_hand(folder, name, tmp_path / "data", rows)
    layers = sorted(rows["image"])
    expected, per_layer = published_mir([torch.cat(rows["image"][k]) for k in layers],
                                        [torch.cat(rows["caption"][k]) for k in layers])
    result = json.loads((out / "gap.json").read_text())
    assert result["mir"]["value"] == pytest.approx(expected, rel=1e-5)
    assert [r["frechet"] for r in result["mir"]["per_layer"]] == pytest.approx(per_layer, rel=1e-5)
    assert [r["layer"] for r in result["mir"]["per_layer"]] == [k + 1 for k in layers]
    assert "gap" in result and (out / "mir.png").is_file() and (out / "gap.png").is_file()
    # MIR alone: no L2 numbers, the same MIR
    pairs = tmp_path / "data" / "pairs.json"
    assert main(["gap", str(folder), "--data", str(pairs), "--out", str(tmp_path / "mir"), "--metric", "mir",
                 "--no-progress"]) == 0
    alone = json.loads((tmp_path / "mir" / "gap.json").read_text())
    assert "gap" not in alone and alone["mir"]["value"] == pytest.approx(result["mir"]["value"], rel=1e-6)
    assert not (tmp_path / "mir" / "gap.png").exists()


def test_every_family_of_the_docs_table_has_a_tiny_folder():
    """``gap`` (L2 and MIR) and ``safety-eval`` run above on each family docs/integrations.md lists."""
    assert sorted(PROCESSORS) == sorted(BY_NAME)


def test_a_processor_without_a_chat_template_is_one_clear_error(tmp_path, capsys):
    folder = save_folder(tmp_path / "model", "LLaVA-1.5")
    for name in ("chat_template.jinja", "chat_template.json"):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "processor_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "processor_config.json").write_text(json.dumps(config))
    assert main(["gap", str(folder), "--data", str(write_pairs(tmp_path / "data")), "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "regap-fast gap: error: the model's processor has no chat template: the pairs cannot be put " \
                      "into its format"


@pytest.mark.parametrize("name", ["Qwen2-VL", "Gemma 3"])
def test_a_folder_without_its_processor_files_says_so(name, tmp_path, capsys):
    folder = tmp_path / "model"
    BY_NAME[name].build().save_pretrained(folder)  # the model alone: no processor saved beside it
    assert main(["gap", str(folder), "--data", str(write_pairs(tmp_path / "data")), "--out",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("regap-fast gap: error: ") and "but not its processor" in err[-1], err[-1]
    assert "processor.save_pretrained" in err[-1]
    assert not (tmp_path / "out").exists()


def test_load_model_names_the_family_it_cannot_read(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from regap_fast.model import load_model

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds a transformers 'llama' model: this command reads regap_fast models"):
        load_model(tmp_path)
