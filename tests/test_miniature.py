"""toy/miniature.py: the task by hand, the data it writes, the rotary choice it makes, and the whole pipeline in
--quick mode (the pipeline and the table's form, not the scientific outcome: that is the README's 3-seed table)."""
import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest
import torch

import data
from plumbing import tiny
from toy import miniature


def test_worked_thought_is_column_addition_by_hand():
    # 1+6=7, 2+5=7, 7+8=15 (carry 1), 4+3+1=8
    assert miniature.worked_thought(4721, 3856) == "4721+3856\n472+385 c0 7\n47+38 c0 77\n4+3 c1 577\n8577"
    # the last column keeps its carry: 5678 + 4567 = 10245
    assert miniature.worked_thought(5678, 4567) == "5678+4567\n567+456 c1 5\n56+45 c1 45\n5+4 c1 245\n10245"
    assert miniature.worked_thought(12, 7) == "12+7\n1+ c0 9\n19"  # unequal lengths: a missing digit is 0
    assert miniature.worked(99, 1).endswith("</think>\n<answer>100</answer>")


def test_reading_scores_the_restated_sum_and_each_operand():
    assert miniature.reading("4721+3856", "4721+3856") == (True, True, True)
    assert miniature.reading(" 9278+3856 ", "4721+3856") == (False, False, True)  # the miss seen most often
    assert miniature.reading("4721+385", "4721+3856") == (False, True, False)
    assert miniature.reading("47213856", "4721+3856") == (False, False, False)
    assert miniature.reading("", "4721+3856") == (False, False, False)


def test_carrying_on_needs_the_restated_sum_and_the_line_read_off_it():
    # 4721+3856: the units column is 1+6 = 7, no carry, so the next line drops each operand's last digit
    assert miniature.carried_on(["4721+3856", " 472+385 c0 7 ", "47+38 c0 77"], "4721+3856")
    assert miniature.carried_on(["4721+3856", "472+385 c0 7"], "4721+3856")
    assert not miniature.carried_on(["4721+3856", "477+385 c0 7"], "4721+3856")  # a digit taken from elsewhere
    assert not miniature.carried_on(["4721+3856", "472+385 c1 7"], "4721+3856")  # a carry where none is
    assert not miniature.carried_on(["9278+3856", "927+385 c1 4"], "4721+3856")  # right step, wrong sum read
    assert not miniature.carried_on(["4721+3856"], "4721+3856")  # the base's one-line thought
    assert not miniature.carried_on([], "4721+3856")


def test_problems_are_disjoint_and_the_test_split_does_not_move():
    test, train = miniature.problems(0, 4, [50, 500])
    assert not set(test) & set(train) and len(set(train)) == 500
    assert all(1000 <= a <= 9999 and 1000 <= b <= 9999 for a, b in test + train)
    assert miniature.problems(0, 4, [50, 5000])[0] == test  # growing a training set keeps the held-out items


