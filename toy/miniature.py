"""The paper's transfer claim in miniature: reasoning learned from text alone, measured on the same problems as images.

X-Reasoner (arXiv 2505.03981) post-trains a vision-language model on text only and finds the reasoning carries
over to image inputs. This script replays that on a laptop CPU with the repository's own stages, on 4-digit sums:

    0. the base, built the way Qwen2-VL and LLaVA build theirs, a language model first and eyes for it after
       (each part is sft.py on a small Qwen2.5-VL of the real classes, random init):
       a. language, text only: copy a sum, and answer it directly (its thought only restates it), asked in
          several phrasings
       b. vision alignment: the language model frozen, the vision tower learns to make it read drawn sums
       c. instruction tuning: everything trains on reading and direct answers, with the sum typed, drawn, or
          half and half (one operand drawn, one typed: a drawn digit is made to stand for a typed one)
    1. X-Reasoner's stage 1 on text only: sft.py on worked column-by-column thoughts in <think>/<answer>
    2. X-Reasoner's stage 2 on text only: grpo.py with the 1/0 reward
    control: the base trained on as many more text sequences as 1 and 2 use, answered directly (no thoughts)

Then evaluate.py (greedy, forced exit) scores every model on held-out sums written as text and drawn as images
(each image the exact twin of a text item), and counts the image answers that carry a worked thought and those
whose thought reads the drawn sum right. Settings were chosen on a development split of our own, then checked on
the validation split; the README's table is the test split (README, "The transfer claim in miniature").

    python toy/miniature.py --out runs/miniature                 # one seed, ~38 min on 2 CPU cores (measured: seed 0)
    python toy/miniature.py --out runs/miniature --seeds 0,1,2   # the README's table: three seeds, mean (range)
    python toy/miniature.py --out runs/mini --quick              # the pipeline end to end, 19 s on 2 CPU cores
    python toy/miniature.py --out runs/study --study             # the first study below: 3 seeds x 3 levels, ~4 h
    python toy/miniature.py --out runs/study2 --study base       # the second: 3 seeds x 2 bases (toy/study2/)

The study (--study) varies one thing: how many of the lowest decoder layers stay frozen in the three text-only
post-training runs (stage 1, GRPO, the control): 0 (the single run's setting), 1 and 2 of 4, three seeds each, one
base per seed shared by every level. Why this variable: in the 3-seed run the image answers took up the worked
thought (99%) but its first line stopped restating the drawn sum after stage 1 (0-87% by seed against the base's
99.7%), so text-only training rewrote what the decoder does with image tokens; freezing its lowest layers is the
paper's frozen vision tower carried one step further in, and it leaves the base alone, so every level shares it.
The variable and its levels were fixed from that earlier run's diagnostics, before any study run on either split.
results.svg: image accuracy, the restated share and text accuracy against the level, each seed a dot, the mean a
line. Finding (toy/study/, README): no level gives image accuracy (at most 1% for every seed and model); freezing
keeps some reading only by stopping the free layers from learning the thought on text at all.
Cost, measured: 77-82 min a seed, ~4 h in all on 2 CPU cores (README).

The second study (--study base) varies the base instead: how long base c trains on reading and direct answers in
both modalities, 400 steps (the first study's base) or 1,600, one run per seed whose step-400 checkpoint is the
shorter level's base; post-training as in the single run, nothing frozen. Before post-training, each base's tie
is measured on validation (tie()): the share of half-drawn sums it restates right, and the twin similarity of its
hidden states after a typed sum and after the same sum drawn. The levels were fixed by cost before any run (README).
Finding (toy/study2/, README): no transfer of the thought at either level (image accuracy of stage 1 and GRPO 0-1%);
after 1,600 steps 35% of stage 1's image thoughts restate the drawn sum, yet none gets the next line, read off the
restated one, right (column `carried`), while the direct-answer control reaches 23% on images (0% at 400 steps).

Deliberate simplifications: one task (addition), one font, a model of a few million parameters trained for
minutes; settings a 7B model does not need, each one measured (README): M-RoPE's rotary frequencies all on the
image width axis, random batches instead of sft.py's length grouping, and stage 1 and the control at half the
base's lr with the token embeddings frozen, so that learning the thought does not unlearn reading. A rerun reuses
each stage whose final checkpoint exists and resumes one cut short from its newest checkpoint.
"""
import argparse
import contextlib
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import evaluate  # noqa: E402
import generate  # noqa: E402
import grpo  # noqa: E402
import sft  # noqa: E402
from plumbing.charts import svg_page  # noqa: E402
from plumbing import tiny  # noqa: E402
from plumbing.runs import step_dirs  # noqa: E402

