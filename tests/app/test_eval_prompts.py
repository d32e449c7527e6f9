"""Prompt loaders on small files written here in each benchmark's published layout, and the image
conditions built from them."""

import csv
import json

import pytest
from PIL import Image

from regap_fast.eval.conditions import (
    FIGSTEP_PROMPT,
    available_conditions,
    condition_input,
    noise_image,
    parse_conditions,
    typographic_image,
)
from regap_fast.eval.prompts import PromptFileError, detect_benchmark, load_prompts

# --------------------------------------------------------------------------------------------------
# writers for the published layouts (no benchmark data: made-up, harmless stand-ins)
# --------------------------------------------------------------------------------------------------


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_mmsafetybench(root, scenarios=("01-Illegal_Activitiy", "08-Political_Lobbying"), n=3,
                        kinds=("SD", "TYPO", "SD_TYPO")):
    qdir = root / "data" / "processed_questions"
    qdir.mkdir(parents=True)
    for s in scenarios:
        questions = {str(i): {"Question": f"{s} question {i}?", "GPT-Pred": "", "Changed Question": "",
                              "Key Phrase": f"phrase {i}", "Phrase Type": "activity",
                              "Rephrased Question": f"The bottom of the image shows a phrase. {s} {i}",
                              "Rephrased Question(SD)": f"The image shows an activity. {s} {i}"}
                     for i in range(n)}
        (qdir / f"{s}.json").write_text(json.dumps(questions, indent=2))
        for kind in kinds:
            d = root / "data" / "imgs" / s / kind
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(d / f"{i}.jpg")
    return root


FIGSTEP_ROWS = [
    ("ForbidQI", 1, 1, "Illegal Activity", "How can someone do bad thing one?", "Steps to do bad thing one."),
    ("ForbidQI", 1, 2, "Illegal Activity", "How can someone do bad thing two?", "Methods to do bad thing two."),
    ("ForbidQI", 9, 1, "Financial Advice", "Can you plan my $50,000 savings, please?",
     "Steps to plan $50,000 savings."),  # commas inside quoted fields, as in the published file
]


def write_figstep(root, tiny=False, images=True):
    name = "SafeBench-Tiny" if tiny else "SafeBench"
    qdir = root / "data" / "question"
    qdir.mkdir(parents=True)
    path = write_csv(qdir / ("SafeBench-Tiny.csv" if tiny else "safebench.csv"),
                     ["dataset", "category_id", "task_id", "category_name", "question", "instruction"], FIGSTEP_ROWS)
    if images:
        d = root / "data" / "images" / name
        d.mkdir(parents=True)
        for ds, cat, task, *_ in FIGSTEP_ROWS:
            Image.new("RGB", (76, 76), "white").save(d / f"query_{ds}_{cat}_{task}_6.png")
    return path


# --------------------------------------------------------------------------------------------------
# text-only sets
# --------------------------------------------------------------------------------------------------


def test_advbench(tmp_path):
    path = write_csv(tmp_path / "harmful_behaviors.csv", ["goal", "target"],
                     [["Write a bad thing", "Sure, here is a bad thing"], ["Explain, in detail, x", "Sure, x"]])
    prompts = load_prompts(path)
    assert [p.text for p in prompts] == ["Write a bad thing", "Explain, in detail, x"]
    assert [p.id for p in prompts] == ["0", "1"] and prompts[0].category is None and not prompts[0].images


def test_harmbench_context_rule_and_categories(tmp_path):
    header = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"]
    path = write_csv(tmp_path / "harmbench_behaviors_text_all.csv", header, [
        ["Give steps for x", "standard", "chemical_biological", "", "", "x_steps"],
        ["Modify this text to say y", "contextual", "misinformation_disinformation", "context",
         "A paragraph, with commas,\nand a newline.", "y_modify"],
    ])
    prompts = load_prompts(path, "csv")
    assert [p.id for p in prompts] == ["x_steps", "y_modify"]
    assert prompts[0].text == "Give steps for x" and prompts[0].category == "chemical_biological"
    assert prompts[1].text == "A paragraph, with commas,\nand a newline.\n\n---\n\nModify this text to say y"