def test_a_drawn_sum_is_one_visual_token_per_character(tmp_path):
    """28-pixel cells: 2x2 patches of 14 pixels, one token after Qwen2.5-VL's merge."""
    processor = data.load_processor("tiny")
    miniature.render("4721+3856", tmp_path / "sum.png")
    picture = data.load_image(tmp_path / "sum.png")
    assert picture.size == (9 * 28, 28)
    grid = processor.image_processor(images=[picture], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert grid == [1, 2, 18] and grid[1] * grid[2] // 4 == 9


def rotation_between_columns(path):
    """The largest angle (radians) by which the language model's rotary embedding turns one image token against
    its right neighbour (same row and frame): how well attention can tell two columns apart by position."""
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
    rotary = Qwen2_5_VLRotaryEmbedding(AutoConfig.from_pretrained(path).text_config)
    positions = torch.tensor([[[5, 5]], [[5, 5]], [[5, 6]]])  # (t, h, w) x batch 1 x 2 tokens
    cos, sin = rotary(torch.zeros(1, 2, 8), positions)
    angles = torch.atan2(sin[0], cos[0])
    return (angles[1] - angles[0]).abs().max().item()


def test_the_width_axis_gets_the_high_rotary_frequencies_only_when_asked(tmp_path):
    """Qwen2.5-VL's split (t, h, w take the bands in that order) leaves the width axis the lowest frequencies:
    two neighbouring columns differ by theta^(-10/16) = 1.8e-4 radians at most for a 32-wide head, by hand; with
    every frequency on the width axis, by the highest one, 1 radian."""
    shape = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    tiny.build(tmp_path / "qwen", text=shape)
    tiny.build(tmp_path / "width", text=shape, sections=[0, 0, 16])
    assert rotation_between_columns(tmp_path / "qwen") < 1e6 ** (-10 / 16) + 1e-6
    assert abs(rotation_between_columns(tmp_path / "width") - 1.0) < 1e-5
    try:
        tiny.build(tmp_path / "bad", text=shape, sections=[4, 6, 7])
    except ValueError as e:
        assert "adding up to 16" in str(e)
    else:
        raise AssertionError("sections that do not add up to the head's frequencies were accepted")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_data_keeps_images_out_of_post_training_and_twins_in_evaluation(tmp_path):
    args = miniature.parse_args(["--quick"])
    files = miniature.write_data(tmp_path, args, seed=3)
    rows = {name: read(path) for name, path in files.items()}
    text_only = ("language", "sft", "rl", "control")
    assert not any("images" in r or "<image" in json.dumps(r) for k in text_only for r in rows[k])
    assert all("images" in r for r in rows["align"]) and sum("images" in r for r in rows["joint"]) == 3 * len(
        rows["align"])
    halves = [r for r in rows["joint"] if re.search(r"[0-9]\+<image 1>|<image 1>\+[0-9]", r["messages"][0]["content"])]
    assert len(halves) == len(rows["align"])  # one operand drawn (that operand alone in the picture), one typed
    for r in halves:
        a, b = re.findall(r"<think>\n([0-9]+)[+]([0-9]+)\n", r["messages"][1]["content"])[0]
        drawn = a if "<image 1>+" in r["messages"][0]["content"] else b
        assert r["images"] == [f"images/{drawn}.png"] and (tmp_path / r["images"][0]).exists()
    # the control spends the budget of stages 1 and 2: SFT sequences plus GRPO's prompts x samples a step; by hand:
    # (32 x 1,000 + 16 x 8 x 30) / 32 = 1,120 steps; --quick: (32 x 3 + 4 x 4 x 2) / 32 = 4
    assert (miniature.control_steps(miniature.parse_args([])), miniature.control_steps(args)) == (1120, 4)
    for r in rows["control"]:  # direct answers: the sum restated, no working
        a, b = re.findall(r"<think>\n([0-9]+)[+]([0-9]+)\n</think>", r["messages"][1]["content"])[0]
        assert r["messages"][1]["content"].endswith(f"<answer>{int(a) + int(b)}</answer>")
    for r in rows["sft"]:
        a, b = map(int, re.findall(r"[0-9]+", r["question"])[:2])
        assert r["response"] == miniature.worked(a, b) or r["response"] == miniature.worked(b, a)
    assert len({re.sub(r"[0-9]+", "N", r["question"]) for r in rows["sft"]}) > 3  # several phrasings
    for split in ("test", "val"):
        text, image = rows[f"{split}-text"], rows[f"{split}-image"]
        assert [(t["id"], t["answer"]) for t in text] == [(i["id"], i["answer"]) for i in image]
        assert all(t["question"] == f"What is {t['id']}?" for t in text)
        assert all((tmp_path / i["images"][0]).exists() and i["question"] == "What is <image 1>?" for i in image)
    # the base's tie is read on the validation sums half drawn: first operand drawn, then second, in turn
    half = rows["val-half"]
    assert [r["id"] for r in half] == [r["id"] for r in rows["val-text"]]
    for i, r in enumerate(half):
        a, b = r["id"].split("+")
        drawn, typed = (a, b) if i % 2 == 0 else (b, a)
        assert r["images"] == [f"images/{drawn}.png"] and typed in r["question"] and drawn not in r["question"]
    held_out = {r["id"] for s in ("test", "val") for r in rows[f"{s}-text"]}
    trained = set()
    for k in ("joint", "sft", "rl", "control"):
        for r in rows[k]:
            a, b = map(int, re.findall(r"[0-9]+", r["messages"][-1]["content"] if "messages" in r else r["question"])[:2])
            trained |= {f"{a}+{b}", f"{b}+{a}"}
    assert not held_out & trained and len(held_out) == 2 * args.eval_items


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """--quick --study on seed 0: levels 0 and 1 of the quick model's 2 decoder layers (the chart's seeds and means:
    test_study_chart_by_hand)."""
    out = tmp_path_factory.mktemp("study")
    return out, miniature.main(["--out", str(out), "--quick", "--study", "--seeds", "0"])


def test_study_shares_the_base_and_freezes_each_level(study):
    out, results = study
    assert set(results) == {0} and set(results[0]) == {0, 1}
    for level, where in ((0, out / "seed0"), (1, out / "seed0" / "freeze1")):
        for stage in ("sft", "grpo", "control"):
            run = json.loads((where / stage / "args.json").read_text())["args"]
            assert run["freeze_layers"] == level and run["model"].startswith(str(out / "seed0"))
    assert not (out / "seed0" / "freeze1" / "base").exists()  # one base per seed
    base, frozen = (data.load_model(str(out / "seed0" / p / "final")).state_dict() for p in ("base", "freeze1/sft"))
    assert all(torch.equal(base[k], frozen[k]) for k in base if ".layers.0." in k)
    assert any(not torch.equal(base[k], frozen[k]) for k in base if ".layers.1." in k)
    text = (out / "results.md").read_text()
    assert "| 0 | " in text and "| 1 | " in text and "min on this machine" in text
    circles = ET.parse(str(out / "results.svg")).getroot().iter("{http://www.w3.org/2000/svg}circle")
    assert len(list(circles)) == 1 * 2 * (3 + 2 + 2)  # seed x levels x (image accuracy, restated, text accuracy)


def test_study_chart_and_table_by_hand():
    """Three seeds at two levels, made up: one dot per seed, model and level; each line is the seeds' mean; the
    table gives mean (min-max) of the same numbers, and the text accuracy of stage 1 and GRPO."""
    def scores(acc, read, text=0.0):
        return {"test": {"image": {"accuracy": acc, "read": read}, "text": {"accuracy": text}}}
    results = {seed: {level: {"sft": scores(10 * seed + level, 50, 70 - 30 * level + seed),
                              "grpo": scores(20 + seed, 60 + level, 80), "control": scores(1.0, 0)}
                      for level in (0, 2)} for seed in (0, 1, 2)}
    rows = miniature.study_table(results, [0, 2], "test").splitlines()
    assert rows[3] == ("| 2 | 12.0 (2.0-22.0) | 21.0 (20.0-22.0) | 1.0 (1.0-1.0) | 50.0 (50.0-50.0) | 62.0 (62.0-62.0) "
                       "| 11.0 (10.0-12.0) | 80.0 (80.0-80.0) |")
    svg = ET.fromstring(miniature.study_chart(results, [0, 2]))
    ns = "{http://www.w3.org/2000/svg}"
    # seeds x levels x (3 image accuracy + 2 restated + 2 text accuracy)
    assert len(list(svg.iter(ns + "circle"))) == 3 * 2 * (3 + 2 + 2)
    lines = [(p.get("data-label"), p.get("data-y")) for p in svg.iter(ns + "polyline")]
    assert lines == [("stage 1 (text SFT)", "10.0,12.0"), ("+ GRPO (text)", "21.0,21.0"),
                     ("control (direct answers)", "1.0,1.0"), ("stage 1 (text SFT)", "50.0,50.0"),
                     ("+ GRPO (text)", "60.0,62.0"), ("stage 1 (text SFT)", "71.0,11.0"),
                     ("+ GRPO (text)", "80.0,80.0")]
    # every panel a percentage on 0-100 (1% must not fill a panel), one x tick per level 0, 1, 2
    labels = [t.text for t in svg.iter(ns + "text")]
    assert labels.count("100") == 3 and labels.count("0") == 6 and labels.count("1") == 3 and "0.5" not in labels


def test_quick_runs_every_stage_and_writes_the_table(study):
    tmp_path, _ = study  # seed 0's stages, reused: the single run is level 0 of the study
    results = miniature.main(["--out", str(tmp_path), "--quick"])
    seed = tmp_path / "seed0"
    config = json.loads((seed / "init" / "config.json").read_text())["text_config"]
    assert config["rope_parameters"]["mrope_section"] == [0, 0, 16]
    for stage in ("language", "align", "base", "sft", "grpo", "control"):
        assert (seed / stage / "final" / "config.json").exists()
    # the alignment trained the vision tower alone; stage 1 left the token embeddings alone
    lm, aligned = (data.load_model(str(seed / s / "final")).state_dict() for s in ("language", "align"))
    assert all(torch.equal(lm[k], aligned[k]) for k in lm if ".visual." not in k)
    base, sft = (data.load_model(str(seed / s / "final")).state_dict() for s in ("base", "sft"))
    assert all(torch.equal(base[k], sft[k]) for k in base if "embed_tokens" in k or ".visual." in k)
    # every SFT part draws its batches at random; stage 1 and the control share their lr; the control sees as many
    # sequences as stages 1 and 2: 3 steps x 32 + 2 GRPO steps x 4 prompts x 4 samples (--quick) = 128 = 4 x 32
    for stage, lr, steps in (("base", 1e-3, 3), ("sft", 5e-4, 3), ("control", 5e-4, 4)):
        run = json.loads((seed / stage / "args.json").read_text())["args"]
        assert (run["window"], run["lr"], run["max_steps"]) == (1, lr, steps)
    for stage in ("base", "sft", "grpo", "control"):
        for split in ("val", "test"):
            for modality in ("text", "image"):
                r = results[0][stage][split][modality]
                assert all(0 <= r[k] <= 100 for k in ("accuracy", "thought", "read", "read_first", "read_second",
                                                      "carried"))
                assert r["read"] <= min(r["read_first"], r["read_second"]) and r["tokens"] > 0
                assert r["carried"] <= r["read"]
                where = seed / "eval" / stage / f"{split}-{modality}"
                assert len((where / "custom.jsonl").read_text().splitlines()) == 16
                assert json.loads((where / "custom.settings.json").read_text())["max_pixels"] == 0
    table = (tmp_path / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "model" not in line
            and "seed" not in line]
    seeds = [line for line in rows if line.startswith("| 0 |")]
    assert len(seeds) == 1 and len(re.findall(r"\d+ / \d+", seeds[0])) == 4  # text / image for 4 models
    rows = [line for line in rows if line not in seeds]
    assert len(rows) == 8 and all(len(re.findall(r"\d+\.\d", line)) == 6 for line in rows)  # 4 models x 2 splits
    saved = json.loads((tmp_path / "results.json").read_text())["results"]["0"]
    assert saved["grpo"]["test"] == results[0]["grpo"]["test"]


def test_study_levels_are_checked_before_anything_runs(capsys):
    assert miniature.parse_args(["--study"]).study == "freeze"  # the first study, as before
    args = miniature.parse_args(["--study", "base"])
    assert args.levels == [int(k) for k in miniature.BASE_LEVELS.split(",")] and args.seeds == [0, 1, 2]
    for bad, why in (("1600,400", "increasing"), ("0,400", "positive"), ("400,400", "increasing"), ("4e2", "whole")):
        with pytest.raises(SystemExit):
            miniature.parse_args(["--study", "base", "--levels", bad])
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a freeze level must be a layer the model has
        miniature.parse_args(["--study", "--levels", "4"])


def test_a_stage_cut_short_resumes_from_its_newest_step_and_ends_where_an_uninterrupted_one_does(tmp_path, capsys):
    """A study spans hours, and a machine's session may end in the middle of a stage: stage() saves a step every
    `every` steps and, called again, resumes from the newest one instead of starting over. Here a 4-step SFT stage
    killed after its step-2 checkpoint (final/ gone, step_2 left) is resumed and ends on the weights of the run
    that went straight through."""
    import sft

    def part(steps):
        return lambda out: sft.main(["--model", "tiny", "--data", "toy", "--max-steps", str(steps), "--global-batch",
                                     "4", "--micro-batch", "4", "--epochs", "1", "--seed", "0", *out])
    straight = miniature.stage("straight", tmp_path / "straight", part(4), every=2)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "straight", cut)  # as a kill after step 3 leaves it: step_2 saved, no final/
    shutil.rmtree(cut / "final")
    assert [p.name for p in cut.glob("step_*")] == ["step_2"]
    (cut / "kept").write_text("a fresh start (--overwrite) would clear the directory")
    capsys.readouterr()
    resumed = miniature.stage("cut", cut, part(4), every=2)
    assert "cut ... resuming from step_2" in capsys.readouterr().err and (cut / "kept").exists()
    a, b = (data.load_model(str(path)).state_dict() for path in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert miniature.stage("cut", cut, None) == resumed  # finished: reused, nothing run
    with pytest.raises(SystemExit, match="run the same command again to resume it"):
        miniature.stage("never ends", tmp_path / "never", lambda out: None)


def test_centred_similarity_by_hand():
    """Two items, one layer, 2-wide states. Text (1, 0), (-1, 0); image (1, 1), (-1, 1): the image adds (0, 1) to
    both. The mean of all four is (0, 0.5), so text - mean = (1, -0.5), (-1, -0.5) and image - mean = (1, 0.5),
    (-1, 0.5): cos = (1 - 0.25) / 1.25 = 0.6 for each item (uncentred it would be 1/sqrt(2) = 0.707)."""
    text, image = torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]]), torch.tensor([[[1.0, 1.0]], [[-1.0, 1.0]]])
    assert miniature.centred_similarity(text, image) == pytest.approx(0.6, abs=1e-6)
    assert miniature.centred_similarity(text, text) == pytest.approx(1.0, abs=1e-6)
    assert miniature.centred_similarity(text, text.flip(0)) == pytest.approx(-1.0, abs=1e-6)  # twins swapped