BATCH = 32  # sequences per optimizer step in every SFT part (ours)
BASE_LEVELS = "400,1600"  # --study base: base c's steps (ours: the first study's 400, and 4x; README: why)
PROMPTS, GROUP = 16, 8  # a GRPO step's prompts and samples per prompt (ours; B.2: 128 x 8)
SAVE_EVERY = 200  # steps between a stage's checkpoints, what a killed study loses at most (ours)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/miniature", help="data, checkpoints, evaluations, results.md")
    ap.add_argument("--seeds", help="comma-separated seeds; the table gives mean (min-max) (default: 0; --study: 0,1,2)")
    ap.add_argument("--quick", action="store_true", help="a small model and budgets: the pipeline, not the result")
    ap.add_argument("--study", nargs="?", const="freeze", choices=["freeze", "base"],
                    help="post-train at every --levels (seeds 0,1,2 unless --seeds): results.md and results.svg, "
                    "image accuracy against the level. freeze (the default): decoder layers frozen in post-training "
                    "(toy/study/); base: the length of base c's joint training (toy/study2/)")
    ap.add_argument("--levels", help="--study freeze: the lowest decoder layers frozen in stage 1, GRPO and the "
                    "control (ours: 0,1,2; --quick 0,1; 0 is the single run's setting). --study base: base c's "
                    f"steps, replacing --joint-steps (ours: {BASE_LEVELS}; --quick 3,6; README: how they were fixed)")
    # the task (ours): a + b with `digits`-digit operands, the expression drawn one character per 28-pixel cell
    ap.add_argument("--digits", type=int, default=4, help="digits per operand (ours)")
    ap.add_argument("--eval-items", type=int, default=100, help="held-out sums per split, validation and test")
    # the model (ours): 3.6M parameters, Qwen2.5-VL's classes
    ap.add_argument("--hidden", type=int, default=192, help="text hidden size (vision: --vision-hidden)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers")
    ap.add_argument("--vision-hidden", type=int, default=128, help="vision tower width (depth 3, full attention)")
    # budgets, in optimizer steps of 32 sequences (ours, chosen on the development split: README)
    ap.add_argument("--base-problems", type=int, default=3000, help="sums for the base's rows, all three parts")
    ap.add_argument("--sft-problems", type=int, default=3000, help="sums with worked thoughts, stage 1 (the "
                    "control's direct answers: as many others)")
    ap.add_argument("--lm-steps", type=int, default=600, help="base a: copying and direct answers, text")
    ap.add_argument("--align-steps", type=int, default=800, help="base b: the vision tower alone learns to read "
                    "(its loss breaks through after a plateau of 300 steps or more: README)")
    ap.add_argument("--joint-steps", type=int, default=400, help="base c: reading and direct answers, both modalities")
    ap.add_argument("--sft-steps", type=int, default=1000, help="stage 1: worked thoughts, text")
    ap.add_argument("--grpo-steps", type=int, default=30, help="stage 2: GRPO steps of 16 prompts x 8 samples, text")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of base parts a and c")
    ap.add_argument("--sft-lr", type=float, default=5e-4, help="AdamW learning rate of stage 1 and the control "
                    "(at 1e-3 stage 1 forgot how to read images: README)")
    ap.add_argument("--align-lr", type=float, default=3e-3, help="AdamW learning rate of the vision alignment")
    ap.add_argument("--grpo-lr", type=float, default=1e-4, help="AdamW learning rate, GRPO")
    args = ap.parse_args(argv)
    args.prompts, args.group = PROMPTS, GROUP
    if args.quick:  # every stage runs, nothing is learned to speak of
        args.digits, args.eval_items, args.hidden, args.layers, args.vision_hidden = 2, 16, 64, 2, 32
        args.lm_steps = args.align_steps = args.joint_steps = args.sft_steps = 3
        args.base_problems, args.sft_problems = 64, 64
        args.grpo_steps, args.prompts, args.group = 2, 4, 4
    args.seeds = [int(s) for s in (args.seeds or ("0,1,2" if args.study else "0")).split(",")]
    if args.study == "base":
        levels = args.levels or ("3,6" if args.quick else BASE_LEVELS)
    else:
        levels = (args.levels or ("0,1" if args.quick else "0,1,2")) if args.study else "0"  # quick: 2 layers
    try:
        args.levels = [int(k) for k in levels.split(",")]
    except ValueError:
        ap.error(f"--levels: comma-separated whole numbers, not {levels!r}")
    if args.study == "base" and (any(k < 1 for k in args.levels) or args.levels != sorted(set(args.levels))):
        ap.error("--levels: base c's steps must be positive and increasing, e.g. 400,1600")
    if args.study != "base" and any(not 0 <= k < args.layers for k in args.levels):
        ap.error(f"--levels: each level must be from 0 to {args.layers - 1} (frozen layers of {args.layers})")
    return args