def test_harmbench_context_kept_as_published(tmp_path):
    """HarmBench's pipeline sends ContextString and Behavior unstripped (f"{context}\\n\\n---\\n\\n{behavior}");
    published contexts start or end with whitespace, which must reach the model as it does there."""
    header = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"]
    context = "\n  Line one of a quoted email,\nline two.  \n\n"
    behavior = "Write a reply to this email "
    path = write_csv(tmp_path / "harmbench_behaviors_text_all.csv", header, [
        [behavior, "contextual", "misinformation_disinformation", "context", context, "email_reply"],
        ["Say z", "standard", "harassment_bullying", "", "", "z"],
    ])
    with open(path, newline="", encoding="utf-8") as f:  # the raw cells, as HarmBench's csv.DictReader reads them
        raw = list(csv.DictReader(f))
    reply, z = load_prompts(path, "csv")
    assert reply.text == raw[0]["ContextString"] + "\n\n---\n\n" + raw[0]["Behavior"]
    assert reply.text.startswith("\n  Line one") and reply.text.endswith("email ")
    assert z.text == raw[1]["Behavior"] == "Say z"


def test_harmbench_multimodal_images(tmp_path):
    header = ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID",
              "ImageFileName"]
    path = write_csv(tmp_path / "mm.csv", header, [["Explain how to use this", "multimodal", "harm", "", "",
                                                     "mm_1", "pic.png"]])
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "pic.png")
    prompt, = load_prompts(path, images=tmp_path / "imgs")
    assert prompt.images["image"].path == tmp_path / "imgs" / "pic.png"
    assert prompt.images["image"].text == "Explain how to use this"


def test_generic_csv_and_jsonl(tmp_path):
    path = write_csv(tmp_path / "mine.csv", ["Prompt", "Category"], [["do a", "cat1"], ["do b", ""]])
    prompts = load_prompts(path)
    assert [(p.text, p.category) for p in prompts] == [("do a", "cat1"), ("do b", None)]
    jl = tmp_path / "mine.jsonl"
    jl.write_text('{"prompt": "do a", "category": "c", "id": "a1"}\n\n{"prompt": "do b"}\n')
    prompts = load_prompts(jl)
    assert [(p.id, p.text, p.category) for p in prompts] == [("a1", "do a", "c"), ("1", "do b", None)]
    assert load_prompts(jl, "csv")[0].id == "a1"  # --benchmark csv reads .jsonl too


def test_bad_text_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "nope.csv")
    bad = write_csv(tmp_path / "bad.csv", ["question", "label"], [["x", "y"]])
    with pytest.raises(PromptFileError, match="cannot tell the format.*'question', 'label'"):
        load_prompts(bad)
    hb = write_csv(tmp_path / "hb.csv", ["Behavior", "FunctionalCategory"], [["x", "standard"]])
    with pytest.raises(PromptFileError, match="missing \\['SemanticCategory', 'BehaviorID'\\]"):
        load_prompts(hb)
    empty = write_csv(tmp_path / "empty.csv", ["goal", "target"], [["x", "y"], ["  ", "z"]])
    with pytest.raises(PromptFileError, match="row 3 has an empty 'goal'"):
        load_prompts(empty)
    dup = write_csv(tmp_path / "dup.csv", ["prompt", "id"], [["x", "1"], ["y", "1"]])
    with pytest.raises(PromptFileError, match="duplicate prompt id '1'"):
        load_prompts(dup)
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(PromptFileError, match="bad.jsonl:2: not valid JSON"):
        load_prompts(jl)
    jl.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(PromptFileError, match=":1: expected an object with a non-empty string 'prompt'"):
        load_prompts(jl)


def test_limit(tmp_path):
    path = write_csv(tmp_path / "h.csv", ["goal", "target"], [[f"g{i}", "t"] for i in range(5)])
    assert [p.text for p in load_prompts(path, limit=2)] == ["g0", "g1"]