@pytest.fixture(scope="module")
def base_study(study, tmp_path_factory):
    """--quick --study base on seed 0 at base c's steps 3 and 6, from the freeze study's base a and b (copied: the
    same seed and settings give the same parts, and a copy is reused as a finished stage)."""
    first, _ = study
    out = tmp_path_factory.mktemp("study2")
    for part in ("init", "language", "align"):
        shutil.copytree(first / "seed0" / part, out / "seed0" / part)
    return out, miniature.main(["--out", str(out), "--quick", "--study", "base", "--levels", "3,6", "--seeds", "0"])


def test_base_study_trains_one_base_c_and_post_trains_each_checkpoint(study, base_study):
    first, _ = study
    out, results = base_study
    seed = out / "seed0"
    assert set(results) == {0} and set(results[0]) == {3, 6}
    assert not (seed / "base").exists() and (seed / "joint" / "step_3" / "config.json").exists()
    joint = json.loads((seed / "joint" / "args.json").read_text())["args"]
    assert (joint["max_steps"], joint["save_every"], joint["keep"]) == (6, 3, 0)
    assert joint["warmup"] * 6 == pytest.approx(0.05 * 3)  # the warm-up of the shortest level, in steps
    for level, base in ((3, seed / "joint" / "step_3"), (6, seed / "joint" / "final")):
        for stage in ("sft", "control"):
            run = json.loads((seed / f"joint{level}" / stage / "args.json").read_text())["args"]
            assert run["model"] == str(base) and run["freeze_layers"] == 0
        tie = results[0][level]["tie"]
        assert 0 <= tie["half_read"] <= 100 and -1 <= tie["twin_similarity"] <= 1
        records = (seed / f"joint{level}" / "eval" / "tie" / "val-half" / "custom.jsonl").read_text().splitlines()
        assert len(records) == 16
    # a shorter level's base is the first steps of the longer run: step 3 of the 6-step run is, weight for weight,
    # the 3-step base c the freeze study trained from the same base b
    nested = data.load_model(str(seed / "joint" / "step_3")).state_dict()
    single = data.load_model(str(first / "seed0" / "base" / "final")).state_dict()
    assert all(torch.equal(nested[k], single[k]) for k in single)
    longer = data.load_model(str(seed / "joint" / "final")).state_dict()
    assert any(not torch.equal(nested[k], longer[k]) for k in nested)
    text = (out / "results.md").read_text()
    assert "| base c steps | base's tie" in text and "| 0 | 3 | " in text and "| 0 | 6 | " in text
    circles = list(ET.parse(str(out / "results.svg")).getroot().iter("{http://www.w3.org/2000/svg}circle"))
    assert len(circles) == 2 * (3 + 2 + 2) + 2 * 2  # levels x (3 panels' dots) + the tie panel: 2 models x 2 bases