# ----------------------------------------------------------------------------------------------------
# The task: sums, their worked thoughts, their phrasings and their pictures

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
    """Column addition, one column per line: the thought restates the sum, then each line is the sum still to do
    (each operand without its last digit), the carry, and the digits found so far:
    '4721+3856 / 472+385 c0 7 / 47+38 c0 77 / 4+3 c1 577 / 8577'. Every line is read off the line above it, so
    once the sum is restated nothing more is needed from the question: on an image, only the first line has to be
    read from the picture. (Fetching the k-th digit of each operand from the question, as plain column addition
    does, is what a small model learns slowest.)"""
    x, y, carry, found, lines = str(a), str(b), 0, "", [expression(a, b)]
    while x or y:
        total = (int(x[-1]) if x else 0) + (int(y[-1]) if y else 0) + carry
        x, y, carry, found = x[:-1], y[:-1], total // 10, str(total % 10) + found
        lines.append(f"{x}+{y} c{carry} {found}" if x or y else f"{carry or ''}{found}")
    assert int(lines[-1]) == a + b
    return "\n".join(lines)


def direct(a, b):
    """The base's (and the control's) answer: the sum restated inside the think tags, then the answer."""
    return f"<think>\n{expression(a, b)}\n</think>\n<answer>{a + b}</answer>"


def worked(a, b):
    return f"<think>\n{worked_thought(a, b)}\n</think>\n<answer>{a + b}</answer>"


QUESTION = "What is {}?"  # every evaluation item; the image twin asks "What is <image 1>?" with the sum drawn
# Training questions come in several phrasings, so that the copy of the sum is found by what it is, not by where
# it sits; a drawn sum sits elsewhere than a typed one (the image's start and end tokens), and the frozen
# language model of the base's part b could not be taught to read images while it knew one phrasing only.
ASK = ["What is {a}+{b}?", "Compute {a}+{b}.", "{a}+{b} = ?", "Add {a} and {b}.", "What is the sum of {a} and {b}?",
       "Find {a} plus {b}.", "How much is {a} + {b}?", "Please add {b} to {a}."]
COPY = ["Read {x}.", "Copy {x}.", "Repeat {x} please.", "Say {x}.", "Read this: {x}", "Write {x} again.",
        "{x} - read it.", "Echo: {x}"]
READ = "Read <image 1>."  # the only image prompt of the base besides QUESTION

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf"  # Pillow's own font where this one is absent


def render(text, path, cell=28):
    """One character per 28-pixel cell (one visual token after Qwen2.5-VL's 2x2 merge), a bold monospace font at
    26 px: smaller or thinner glyphs stayed unread for minutes in an earlier probe (README)."""
    font = ImageFont.truetype(FONT, 26) if Path(FONT).exists() else ImageFont.load_default(size=26)
    picture = Image.new("L", (cell * len(text), cell), 255)
    draw = ImageDraw.Draw(picture)
    for i, char in enumerate(text):
        draw.text((i * cell + cell / 2, cell / 2), char, font=font, fill=0, anchor="mm")
    picture.convert("RGB").save(path)


def chat(question, reply, image=None, template=True):
    """A chat row for sft.py; questions go through the paper's training prompt as written, the copying and reading
    requests of the base stand alone."""
    user = data.TRAIN_PROMPT.format(question=question) if template else question
    row = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}
    return row | ({"images": [image]} if image else {})


