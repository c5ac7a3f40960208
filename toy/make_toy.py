"""Regenerate the bundled toy data (deterministic): python toy/make_toy.py

- sft.jsonl      OpenThoughts-114k schema; the learnable task "What is a + b?" with single digits.
- rl.json        Orz-math-57k schema; the same task, answers verified by rewards.math_reward.
- mathvista.json real MathVista testmini annotations (a few items of every question/answer type) whose
                 images (images/<pid>.png) are drawn here, since the real images are not shipped.
"""
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SHARED_MATHVISTA = HERE.parent.parent / "shared" / "data" / "mathvista_testmini.json"
OPENTHOUGHTS_SYSTEM = ("Your role as an assistant involves thoroughly exploring questions through a systematic "
                       "long thinking process before providing the final precise and accurate solutions.")
MATHVISTA_PIDS = ["1", "2", "4", "5", "10", "19", "74", "84", "225"]


def addition_items(seed):
    items = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(items)
    return items


def sft_row(a, b):
    thought = f"I need {a} + {b}. Adding: {a} + {b} = {a + b}."
    reply = (f"<|begin_of_thought|>\n\n{thought}\n\n<|end_of_thought|>\n\n"
             f"<|begin_of_solution|>\n\n{a + b}\n\n<|end_of_solution|>")
    return {"system": OPENTHOUGHTS_SYSTEM, "conversations": [
        {"from": "user", "value": f"What is {a} + {b}?"}, {"from": "assistant", "value": reply}]}


def orz_row(a, b):
    return [{"from": "human", "value": f"What is {a} + {b}?"},
            {"from": "assistant", "ground_truth": {"value": str(a + b)}}]


def draw_image(pid, row):
    """A stand-in picture: the question's numbers and the choices drawn as text on a coloured card."""
    rng = random.Random(int(pid))
    img = Image.new("RGB", (rng.choice([84, 112, 140]), rng.choice([84, 112])), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    draw.rectangle([4, 4, img.width - 5, img.height - 5], outline=(rng.randrange(200), 60, 160), width=3)
    draw.text((10, 10), f"#{pid}", fill=(0, 0, 0))
    for i, choice in enumerate((row["choices"] or [])[:4]):
        draw.text((10, 24 + 12 * i), str(choice)[:12], fill=(30, 30, 120))
    return img


def main():
    with open(HERE / "sft.jsonl", "w") as f:
        for a, b in addition_items(seed=0):
            f.write(json.dumps(sft_row(a, b)) + "\n")
    rows = [json.dumps(orz_row(a, b)) for a, b in addition_items(seed=1)]
    (HERE / "rl.json").write_text("[\n" + ",\n".join(rows) + "\n]\n")
    annotations = json.loads(SHARED_MATHVISTA.read_text())
    (HERE / "images").mkdir(exist_ok=True)
    rows = {}
    for pid in MATHVISTA_PIDS:
        row = dict(annotations[pid], image=f"images/{pid}.png")
        draw_image(pid, row).save(HERE / row["image"])
        rows[pid] = row
    (HERE / "mathvista.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
