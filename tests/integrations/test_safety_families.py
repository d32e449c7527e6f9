"""`regap-fast safety-eval` on transformers VLM folders of several families (tiny model + processor written
here): every image condition, the answers against greedy generation by hand through the family's own
processor and chat template, and all three judges on the same cached answers."""

import csv
import json

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from helpers import make_beaverdam, make_guard  # noqa: E402
from tiny_processors import PLAIN, PROCESSORS, WORDS, needs, save_folder  # noqa: E402

from regap_fast.cli import main  # noqa: E402
from regap_fast.eval.conditions import condition_input  # noqa: E402
from regap_fast.eval.prompts import load_prompts  # noqa: E402

FAMILIES = [pytest.param(n, id=n, marks=[*needs(n), pytest.mark.slow]) for n in PROCESSORS]
CONDITIONS = ["none", "white", "black", "noise", "typo", "benchmark:image"]
MAX_NEW = 3


def write_harmbench(root):
    """A HarmBench multimodal behaviors file with two behaviors, each with its own image."""
    (root / "multimodal_behavior_images").mkdir(parents=True)
    rows = []
    for i in range(2):
        Image.new("RGB", (20 + 4 * i, 20), (90 * i, 30, 200)).save(root / "multimodal_behavior_images" / f"b{i}.png")
        rows.append({"Behavior": " ".join(WORDS[3 * i:3 * i + 4]), "FunctionalCategory": "multimodal",
                     "SemanticCategory": "cat", "Tags": "", "ContextString": "", "BehaviorID": f"b{i}",
                     "ImageFileName": f"b{i}.png"})
    with open(root / "behaviors.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "behaviors.csv"


def answer_by_hand(folder, request, image, name):
    """Vanilla transformers, one request: the processor's chat template with the generation prompt, greedy. The
    families without a chat template: the request alone (PaliGemma's prefix names the image) with the
    tokenizer's special tokens."""
    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    if name in PLAIN:
        text = ("<image>" if name == "PaliGemma" else "") + request
    else:
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": request}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    kwargs = {"images": [[image]]} if image is not None else {}
    batch = processor(text=[text], add_special_tokens=name in PLAIN, return_tensors="pt", **kwargs)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", FAMILIES)
def test_safety_eval_on_a_transformers_folder_every_condition_every_judge(name, tmp_path, capsys):
    """Every condition the family answers: BLIP-2, InstructBLIP and PaliGemma answer only with an image, so
    ``none`` is theirs only to be refused in one line (and "all" leaves it out)."""
    folder = save_folder(tmp_path / "model", name)
    prompts = write_harmbench(tmp_path / "bench")
    out = tmp_path / "out"
    conditions = CONDITIONS[1:] if name in PLAIN else CONDITIONS
    def command(spec):
        return ["safety-eval", str(folder), "--prompts", str(prompts), "--out", str(out), "--conditions", spec,
                "--max-new-tokens", str(MAX_NEW), "--batch-size", "2", "--no-progress"]

    common = command(",".join(conditions))
    capsys.readouterr()
    if name in PLAIN:
        asked = ["safety-eval", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "none"),
                 "--conditions", "none,white", "--no-progress"]
        assert main(asked) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading")]
        assert err == ["regap-fast safety-eval: error: this model answers only with an image: leave the 'none' "
                       "condition out"]
        assert not (tmp_path / "none" / "responses.jsonl").exists()
        assert main(command("all")) == 0  # every condition the prompts have but none
        assert json.loads((out / "safety.json").read_text())["conditions"] == conditions
    assert main(common) == 0
    report = json.loads((out / "safety.json").read_text())
    assert report["judge"]["name"] == "refusal" and report["conditions"] == conditions
    assert all(report["unsafe_rate"][c]["n"] == 2 for c in conditions)
    # each cached answer is the one greedy generation gives by hand, image condition by image condition
    answers = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(answers) == 2 * len(conditions)
    size = transformers_image_size(folder)
    by_id = {p.id: p for p in load_prompts(prompts)}
    for a in answers:
        x = condition_input(a["condition"], by_id[a["id"]], size=size, seed=0)
        assert a["response"] == answer_by_hand(folder, x.text, x.image, name), (a["condition"], a["id"])
    # the other two judges on the same answers (nothing generated again)
    guard = make_guard(tmp_path / "guard", unsafe_first=True, constant_output=True)
    assert main([*common, "--judge", "guard", "--guard-model", str(guard)]) == 0
    report = json.loads((out / "safety.json").read_text())
    assert report["judge"]["name"] == "guard" and report["summary"]["image"]["rate"] == 1.0
    dam = make_beaverdam(tmp_path / "dam", constant=True)
    assert main([*common, "--judge", "beaverdam", "--judge-model", str(dam)]) == 0
    report = json.loads((out / "safety.json").read_text())
    assert report["judge"]["name"] == "beaverdam" and report["summary"]["image"]["rate"] == 1.0
    assert all(r["rate"] == 1.0 for c in conditions for r in report["judge_categories"][c].values())
    assert len((out / "responses.jsonl").read_text().splitlines()) == 2 * len(conditions)
    capsys.readouterr()


def transformers_image_size(folder):
    from regap_fast.eval.hf_gap import TransformersVLM

    return TransformersVLM.from_folder(folder).image_size


def test_an_unsupported_folder_is_one_line(tmp_path, capsys):
    """A transformers folder whose model is not a vision-language model apply_regap supports."""
    folder = save_folder(tmp_path / "model", "LLaVA-1.5")
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    text.update(architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(text))
    prompts = write_harmbench(tmp_path / "bench")
    capsys.readouterr()
    assert main(["safety-eval", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("regap-fast safety-eval: error: ") and "model_type 'llama'" in err[0]


@pytest.mark.parametrize("name,side", [pytest.param("Qwen2-VL", 16, marks=needs("Qwen2-VL")), ("LLaVA-1.5", 16),
                                       ("Gemma 3", 16), ("Idefics3", 32)])
def test_synthetic_images_are_made_at_the_processors_input_size(name, side, tmp_path):
    """A side in pixels: Qwen-VL's size counts pixels (here a 16 x 16 budget), others give a side."""
    assert transformers_image_size(save_folder(tmp_path / "m", name)) == side