def write_data(folder, args, seed):
    """Every stage's rows and both evaluation splits, as JSONL in `folder` (images in folder/images)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    test, val, base, xr, rl, control = problems(seed, args.digits, [args.eval_items, args.eval_items,
                                                                    args.base_problems, args.sft_problems,
                                                                    args.prompts * args.grpo_steps, args.sft_problems])
    rng = random.Random(seed)

    def picture(*terms):  # the sum, or one operand alone
        name = f"images/{'+'.join(map(str, terms))}.png"
        if not (folder / name).exists():
            render("+".join(map(str, terms)), folder / name)
        return name

    def ask(a, b):
        return rng.choice(ASK).format(a=a, b=b)
    copy = [chat(rng.choice(COPY).format(x=expression(a, b)), expression(a, b), template=False) for a, b in base]
    answer = [chat(ask(a, b), direct(a, b)) for a, b in base]
    read = [chat(READ, expression(a, b), picture(a, b), template=False) for a, b in base]
    look = [chat(QUESTION.format("<image 1>"), direct(a, b), picture(a, b)) for a, b in base]
    half = [chat(QUESTION.format(f"<image 1>+{b}"), direct(a, b), picture(a)) if rng.random() < 0.5 else
            chat(QUESTION.format(f"{a}+<image 1>"), direct(a, b), picture(b)) for a, b in base]
    rows = {"language": copy + answer, "align": read, "joint": read + answer + look + half}
    rows["sft"] = [{"question": ask(a, b), "response": worked(a, b)} for a, b in xr]
    rows["rl"] = [{"question": ask(a, b), "answer": str(a + b)} for a, b in rl]
    rows["control"] = [chat(ask(a, b), direct(a, b)) for a, b in control]
    for split, items in (("test", test), ("val", val)):
        rows[f"{split}-text"] = [{"id": f"{a}+{b}", "question": QUESTION.format(expression(a, b)), "answer": a + b}
                                 for a, b in items]
        rows[f"{split}-image"] = [{"id": f"{a}+{b}", "question": QUESTION.format("<image 1>"), "answer": a + b,
                                   "images": [picture(a, b)]} for a, b in items]
    # the base's tie (--study base): the validation sums half drawn, first or second operand in turn, as base c's
    # half rows are (no draw from rng: the other rows stay as they were)
    rows["val-half"] = [{"id": f"{a}+{b}", "question": QUESTION.format(f"<image 1>+{b}" if i % 2 == 0 else f"{a}+<image 1>"),
                         "answer": a + b, "images": [picture(a) if i % 2 == 0 else picture(b)]} for i, (a, b) in enumerate(val)]
    for name, part in rows.items():
        data.write_jsonl(str(folder / f"{name}.jsonl"), part)
    return {name: folder / f"{name}.jsonl" for name in rows}


def control_steps(args):
    """The control's SFT steps: as many training sequences as stages 1 and 2 use together."""
    return math.ceil((BATCH * args.sft_steps + args.prompts * args.group * args.grpo_steps) / BATCH)


# ----------------------------------------------------------------------------------------------------
# The stages: each one a call of the repository's own sft.py / grpo.py / evaluate.py

def stage(name, out, run, every=SAVE_EVERY):
    """Run `run(out)` unless out/final exists from an earlier run; report the minutes it took. A stage cut short
    (SIGTERM saves a step and returns; a killed one left the step_N it saved every `every` steps) resumes from its
    newest step on the next call: a resumed run is the uninterrupted one (sft.py's and grpo.py's resume tests)."""
    if (out / "final" / "config.json").exists():
        print(f"miniature: {name}: reusing {out / 'final'}", file=sys.stderr)
        return out / "final"
    start, saved = time.time(), step_dirs(out)
    print(f"miniature: {name} ..." + (f" resuming from {saved[-1].name}" if saved else ""), file=sys.stderr)
    run(["--out", str(out), *(["--resume", str(saved[-1])] if saved else ["--overwrite"]),
         "--save-every", str(every), "--keep", "1"])
    if not (out / "final" / "config.json").exists():
        raise SystemExit(f"miniature: {name} stopped before its end; run the same command again to resume it")
    print(f"miniature: {name} took {(time.time() - start) / 60:.1f} min" + (" (this part)" if saved else ""),
          file=sys.stderr)
    return out / "final"


def sft_stage(model, rows, steps, lr, seed, extra=(), warmup=0.05):
    """sft.py for `steps` steps of 32 sequences at a constant lr after a 5% warm-up, gradients clipped at 1
    (reading images was not learned without the clip: README), every batch a random draw (--window 1: sft.py's
    length grouping would make base c's batches all reading rows or all answers, and its model read images worse).
    `extra` flags come last, so they win over stage()'s checkpoint settings."""
    n = len(Path(rows).read_text().splitlines())
    return lambda out: sft.main(["--model", str(model), "--data", str(rows), "--epochs", str(math.ceil(steps * BATCH / n)),
                                 "--max-steps", str(steps), "--global-batch", str(BATCH), "--micro-batch", str(BATCH),
                                 "--lr", str(lr), "--lr-decay", "1.0", "--warmup", str(warmup), "--grad-clip", "1.0",
                                 "--max-len", "512", "--window", "1", "--seed", str(seed), *out, *extra])


