"""toy/miniature.py: the task by hand, the data it writes, and the whole pipeline in --quick mode (the pipeline and
the table's form, not the scientific outcome: that is the README's 3-seed table)."""
import json
import re

import data
from toy import miniature


def test_worked_thought_is_column_addition_by_hand():
    assert miniature.worked_thought(4721, 3856) == "4721+3856\n1+6=7 7\n2+5=7 77\n7+8=15 577\n4+3+1=8 8577"
    # the last column keeps its carry: 5678 + 4567 = 10245
    assert miniature.worked_thought(5678, 4567) == \
        "5678+4567\n8+7=15 5\n7+6+1=14 45\n6+5+1=12 245\n5+4+1=10 10245"
    assert miniature.worked_thought(12, 7).splitlines()[-1] == "1+0=1 19"  # unequal lengths: a missing digit is 0


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


def test_the_data_keeps_images_out_of_post_training_and_twins_in_evaluation(tmp_path):
    args = miniature.parse_args(["--quick"])
    files = miniature.write_data(tmp_path, args, seed=3)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in files.items()}
    assert not any("images" in r or "<image" in json.dumps(r) for k in ("sft", "rl", "control") for r in rows[k])
    # the control spends the budget of stages 1 and 2: SFT sequences plus GRPO's 16 prompts x 8 samples a step
    assert len(rows["control"]) == args.sft_epochs * args.sft_problems + 16 * 8 * args.grpo_steps
    for r in rows["control"]:  # direct answers: no thought
        a, b = re.findall(r"([0-9]+)[+]([0-9]+)", r["messages"][0]["content"])[0]
        assert r["messages"][1]["content"] == f"<answer>{int(a) + int(b)}</answer>"
    for split in ("test", "val"):
        text, image = rows[f"{split}-text"], rows[f"{split}-image"]
        assert [(t["id"], t["answer"]) for t in text] == [(i["id"], i["answer"]) for i in image]
        assert all((tmp_path / i["images"][0]).exists() and i["question"] == "What is <image 1>?" for i in image)
    held_out = {r["id"] for s in ("test", "val") for r in rows[f"{s}-text"]}
    trained = {re.findall(r"[0-9]+[+][0-9]+", json.dumps(r))[0] for k in ("base", "sft", "rl", "control")
               for r in rows[k]}
    assert not held_out & trained and len(held_out) == 2 * args.eval_items


def test_quick_runs_every_stage_and_writes_the_table(tmp_path):
    results = miniature.main(["--out", str(tmp_path), "--quick"])
    for stage in ("base", "sft", "grpo", "control"):
        assert (tmp_path / "seed0" / stage / "final" / "config.json").exists()
        for split in ("val", "test"):
            for modality in ("text", "image"):
                r = results[0][stage][split][modality]
                assert 0 <= r["accuracy"] <= 100 and 0 <= r["thought"] <= 100 and r["tokens"] > 0
                records = (tmp_path / "seed0" / "eval" / stage / f"{split}-{modality}" / "custom.jsonl").read_text()
                assert len(records.splitlines()) == 16
                settings = tmp_path / "seed0" / "eval" / stage / f"{split}-{modality}" / "custom.settings.json"
                assert json.loads(settings.read_text())["max_pixels"] == 0  # images as sized in training
    table = (tmp_path / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "model" not in line]
    assert len(rows) == 8 and all(len(re.findall(r"\d+\.\d", line)) == 3 for line in rows)  # 4 models x 2 splits
    saved = json.loads((tmp_path / "results.json").read_text())["results"]["0"]
    assert saved["grpo"]["test"] == results[0]["grpo"]["test"]