def test_twin_similarity_is_one_for_a_text_twin_and_lower_for_another_item(study, tmp_path):
    """The measure against its two ends: the text items given as their own twins give 1 (the same states); each
    item paired with another item's text gives less."""
    first, _ = study
    base, rows = first / "seed0" / "base" / "final", first / "seed0" / "data" / "val-text.jsonl"
    assert miniature.twin_similarity(base, rows, rows) == pytest.approx(1.0, abs=1e-5)
    items = rows.read_text().splitlines()
    shifted = tmp_path / "shifted.jsonl"
    shifted.write_text("\n".join(items[1:] + items[:1]) + "\n")
    assert miniature.twin_similarity(base, rows, shifted) < 0.5


def test_base_study_chart_and_table_by_hand():
    """Two seeds at base c steps 400 and 1600, made up: the table opens with each level's tie, mean (min-max); the
    fourth panel puts each seed's image accuracy at its own base's twin similarity."""
    def scores(acc, read=0.0, text=0.0, carried=0.0):
        return {"test": {"image": {"accuracy": acc, "read": read, "carried": carried}, "text": {"accuracy": text}}}
    results = {seed: {level: {"tie": {"half_read": 90.0 + seed + level / 400, "twin_similarity": 0.1 * seed + level / 4000},
                              "sft": scores(seed + level / 100, read=30.0 + seed, carried=level / 400),
                              "grpo": scores(2.0 * seed), "control": scores(0.0)}
                      for level in (400, 1600)} for seed in (0, 1)}
    rows = miniature.study_table(results, [400, 1600], "test", "base").splitlines()
    assert rows[0].startswith("| base c steps | base's tie (validation): half-drawn sums read % | twin similarity |")
    assert rows[3].startswith("| 1600 | 94.5 (94.0-95.0) | 0.450 (0.400-0.500) | 16.5 (16.0-17.0) | 1.0 (0.0-2.0) |")
    # each seed's bases: seed 1 at 1600 steps has half_read 90 + 1 + 4, similarity 0.1 + 0.4, stage 1 image accuracy
    # 1 + 16, GRPO 2, control 0, stage 1 restating 31, carrying on 1600 / 400
    seeds = miniature.tie_per_seed(results, [400, 1600]).splitlines()
    assert seeds[0].endswith("| stage 1's image thoughts restating the sum % | ... and the next line right % |")
    assert seeds[5] == "| 1 | 1600 | 95 | 0.500 | 17 | 2 | 0 | 31 | 4 |"
    svg = ET.fromstring(miniature.study_chart(results, [400, 1600], kind="base"))
    ns = "{http://www.w3.org/2000/svg}"
    dots = [(c.get("data-label"), float(c.get("data-x")), float(c.get("data-y"))) for c in svg.iter(ns + "circle")]
    assert len(dots) == 2 * 2 * (3 + 2 + 2) + 2 * 2 * 2
    assert sorted(d for d in dots[-8:] if d[0] == "stage 1 (text SFT)") == [
        ("stage 1 (text SFT)", 0.1, 4.0), ("stage 1 (text SFT)", 0.2, 5.0), ("stage 1 (text SFT)", 0.4, 16.0),
        ("stage 1 (text SFT)", 0.5, 17.0)]