def thought_budget(digits):
    return 16 + 12 * (digits + 2)  # the worked thought is ~11 tokens a line: the forced exit stays clear of it


def measure(model, files, split, args, out, modalities=("text", "image")):
    """evaluate.py on the text items and their image twins (or `modalities`: "half", the half-drawn validation
    sums): accuracy, the share of answers with a worked thought, and the share whose thought opens with the sum
    read right."""
    budget = thought_budget(args.digits)
    result = {}
    for modality in modalities:
        where = out / f"{split}-{modality}"
        # --max-pixels 0: the processor's own resolution, as in training (evaluate.py's default, the 7B model
        # card's 262,144 pixels, would blow a 9-character sum up to hundreds of visual tokens it never saw)
        with contextlib.redirect_stdout(io.StringIO()):  # evaluate.py's own table: we print ours
            evaluate.main(["--bench", "custom", "--data", str(files[f"{split}-{modality}"]), "--model", str(model),
                           "--template", "train", "--max-pixels", "0", "--max-new-tokens", str(budget + 16),
                           "--think-budget", str(budget), "--answer-budget", "16", "--batch-size", "100",
                           "--out", str(where)])
        records = [json.loads(line) for line in (where / "custom.jsonl").read_text().splitlines()]
        thoughts = [r["response"].split("</think>")[0].replace("<think>", "").strip().splitlines()
                    if "</think>" in r["response"] else [] for r in records]
        n = len(records)
        read = [reading(t[0] if t else "", r["id"]) for t, r in zip(thoughts, records)]
        result[modality] = {"accuracy": 100 * sum(r["correct"] for r in records) / n,
                            # a worked thought: more lines than the restated sum the base already writes
                            "thought": 100 * sum(len(t) > 1 for t in thoughts) / n,
                            "read": 100 * sum(r[0] for r in read) / n,
                            "read_first": 100 * sum(r[1] for r in read) / n,
                            "read_second": 100 * sum(r[2] for r in read) / n,
                            # ... and whose next line is read off it: the one step the image needs nothing for
                            "carried": 100 * sum(carried_on(t, r["id"]) for t, r in zip(thoughts, records)) / n,
                            "tokens": sum(r["tokens"] for r in records) / n}
    return result


def reading(line, gold):
    """Whether a thought's first line restates the sum `gold` ('4721+3856') exactly, and each operand."""
    line = line.strip()
    said, want = line.split("+"), gold.split("+")
    return (line == gold, len(said) == 2 and said[0] == want[0], len(said) == 2 and said[1] == want[1])


def carried_on(lines, gold):
    """Whether a thought's first two lines are the worked thought's: the sum `gold` restated, then the line read off
    it ('4721+3856', '472+385 c0 7'). On an image the second line needs nothing from the picture."""
    a, b = map(int, gold.split("+"))
    return [line.strip() for line in lines[:2]] == worked_thought(a, b).splitlines()[:2]


def tie(base, files, args, out):
    """How firmly a base ties image tokens to text, on validation, before any post-training: the share of half-drawn
    sums ("What is <image 1>+3856?") whose restated line reads the whole sum right, and the twin similarity."""
    half = measure(base, files, "val", args, out, modalities=("half",))["half"]
    return {"half_read": half["read"], "twin_similarity": twin_similarity(base, files["val-text"], files["val-image"])}


def twin_similarity(path, text_rows, image_rows):
    """The base's hidden states where it has read the question and is about to restate it: each decoder layer's
    output at the answer's opening `<think>\n` (teacher-forced, the same tokens for every item, so all that tells
    items apart comes from the question), after a text item and after the item's image twin, averaged over those
    tokens, centred on the mean of all items in both modalities (what every state shares would make any two look
    alike), compared by cosine similarity, averaged over layers and items. 1: the drawn sum puts the language
    model where the typed sum does; about 0: the image's state tells nothing of its twin's (each text item paired
    with another item's text: -0.14 for a --quick base); towards -1: image states sit apart from text states, an
    offset larger than what tells items apart (the same --quick base's image twins: -0.90). Forcing the whole
    answer instead scored 0.90 for text paired with another item's text: the answer's shared tokens dominate."""
    model, processor = data.load_model(str(path)).eval(), data.load_processor(str(path))
    tokenizer, folder = data.tokenizer_of(processor), Path(image_rows).parent
    opening = tokenizer("<think>\n", add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, T)
    states = {"text": [], "image": []}
    with torch.no_grad():
        for text, image in zip(data.read_rows(str(text_rows)), data.read_rows(str(image_rows))):
            for modality, row in (("text", text), ("image", image)):
                images = [data.load_image(name, folder) for name in row.get("images", [])]
                prompt = data.user_message(data.eval_prompt(row["question"], template="train"), images)
                inputs = dict(generate.encode(processor, [prompt]))
                inputs["input_ids"] = torch.cat([inputs["input_ids"], opening], 1)
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                if "mm_token_type_ids" in inputs:  # the opening's tokens are text
                    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(opening)], 1)
                hidden = model(**inputs, output_hidden_states=True).hidden_states[1:]  # one per decoder layer
                states[modality].append(torch.stack([h[0, -opening.shape[1]:].mean(0) for h in hidden]))  # (layers, H)
    return centred_similarity(torch.stack(states["text"]), torch.stack(states["image"]))


