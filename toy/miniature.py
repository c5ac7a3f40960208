"""The paper's transfer claim in miniature: reasoning learned from text alone, measured on the same problems as images.

X-Reasoner (arXiv 2505.03981) post-trains a vision-language model on text only and finds the reasoning carries
over to image inputs. This script replays that on a laptop CPU with the repository's own stages:

    0. a small Qwen2.5-VL (the real classes; random init) is trained by sft.py to *read* images of sums
       (image -> "4721+3856"), then also to *answer directly*, without thinking, in both modalities: the
       stand-in for the instruction-tuned base VLM, which can already read images
    1. X-Reasoner's stage 1 on text only: sft.py on worked digit-by-digit thoughts in <think>/<answer>
    2. X-Reasoner's stage 2 on text only: grpo.py with the 1/0 reward
    control: the base trained on as many more text sequences, answered directly (the same budget, no thoughts)

Then evaluate.py (greedy, forced exit) scores every model on held-out sums written as text and drawn as images
(each image the exact twin of a text item), and counts the image answers that carry a chain of thought.
Settings are to be chosen on the validation split; the table reports the test split. Status (README, "The
transfer claim in miniature"): at these settings the model learns to read the images but not the worked
thought, so the claim is not yet tested.

    python toy/miniature.py --out runs/miniature                 # one seed, the README's settings
    python toy/miniature.py --out runs/miniature --seeds 0,1,2   # the README's table: three seeds, mean (range)
    python toy/miniature.py --out runs/mini --quick              # the pipeline end to end in ~1 minute

Deliberate simplifications: one task (addition), one font, a model of a few million parameters trained for
minutes. A rerun reuses each stage whose final checkpoint exists.
"""
import argparse
import contextlib
import io
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import evaluate  # noqa: E402
import grpo  # noqa: E402
import sft  # noqa: E402
from toy import tiny  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/miniature", help="data, checkpoints, evaluations, results.md")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; the table gives mean (min-max)")
    ap.add_argument("--quick", action="store_true", help="a small model and budgets: the pipeline, not the result")
    # the task (ours): a + b with `digits`-digit operands, the expression drawn one character per 28-pixel cell
    ap.add_argument("--digits", type=int, default=3, help="digits per operand (ours; 4 was not learned, README)")
    ap.add_argument("--eval-items", type=int, default=100, help="held-out sums per split, validation and test")
    # the model (ours): a few million parameters, Qwen2.5-VL's classes
    ap.add_argument("--hidden", type=int, default=192, help="text hidden size (vision: --vision-hidden)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--vision-hidden", type=int, default=128, help="vision tower width (depth 3, full attention)")
    # budgets (ours, chosen on the validation split)
    ap.add_argument("--base-problems", type=int, default=3000, help="sums for the base's reading/direct rows")
    ap.add_argument("--read-epochs", type=int, default=6, help="passes over the reading rows alone (base, part 1)")
    ap.add_argument("--base-epochs", type=int, default=2, help="passes over the base's mixed rows (part 2)")
    ap.add_argument("--sft-problems", type=int, default=3000, help="sums with worked thoughts, stage 1")
    ap.add_argument("--sft-epochs", type=int, default=8, help="passes over them")
    ap.add_argument("--grpo-steps", type=int, default=30, help="GRPO steps, stage 2 (16 prompts x 8 samples)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, every SFT stage")
    ap.add_argument("--grpo-lr", type=float, default=1e-4, help="AdamW learning rate, GRPO")
    args = ap.parse_args(argv)
    if args.quick:  # the pipeline in ~2 minutes: every stage runs, nothing is learned to speak of
        args.digits, args.eval_items, args.hidden, args.layers, args.vision_hidden = 2, 16, 64, 2, 32
        args.base_problems, args.base_epochs, args.sft_problems, args.sft_epochs, args.grpo_steps = 96, 1, 64, 1, 2
        args.read_epochs = 1
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


# ----------------------------------------------------------------------------------------------------
# The task: sums, their worked thoughts, and their pictures

def problems(seed, digits, counts):
    """Disjoint lists of (a, b), `counts` of them in order (test first, so its items do not move when the
    training sets grow)."""
    rng, seen, out = random.Random(seed), set(), []
    low, high = 10 ** (digits - 1), 10 ** digits - 1
    for n in counts:
        part = []
        while len(part) < n:
            pair = (rng.randint(low, high), rng.randint(low, high))
            if pair not in seen:
                seen.add(pair)
                part.append(pair)
        out.append(part)
    return out


def expression(a, b):
    return f"{a}+{b}"


def worked_thought(a, b):
    """Column addition from the right, one line per column, each line ending with the digits found so far:
    '4721+3856 / 1+6=7 7 / 2+5=7 77 / 7+8=15 577 / 4+3+1=8 8577'. The thought opens by restating the sum, as
    the text is there to copy; on an image the same line has to be read."""
    xs, ys, carry, found, lines = str(a)[::-1], str(b)[::-1], 0, "", [expression(a, b)]
    for k in range(max(len(xs), len(ys))):
        x, y = int(xs[k]) if k < len(xs) else 0, int(ys[k]) if k < len(ys) else 0
        total = x + y + carry
        last = k == max(len(xs), len(ys)) - 1
        found = (str(total) if last else str(total % 10)) + found
        lines.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total} {found}")
        carry = total // 10
    assert int(found) == a + b
    return "\n".join(lines)


FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"  # Pillow's own font where this one is absent


def render(text, path, cell=28):
    """One character per 28-pixel cell (one visual token after Qwen2.5-VL's 2x2 merge), a bold monospace font at
    26 px: smaller or thinner glyphs stayed unread for minutes in the probe that issue #16 reports."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.truetype(FONT, 26) if Path(FONT).exists() else ImageFont.load_default(size=26)
    picture = Image.new("L", (cell * len(text), cell), 255)
    draw = ImageDraw.Draw(picture)
    for i, char in enumerate(text):
        draw.text((i * cell + cell / 2, cell / 2), char, font=font, fill=0, anchor="mm")
    picture.convert("RGB").save(path)


QUESTION = "What is {}?"  # the text item; its image twin asks "What is <image 1>?" with the sum drawn


def chat(question, reply, image=None):
    """A chat row for sft.py, asked through the paper's training prompt as written (the base's rows)."""
    row = {"messages": [{"role": "user", "content": data.TRAIN_PROMPT.format(question=question)},
                        {"role": "assistant", "content": reply}]}
    return row | ({"images": [image]} if image else {})


def write_data(folder, args, seed):
    """Every stage's rows and both evaluation splits, as JSONL in `folder` (images in folder/images)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    test, val, base, xr, rl, control = problems(seed, args.digits, [args.eval_items, args.eval_items,
                                                                    args.base_problems, args.sft_problems,
                                                                    16 * args.grpo_steps, args.sft_problems])

    def picture(a, b):
        name = f"images/{a}+{b}.png"
        if not (folder / name).exists():
            render(expression(a, b), folder / name)
        return name
    rows = {"read": [], "base": [], "sft": [], "rl": [], "control": []}
    for a, b in base:  # reading, direct answers on text, direct answers on the image
        rows["read"].append({"messages": [{"role": "user", "content": "Read <image 1>."},
                                          {"role": "assistant", "content": expression(a, b)}], "images": [picture(a, b)]})
        rows["base"] += [rows["read"][-1], chat(QUESTION.format(expression(a, b)), f"<answer>{a + b}</answer>"),
                         chat(QUESTION.format("<image 1>"), f"<answer>{a + b}</answer>", picture(a, b))]
    rows["sft"] = [{"question": QUESTION.format(expression(a, b)),
                    "response": f"<think>\n{worked_thought(a, b)}\n</think>\n<answer>{a + b}</answer>"} for a, b in xr]
    rows["rl"] = [{"question": QUESTION.format(expression(a, b)), "answer": str(a + b)} for a, b in rl]
    # the control: as many training sequences as stages 1 and 2 use together, all direct answers on text
    budget = args.sft_epochs * len(xr) + 16 * 8 * args.grpo_steps
    rows["control"] = [chat(QUESTION.format(expression(a, b)), f"<answer>{a + b}</answer>")
                       for a, b in (control * (budget // len(control) + 1))[:budget]]
    for split, items in (("test", test), ("val", val)):
        rows[f"{split}-text"] = [{"id": f"{a}+{b}", "question": QUESTION.format(expression(a, b)), "answer": a + b}
                                 for a, b in items]
        rows[f"{split}-image"] = [{"id": f"{a}+{b}", "question": QUESTION.format("<image 1>"), "answer": a + b,
                                   "images": [picture(a, b)]} for a, b in items]
    for name, part in rows.items():
        data.write_jsonl(str(folder / f"{name}.jsonl"), part)
    return {name: folder / f"{name}.jsonl" for name in rows}


# ----------------------------------------------------------------------------------------------------
# The stages: each one a call of the repository's own sft.py / grpo.py / evaluate.py

def stage(name, out, run):
    """Run `run(out)` unless out/final exists from an earlier run; report the minutes it took."""
    if (out / "final" / "config.json").exists():
        print(f"miniature: {name}: reusing {out / 'final'}", file=sys.stderr)
        return out / "final"
    start = time.time()
    print(f"miniature: {name} ...", file=sys.stderr)
    run(["--out", str(out), "--overwrite", "--save-every", "100000", "--keep", "1"])
    if not (out / "final" / "config.json").exists():  # a stage stopped by SIGTERM saves a step and returns
        raise SystemExit(f"miniature: {name} stopped before its end; run the same command again to redo it")
    print(f"miniature: {name} took {(time.time() - start) / 60:.1f} min", file=sys.stderr)
    return out / "final"


def sft_stage(model, rows, epochs, args, seed, extra=()):
    return lambda out: sft.main(["--model", str(model), "--data", str(rows), "--epochs", str(epochs),
                                 "--global-batch", "32", "--micro-batch", "32", "--lr", str(args.lr),
                                 "--lr-decay", "1.0", "--warmup", "0.05", "--grad-clip", "1.0",
                                 "--max-len", "512", "--seed", str(seed), *extra, *out])


def measure(model, files, split, args, out):
    """evaluate.py on the text items and their image twins: accuracy, and the share of answers with a thought."""
    budget = 16 + 12 * (args.digits + 2)  # the worked thought is ~11 tokens a column: the forced exit stays clear
    result = {}
    for modality in ("text", "image"):
        where = out / f"{split}-{modality}"
        # --max-pixels 0: the processor's own resolution, as in training (evaluate.py's default, the 7B model
        # card's 262,144 pixels, would blow a 7-character sum up to hundreds of visual tokens it never saw)
        with contextlib.redirect_stdout(io.StringIO()):  # evaluate.py's own table: we print ours
            evaluate.main(["--bench", "custom", "--data", str(files[f"{split}-{modality}"]), "--model", str(model),
                           "--template", "train", "--max-pixels", "0", "--max-new-tokens", str(budget + 16), "--think-budget",
                           str(budget), "--answer-budget", "16", "--batch-size", "64", "--out", str(where)])
        records = [json.loads(line) for line in (where / "custom.jsonl").read_text().splitlines()]
        thought = sum("</think>" in r["response"] and
                      r["response"].split("</think>")[0].replace("<think>", "").strip() != "" for r in records)
        result[modality] = {"accuracy": 100 * sum(r["correct"] for r in records) / len(records),
                            "thought": 100 * thought / len(records), "tokens": sum(r["tokens"] for r in records)
                            / len(records)}
    return result


def one_seed(args, seed):
    out = Path(args.out) / f"seed{seed}"
    files = write_data(out / "data", args, seed)
    init = out / "init"
    if not (init / "config.json").exists():
        tiny.build(init, text=dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                                   num_key_value_heads=max(1, args.hidden // 96)),
                   vision=dict(depth=3, hidden_size=args.vision_hidden, intermediate_size=2 * args.vision_hidden,
                               num_heads=max(2, args.vision_hidden // 32), fullatt_block_indexes=[0, 1, 2]),
                   seed=seed)
    # the base in two steps, as a VLM is pre-trained to see before it is instruction-tuned: reading alone first
    # (mixed with answers from the start, reading stayed at chance for 660 steps of seed 0), then the mix
    seeing = stage("base, part 1: reading images", out / "read",
                   sft_stage(init, files["read"], args.read_epochs, args, seed, ["--train-vision"]))
    models = {"base": stage("base, part 2: reading and direct answers, text and images", out / "base",
                            sft_stage(seeing, files["base"], args.base_epochs, args, seed, ["--train-vision"]))}
    models["sft"] = stage("stage 1: SFT on worked thoughts, text only", out / "sft",
                          sft_stage(models["base"], files["sft"], args.sft_epochs, args, seed))
    models["grpo"] = stage("stage 2: GRPO, text only", out / "grpo", lambda o: grpo.main(
        ["--model", str(models["sft"]), "--data", str(files["rl"]), "--prompts-per-step", "16", "--group-size", "8",
         "--max-new-tokens", str(16 + 12 * (args.digits + 2)), "--max-steps", str(args.grpo_steps),
         "--lr", str(args.grpo_lr), "--beta", "0", "--warmup", "0", "--micro-batch", "32", "--reward-processes", "1",
         "--seed", str(seed), *o]))
    models["control"] = stage("control: the same budget of direct answers, text only", out / "control",
                              sft_stage(models["base"], files["control"], 1, args, seed))
    return {name: {split: measure(path, files, split, args, out / "eval" / name) for split in ("val", "test")}
            for name, path in models.items()}


# ----------------------------------------------------------------------------------------------------
# The table

ROWS = [("base", "base: reads images, answers directly"), ("sft", "+ SFT on text thoughts (stage 1)"),
        ("grpo", "+ GRPO on text (stage 2)"), ("control", "control: base + direct-answer text training")]


def cell(values):
    mean = sum(values) / len(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ({min(values):.1f}-{max(values):.1f})"


def table(results, split="test"):
    """Markdown: accuracy on text and on images, and the share of image answers with a thought, per model."""
    lines = ["| model | text accuracy % | image accuracy % | image answers with a thought % |", "|---|---|---|---|"]
    for key, label in ROWS:
        runs = [r[key][split] for r in results.values()]
        lines.append(f"| {label} | {cell([r['text']['accuracy'] for r in runs])} | "
                     f"{cell([r['image']['accuracy'] for r in runs])} | {cell([r['image']['thought'] for r in runs])} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    results = {seed: one_seed(args, seed) for seed in args.seeds}
    out = Path(args.out)
    seeds = ", ".join(map(str, args.seeds))
    text = (f"{args.digits}-digit sums, {args.eval_items} held-out items per split, seeds {seeds}"
            f"{' (--quick)' if args.quick else ''}; mean (min-max) over seeds.\n\n"
            f"Test split:\n\n{table(results)}\n\nValidation split (where settings were chosen):\n\n"
            f"{table(results, 'val')}\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(text)
    print(f"miniature: {(time.time() - start) / 60:.1f} min; {out / 'results.md'}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