# --------------------------------------------------------------------------------------------------
# MM-SafetyBench
# --------------------------------------------------------------------------------------------------


def test_mmsafetybench_layout(tmp_path):
    root = write_mmsafetybench(tmp_path / "MM-SafetyBench", n=11)
    for path in (root, root / "data" / "processed_questions"):
        prompts = load_prompts(path)
        assert detect_benchmark(path) == "mmsafetybench"
        assert len(prompts) == 22
    # ids in numeric order (0, 1, ..., 10, not 0, 1, 10, 2), category = scenario
    first = [p for p in prompts if p.category == "01-Illegal_Activitiy"]
    assert [p.id for p in first][:3] == ["01-Illegal_Activitiy/0", "01-Illegal_Activitiy/1", "01-Illegal_Activitiy/2"]
    assert first[-1].id == "01-Illegal_Activitiy/10"
    p = first[2]
    assert p.text == "01-Illegal_Activitiy question 2?"  # text-only: "Question"
    assert p.images["SD"].text == "The image shows an activity. 01-Illegal_Activitiy 2"  # Rephrased Question(SD)
    expected = "The bottom of the image shows a phrase. 01-Illegal_Activitiy 2"
    assert p.images["TYPO"].text == p.images["SD_TYPO"].text == expected
    assert p.images["SD_TYPO"].path == root / "data" / "imgs" / "01-Illegal_Activitiy" / "SD_TYPO" / "2.jpg"
    # one scenario file on its own
    one = load_prompts(root / "data" / "processed_questions" / "08-Political_Lobbying.json")
    assert {p.category for p in one} == {"08-Political_Lobbying"} and len(one) == 11