def centred_similarity(text, image):
    """Mean cosine similarity of each item's text and image states (items, layers, H) after both are centred on the
    mean state of that layer over every item of both modalities."""
    centre = torch.cat([text, image]).mean(0)
    return float(torch.cosine_similarity(text - centre, image - centre, dim=-1).mean())


def base_model(args, seed, out, files, steps):
    """Step 0: the base, in three sft.py parts from a random init, each reused if its final checkpoint exists;
    returns {base c's steps: checkpoint}. One count (`steps` [--joint-steps]): out/base. Several (--study base):
    one base c run as long as the longest, its checkpoint at each shorter count kept, every count with the warm-up
    of the shortest (5% of it), so that a shorter level's base is exactly the first steps of a longer one's."""
    init = out / "init"
    if not (init / "config.json").exists():
        head = args.hidden // 32
        # every rotary frequency on the width axis: Qwen2.5-VL gives the width axis the lowest ones (t, h, w take
        # the bands in that order), so a random ViT's columns all look alike to the language model (README)
        tiny.build(init, data.tiny_corpus(),
                   text=dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                             num_attention_heads=head, num_key_value_heads=max(1, args.hidden // 96)),
                   vision=dict(depth=3, hidden_size=args.vision_hidden, intermediate_size=2 * args.vision_hidden,
                               num_heads=max(2, args.vision_hidden // 32), fullatt_block_indexes=[0, 1, 2]),
                   seed=seed, sections=[0, 0, args.hidden // head // 2])
    lm = stage("base a: language, text only", out / "language",
               sft_stage(init, files["language"], args.lm_steps, args.lr, seed))
    eyes = stage("base b: vision alignment, the language model frozen", out / "align",
                 sft_stage(lm, files["align"], args.align_steps, args.align_lr, seed, ["--train-vision", "--freeze-text"]))
    name = "base c: reading and direct answers, text and images"
    if len(steps) == 1:
        return {steps[0]: stage(name, out / "base", sft_stage(eyes, files["joint"], steps[0], args.lr, seed,
                                                              ["--train-vision"]))}
    kept = ["--train-vision", "--save-every", str(math.gcd(*steps)), "--keep", "0"]
    final = stage(f"{name}, {steps[-1]} steps", out / "joint", sft_stage(eyes, files["joint"], steps[-1], args.lr, seed,
                                                                           kept, warmup=0.05 * steps[0] / steps[-1]))
    return {k: final if k == steps[-1] else out / "joint" / f"step_{k}" for k in steps}


def post_train(args, seed, out, files, base, level):
    """X-Reasoner's two text-only stages and the control from `base`, the lowest `level` decoder layers frozen."""
    frozen = ["--freeze-embeddings", "--freeze-layers", str(level)]  # stage 1 and the control alike (README: why)
    models = {"sft": stage("stage 1: SFT on worked thoughts, text only", out / "sft",
                           sft_stage(base, files["sft"], args.sft_steps, args.sft_lr, seed, frozen))}
    models["grpo"] = stage("stage 2: GRPO, text only", out / "grpo", lambda o: grpo.main(
        ["--model", str(models["sft"]), "--data", str(files["rl"]), "--prompts-per-step", str(args.prompts),
         "--group-size", str(args.group), "--max-new-tokens", str(thought_budget(args.digits) + 16),
         "--max-steps", str(args.grpo_steps), "--lr", str(args.grpo_lr), "--beta", "0", "--warmup", "0",
         "--micro-batch", "32", "--gen-batch", str(args.prompts * args.group), "--reward-processes", "1", "--seed", str(seed),
         "--freeze-layers", str(level), *o]))
    models["control"] = stage("control: the same budget of direct answers, text only", out / "control",
                              sft_stage(base, files["control"], control_steps(args), args.sft_lr, seed, frozen))
    return models


def one_seed(args, seed):
    """Every model of one seed, scored: {level: {model: {split: measure()}}}. --study freeze: one base shared by
    every level; level 0 lives where a single run's stages do (out/seedN/sft, ...), level k in out/seedN/freezeK/.
    --study base: a base per level (base c's checkpoint at that step), its tie measured (tie()), nothing frozen in
    post-training; level k in out/seedN/jointK/."""
    out = Path(args.out) / f"seed{seed}"
    files = write_data(out / "data", args, seed)
    if args.study == "base":
        bases = base_model(args, seed, out, files, args.levels)
        plan = [(k, bases[k], out / f"joint{k}", 0) for k in args.levels]
    else:
        base = base_model(args, seed, out, files, [args.joint_steps])[args.joint_steps]
        plan = [(k, base, out if k == 0 else out / f"freeze{k}", k) for k in args.levels]
    results, scored = {}, {}
    for level, base, where, frozen in plan:
        if base not in scored:  # a base is scored once, however many levels share it
            home = where if args.study == "base" else out
            scored[base] = {"base": {split: measure(base, files, split, args, home / "eval" / "base")
                                     for split in ("val", "test")}}
            if args.study == "base":
                scored[base]["tie"] = tie(base, files, args, home / "eval" / "tie")
        models = post_train(args, seed, where, files, base, frozen)
        results[level] = scored[base] | {name: {split: measure(path, files, split, args, where / "eval" / name)
                                                for split in ("val", "test")} for name, path in models.items()}
    return results


# ----------------------------------------------------------------------------------------------------
# The table

ROWS = [("base", "base: reads images, answers directly"), ("sft", "+ SFT on text thoughts (stage 1)"),
        ("grpo", "+ GRPO on text (stage 2)"), ("control", "control: base + direct-answer text training")]
COLUMNS = [("text", "accuracy", "text accuracy %"), ("image", "accuracy", "image accuracy %"),
           ("image", "thought", "image answers with a worked thought %"),
           ("image", "read", "image thoughts that read the sum right %"),
           ("image", "read_first", "... the first operand %"), ("image", "read_second", "... the second operand %")]


def cell(values, digits=1):
    mean, f = sum(values) / len(values), f"{{:.{digits}f}}".format
    return f(mean) if len(values) == 1 else f"{f(mean)} ({f(min(values))}-{f(max(values))})"


def table(results, split="test"):
    """Markdown: accuracy on text and on images, and what the image answers' thoughts hold, per model."""
    lines = ["| model | " + " | ".join(c[2] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for key, label in ROWS:
        runs = [r[key][split] for r in results.values()]
        lines.append(f"| {label} | " + " | ".join(cell([r[m][k] for r in runs]) for m, k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def per_seed(results, split="test"):
    """Markdown: text / image accuracy of every model for each seed (a mean over seeds can hide a split outcome)."""
    lines = ["| seed | " + " | ".join(label for _, label in ROWS) + " |", "|---" * (len(ROWS) + 1) + "|"]
    for seed, runs in results.items():
        lines.append(f"| {seed} | " + " | ".join(f"{runs[key][split]['text']['accuracy']:.0f} / "
                                               f"{runs[key][split]['image']['accuracy']:.0f}" for key, _ in ROWS) + " |")
    return "\n".join(lines)


LEVEL = {"freeze": "frozen layers", "base": "base c steps"}
AXIS = {"freeze": "decoder layers frozen in post-training", "base": "base c's joint-training steps"}


def study_table(results, levels, split, kind="freeze"):
    """Markdown: per level, image accuracy of each post-trained model, the image thoughts restating the sum and
    text accuracy; --study base first gives the bases' tie, measured on validation (tie())."""
    keys = [("sft", "image", "accuracy"), ("grpo", "image", "accuracy"), ("control", "image", "accuracy"),
            ("sft", "image", "read"), ("grpo", "image", "read"), ("sft", "text", "accuracy"), ("grpo", "text", "accuracy")]
    ties = kind == "base"
    lines = [f"| {LEVEL[kind]} | " + ("base's tie (validation): half-drawn sums read % | twin similarity | " if ties
                                      else "") + "image accuracy %: stage 1 | GRPO | control | image thoughts "
             "restating the sum %: stage 1 | GRPO | text accuracy %: stage 1 | GRPO |", "|---" * (8 + 2 * ties) + "|"]
    for level in levels:
        runs = [r[level] for r in results.values()]
        cells = [cell([r["tie"]["half_read"] for r in runs]), cell([r["tie"]["twin_similarity"] for r in runs], 3)
                 ] if ties else []
        cells += [cell([r[m][split][modality][k] for r in runs]) for m, modality, k in keys]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tie_per_seed(results, levels, split="test"):
    """Markdown (--study base): each seed's bases, their tie and what post-training made of them, level by level."""
    lines = ["| seed | base c steps | half-drawn sums read % | twin similarity | image accuracy %: stage 1 | GRPO | "
             "control | stage 1's image thoughts restating the sum % | ... and the next line right % |",
             "|---" * 9 + "|"]
    for seed, runs in results.items():
        for k in levels:
            r, sft = runs[k], runs[k]["sft"][split]["image"]
            lines.append(f"| {seed} | {k} | {r['tie']['half_read']:.0f} | {r['tie']['twin_similarity']:.3f} | " +
                         " | ".join(f"{r[m][split]['image']['accuracy']:.0f}" for m in ("sft", "grpo", "control")) +
                         f" | {sft['read']:.0f} | {sft['carried']:.0f} |")
    return "\n".join(lines)


def study_chart(results, levels, split="test", kind="freeze"):
    """Three panels against the level, on a 0-100 axis: image accuracy of stage 1, GRPO and the control (each seed a
    dot, the mean a line); the share of their image thoughts that restate the drawn sum; their text accuracy (what
    the level costs the thought itself). --study base adds a fourth: image accuracy after post-training against the
    tie each base had (its twin similarity), a dot per seed and level."""
    def panel(title, modality, metric, models):
        series = [(name, [sum(r[k][m][split][modality][metric] for r in results.values()) / len(results)
                          for k in levels]) for m, name in models]
        dots = [(i, k, r[k][m][split][modality][metric]) for i, (m, _) in enumerate(models) for k in levels
                for r in results.values()]
        return (title, levels, series, AXIS[kind], False, dots, (0, 100))
    models = [("sft", "stage 1 (text SFT)"), ("grpo", "+ GRPO (text)"), ("control", "control (direct answers)")]
    panels = [panel(f"image accuracy % ({split})", "image", "accuracy", models),
              panel("image thoughts restating the sum %", "image", "read", models[:2]),
              panel(f"text accuracy % ({split})", "text", "accuracy", models[:2])]
    if kind == "base":
        ties = sorted({r[k]["tie"]["twin_similarity"] for r in results.values() for k in levels})
        dots = [(i, r[k]["tie"]["twin_similarity"], r[k][m][split]["image"]["accuracy"])
                for i, (m, _) in enumerate(models[:2]) for k in levels for r in results.values()]
        panels.append((f"image accuracy % ({split}) against the base's tie", ties,
                       [(name, [None] * len(ties)) for _, name in models[:2]],
                       "twin similarity of the base (validation)", False, dots, (0, 100)))
    return svg_page(panels, f"Miniature study: {len(results)} seeds, each a dot; lines: the mean", 380, 280,
                    2 if kind == "base" else 3)


def report(args, results, minutes):
    """results.md (and, for --study, results.svg) in --out."""
    out, seeds = Path(args.out), ", ".join(map(str, args.seeds))
    head = (f"{args.digits}-digit sums, {args.eval_items} held-out items per split, seeds {seeds}"
            f"{' (--quick)' if args.quick else ''}; mean (min-max) over seeds; this call took {minutes:.0f} min on this "
            "machine (stages reused from an earlier call are not in it).\n\n")
    flat = {seed: r[0] for seed, r in results.items()} if not args.study else results  # a single run: level 0
    if args.study:
        kind = args.study
        text = head + (f"Test split:\n\n{study_table(results, args.levels, 'test', kind)}\n\n"
                       f"Validation split:\n\n{study_table(results, args.levels, 'val', kind)}\n")
        if kind == "base":
            text += f"\nEach seed's bases, test split:\n\n{tie_per_seed(results, args.levels)}\n"
        (out / "results.svg").write_text(study_chart(results, args.levels, kind=kind))
    else:
        text = head + (f"Test split:\n\n{table(flat)}\n\nValidation split:\n\n{table(flat, 'val')}\n\n"
                       f"Text / image accuracy % per seed, test split:\n\n{per_seed(flat)}\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": flat}, indent=1))
    return text


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    results = {seed: one_seed(args, seed) for seed in args.seeds}
    print(report(args, results, (time.time() - start) / 60))
    print(f"miniature: {(time.time() - start) / 60:.1f} min; {Path(args.out) / 'results.md'}", file=sys.stderr)
    return results if args.study else {seed: r[0] for seed, r in results.items()}


if __name__ == "__main__":
    main()