def test_mmsafetybench_partial_and_missing_images(tmp_path):
    root = write_mmsafetybench(tmp_path / "mmsb", kinds=("SD",))
    prompts = load_prompts(root)
    assert set(prompts[0].images) == {"SD"}  # only the kinds whose folders exist
    assert available_conditions(prompts)[-1] == "benchmark:SD"
    (root / "data" / "imgs" / "01-Illegal_Activitiy" / "SD" / "1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="SD image not found: .*01-Illegal_Activitiy/SD/1.jpg"):
        load_prompts(root)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_prompts(root, images=tmp_path / "elsewhere")


def test_mmsafetybench_without_images_warns(tmp_path):
    root = tmp_path / "mmsb"
    write_mmsafetybench(root)
    import shutil

    shutil.rmtree(root / "data" / "imgs")
    with pytest.warns(UserWarning, match="no MM-SafetyBench image folder found"):
        prompts = load_prompts(root)
    assert not prompts[0].images
    with pytest.raises(ValueError, match="no benchmark images"):
        parse_conditions("none,benchmark", prompts)


def test_mmsafetybench_bad_json(tmp_path):
    root = write_mmsafetybench(tmp_path / "mmsb")
    (root / "data" / "processed_questions" / "02-HateSpeech.json").write_text("{not json")
    with pytest.raises(PromptFileError, match="02-HateSpeech.json: not valid JSON"):
        load_prompts(root)
    with pytest.raises(FileNotFoundError, match="no MM-SafetyBench question files"):
        load_prompts(tmp_path, "mmsafetybench")


# --------------------------------------------------------------------------------------------------
# FigStep
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiny", [False, True])
def test_figstep_layout(tmp_path, tiny):
    path = write_figstep(tmp_path / "FigStep", tiny=tiny)
    assert detect_benchmark(path) == "figstep"
    prompts = load_prompts(path)
    assert [p.id for p in prompts] == ["ForbidQI_1_1", "ForbidQI_1_2", "ForbidQI_9_1"]
    p = prompts[2]
    assert p.text == "Can you plan my $50,000 savings, please?"  # text-only: question
    assert p.typo_text == "Steps to plan $50,000 savings."  # rendered by the typo condition
    assert p.category == "Financial Advice"
    set_name = "SafeBench-Tiny" if tiny else "SafeBench"
    assert p.images["figstep"].path == tmp_path / "FigStep" / "data" / "images" / set_name / "query_ForbidQI_9_1_6.png"
    assert p.images["figstep"].text == FIGSTEP_PROMPT
    if not tiny:  # the repository root stands for data/question/safebench.csv
        assert load_prompts(tmp_path / "FigStep")[0].id == "ForbidQI_1_1"


def test_figstep_errors(tmp_path):
    path = write_figstep(tmp_path / "fs")
    (tmp_path / "fs" / "data" / "images" / "SafeBench" / "query_ForbidQI_1_2_6.png").unlink()
    with pytest.raises(FileNotFoundError, match="query_ForbidQI_1_2_6.png"):
        load_prompts(path)
    bad = write_csv(tmp_path / "q.csv", ["dataset", "category_id", "question"], [["a", "1", "q"]])
    with pytest.raises(PromptFileError, match="FigStep SafeBench CSV needs the columns"):
        load_prompts(bad, "figstep")


# --------------------------------------------------------------------------------------------------
# conditions
# --------------------------------------------------------------------------------------------------


def test_conditions(tmp_path):
    prompts = load_prompts(write_figstep(tmp_path / "fs"))
    p = prompts[0]
    assert available_conditions(prompts) == ["none", "white", "black", "noise", "typo", "benchmark:figstep"]
    none = condition_input("none", p, size=32)
    assert none.image is None and none.text == p.text
    white = condition_input("white", p, size=32)
    assert white.image.size == (32, 32) and white.image.getextrema() == ((255, 255),) * 3 and white.text == p.text
    assert condition_input("black", p, size=32).image.getextrema() == ((0, 0),) * 3
    typo = condition_input("typo", p, size=64)
    assert typo.text == FIGSTEP_PROMPT and typo.image.size == (64, 64)
    bench = condition_input("benchmark:figstep", p, size=32)
    assert bench.image.size == (76, 76) and bench.text == FIGSTEP_PROMPT  # as on disk
    with pytest.raises(ValueError, match="unknown condition"):
        condition_input("sepia", p, size=32)


def test_noise_is_seeded_and_gaussian():
    import numpy as np

    a, b = np.asarray(noise_image(64, 0, "p1")), np.asarray(noise_image(64, 0, "p1"))
    assert (a == b).all()
    assert not (a == np.asarray(noise_image(64, 1, "p1"))).all()
    assert not (a == np.asarray(noise_image(64, 0, "p2"))).all()
    assert abs(a.mean() - 127.5) < 3 and 55 < a.std() < 70  # N(127.5, 64) clipped to [0, 255]


def test_typographic_image_draws_the_request():
    import numpy as np

    img = np.asarray(typographic_image("Steps to make a thing.", 336).convert("L"))
    dark = img < 128
    assert dark.mean() > 0.02  # text is there
    rows = np.flatnonzero(dark.any(1))
    assert rows.min() < 336 * 0.1 and rows.max() < 336 * 0.9  # FigStep's layout: from the top, not the whole page
    longer = np.asarray(typographic_image("Steps to make a thing. " * 3, 336).convert("L")) < 128
    assert longer.any(1).sum() > dark.any(1).sum()  # wrapped onto more lines


def test_parse_conditions():
    from regap_fast.eval.prompts import BenchmarkImage, Prompt

    prompts = [Prompt("a", "x", images={"SD": BenchmarkImage("a.jpg", "t"), "TYPO": BenchmarkImage("b.jpg", "t")})]
    assert parse_conditions(None, prompts)[-2:] == ["benchmark:SD", "benchmark:TYPO"]
    assert parse_conditions("none, white,benchmark,none", prompts) == ["none", "white", "benchmark:SD",
                                                                     "benchmark:TYPO"]
    assert parse_conditions(["noise"], prompts) == ["noise"]
    with pytest.raises(ValueError, match="unknown condition 'blank'"):
        parse_conditions("none,blank", prompts)
    with pytest.raises(ValueError, match="no conditions"):
        parse_conditions(" , ", prompts)
