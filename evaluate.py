"""Stage 3: evaluate any checkpoint on the paper's benchmarks (Table 7) with its prompts and rule-based scores.

    python evaluate.py --bench mathvista                               # base model, the paper's protocol
    python evaluate.py --bench all --model runs/grpo/final --compare   # every benchmark, paper numbers beside
    torchrun --nproc_per_node 8 evaluate.py --bench mmmu-pro,medqa --model runs/grpo/final
    python evaluate.py --bench mathvista,mmmu,medqa --model tiny --data toy   # offline, on CPU (a preset)

Protocol (§3, appendix C): the math template for the mathematical benchmarks (MathVista, MathVision, GSM8K),
the multiple-choice template for the rest; images as chat image parts; greedy decoding; at most 4,096 generated
tokens, the forced exit (after 3,584 thinking tokens) inside them. Each benchmark is one entry in BENCHMARKS
(where its rows come from, how a row becomes a prompt, how a response is judged). Judging is by rules, never by
another model: an answer in <answer> tags is read with rewards.py; untagged prose falls back to each benchmark's
official rules (MMMU's parser, MathVista's normalisation), made deterministic: where an official scorer guesses at
random, we count the item wrong.

Outputs in --out: <bench>.jsonl (one line per sample, appended as it goes, so a rerun resumes),
summary.json, results.md. Deliberate simplifications: MathVista's official GPT-4 answer extraction is
replaced by rules (answer phrases, option mentions, last number); --out must be on a filesystem all ranks share.
"""
import ast
import json
import re
import sys
import zlib
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import data
import generate
from plumbing.cli import (COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, DataError, cli, cli_parser,
                           passed_flags, toy_preset)
from plumbing.distributed import all_reduce_dict, setup_distributed, shard
from plumbing import records, runs
from plumbing.records import fingerprint
from rewards import NUMBER, choice_letter, extract_answer, last_boxed, math_equal

# ----------------------------------------------------------------------------------------------------
# The benchmarks

def benchmark(hub, split, n, make, configs=(None,), template="mc", **extra):
    """One benchmark: where its rows live, how many the card lists, the row converter, and which appendix-C
    template its prompts use (`math` for the mathematical benchmarks, `mc` for the rest)."""
    return {"hub": hub, "split": split, "n": n, "task": make, "configs": list(configs), "template": template} | extra


MMLU_PRO = benchmark("TIGER-Lab/MMLU-Pro", "test", 12032, data.fields("question", "answer", "options", pid="question_id"))
MMMU = benchmark("MMMU/MMMU", "validation", 900, data.mmmu_task, data.MMMU_SUBJECTS)
MMMU_PRO = benchmark("MMMU/MMMU_Pro", "test", 1730, data.mmmu_task, ["standard (10 options)"])
BENCHMARKS = {  # paper Table 7; hub ids, splits, sizes and fields from the dataset cards
    "gsm8k": benchmark("openai/gsm8k", "test", 1319, lambda r: data.task(
        r["question"], r["answer"].split("####")[-1].strip().replace(",", ""), pid=zlib.crc32(r["question"].encode())),
        ["main"], template="math"),
    "mmlu-pro": MMLU_PRO,
    "mmmu": MMMU,
    "mmmu-pro": MMMU_PRO,
    "mmstar": benchmark("Lin-Chen/MMStar", "val", 1500, data.mmstar_task),
    "mathvista": benchmark("AI4Math/MathVista", "testmini", 1000, data.mathvista_task, template="math"),
    "mathvision": benchmark("MathLLMs/MathVision", "test", 3040, lambda r: data.fields(
        "question", "answer", "options", "decoded_image" if r.get("decoded_image") else "image")(r), template="math"),
    # §3.2 evaluates both MedQA versions; Figure 1's "MedQA" (56.3 -> 62.3, X-Reasoner-Med 72.4) is the 4-option one
    "medqa": benchmark("GBaker/MedQA-USMLE-4-options", "test", 1273, data.fields("question", "answer_idx", "options"),
                   label="MedQA (4 options)"),
    # The original 5-option USMLE test set (Table 7: 1,273 items) is not on the hub as plain data: pass the
    # release's data_clean/questions/US/test.jsonl ({question, options {A..E}, answer, answer_idx}).
    "medqa-5": benchmark(None, None, 1273, data.fields("question", "answer_idx", "options"), label="MedQA (5 options)"),
    "mmlu-pro-health": MMLU_PRO | {"n": 818, "keep": lambda r: r.get("category") == "health"},
    "mmmu-health": MMMU | {"configs": data.MMMU_HEALTH, "n": 150,
                           "keep": lambda r: data.mmmu_subject(r) in data.MMMU_HEALTH},
    "mmmu-pro-health": MMMU_PRO | {"n": 286, "keep": lambda r: data.mmmu_subject(r) in data.MMMU_HEALTH},
    # MedXpertQA MM: images are file names inside the dataset's images.zip (unzip it, pass --image-root)
    "medxpertqa-mm": benchmark("TsinghuaC3I/MedXpertQA", "test", 2000, data.fields(
        "question", "label", "options", "images", strip="\nAnswer Choices:"), ["MM"]),
    # OmniMedVQA's open-access QA JSON files (local only): a fixed seeded sample of 1,000, as in the paper.
    "omnimedvqa": benchmark(None, None, 1000, data.omnimed_task, sample=1000),
    # NEJM Image Challenge (local JSONL): {"id", "question", "options": [..] or {A: ..}, "answer": letter, "image"}
    "nejm": benchmark(None, None, 947, data.fields("question", "answer", "options", "image")),
    # Your own items (local JSON/JSONL): {"id", "question", "answer", "options": [..] (optional), "images": [..]};
    # without options the answer is free-form (math_equal), with them a letter. toy/miniature.py uses it.
    "custom": benchmark(None, None, None, data.fields("question", "answer", "options", "images"), template="math"),
}

# ----------------------------------------------------------------------------------------------------
# The paper's numbers (arXiv 2505.03981 v1), each with where it is printed: F1 = Figure 1 (values printed on the
# bars; also readme_files/fig1.png in github.com/microsoft/x-reasoner), T5 = Table 5 (greedy), T8 = Table 8, ...
# Models: base = Qwen2.5-VL-7B-Instruct, sota = the previous 7B-scale state of the art the paper compares with,
# xr = X-Reasoner, med = X-Reasoner-Med. Where two places print different numbers for the same thing (MMMU base:
# 53.2 in F1, 53.0 in T5) both are kept. Figures 3-4 (avg/maj/pass@5) are left out: their bar labels cannot be
# matched to bars from the text.
PAPER_MODELS = {"base": "Qwen2.5-VL-7B", "sota": "prev. 7B SOTA", "xr": "X-Reasoner", "med": "X-Reasoner-Med"}
PAPER_TABLE = """
# benchmark        base  sota  xr    med   source
gsm8k              84.9  87.2  88.2  -     F1
mmlu-pro           47.6  52.1  52.6  -     F1
mmmu-pro           38.7  40.7  43.0  -     F1
mmmu               53.2  55.0  56.4  -     F1
medqa              56.3  71.6  62.3  72.4  F1
mmlu-pro-health    47.8  56.4  51.3  58.7  F1
mmmu-health        56.7  57.3  60.0  64.0  F1
medxpertqa-mm      22.2  23.8  23.8  26.4  F1
# T5's sota: the best other 7B/8B row: MAmmoTH-VL2-7B (MMMU-Pro, MathVista), Mulberry-7B (MMMU), R1-Onevision-7B
mmmu               53.0  55.0  56.4  -     T5
mmmu-pro           38.7  40.7  43.0  -     T5
mathvista          62.8  68.1  69.0  -     T5
mathvision         25.0  29.9  29.6  -     T5
# T8 names each SOTA model; its MMLU-Pro-H entry (HuatuoGPT-o1-7B, replicated) differs from F1's
mmlu-pro-health    -     54.3  -     -     T8
# T4: the same recipe as a study (SFT + RL), before the final run; the only X-Reasoner number for NEJM
mmlu-pro           47.6  -     53.3  -     T4
mmlu-pro-health    47.8  -     53.1  -     T4
mmmu-pro           38.3  -     42.5  -     T4
nejm               41.8  -     45.7  -     T4
# T3 and T1 (also T9): the baseline with the CoT template. T1 and T9 say "MedQA"; §3.2 calls the original 5-option
# set "MedQA", and their 50.5 is not F1's 4-option 56.3, so we file it under medqa-5.
mmlu-pro-health    47.8  -     -     -     T3
omnimedvqa         57.4  -     -     -     T3
gsm8k              86.0  -     -     -     T3
mathvision         24.7  -     -     -     T3
medqa-5            50.5  -     -     -     T1
mmmu-pro           38.3  -     -     -     T1
mmmu-pro-health    34.3  -     -     -     T1
"""
PAPER = [(bench, model, float(value), source)  # (benchmark, model, accuracy %, source), one per number above
         for line in PAPER_TABLE.strip().splitlines() if not line.startswith("#")
         for bench, *values, source in [line.split()] for model, value in zip(PAPER_MODELS, values) if value != "-"]
# Table 6: items left after removing those solved text-only (3 image-free samples per item, per model), and the
# accuracy of both models on that shared remainder: benchmark -> (original, text-solvable, remaining, base, xr)
TEXT_SOLVABLE = {"mmmu": (900, 308, 592, 39.3, 41.4), "mmmu-pro": (1730, 259, 1471, 33.4, 36.4),
                 "mathvista": (1000, 257, 743, 57.9, 60.6), "mathvision": (3040, 448, 2592, 18.6, 21.8),
                 "mmstar": (1500, 259, 1241, 56.6, 59.0)}


def paper_numbers(bench):
    """{model: "53.0 (T5); 53.2 (F1)"}: every number the paper prints for this benchmark, with its sources."""
    cells = {}
    for b, model, value, source in PAPER:
        if b == bench:
            cells.setdefault(model, {}).setdefault(value, []).append(source)
    return {m: "; ".join(f"{v} ({', '.join(s)})" for v, s in sorted(by_value.items(), key=lambda x: x[1][0]))
            for m, by_value in cells.items()}


# ----------------------------------------------------------------------------------------------------
# Judging: the official rules, made deterministic

# MMMU-Pro's and MMMU's own parsers for untagged prose, ported rule for rule (their scripts: mmmu-pro/evaluate.py,
# mmmu/eval_utils.py); our own answer format is read with rewards.py first

def official_choice(response, options):
    """MMMU-Pro's parse_multi_choice_response (mmmu-pro/evaluate.py), minus its random guess: None instead."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    last = response.rfind("Answer:")
    if last != -1:
        named = [c for c in letters if c in response[last + len("Answer:"):].strip()]
        if len(named) == 1:
            return named[0]
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = f" {response} "
    candidates = [c for c in letters if f"({c})" in response]
    brackets = bool(candidates)
    candidates = (candidates or [c for c in letters if f"{c} " in response]
                  or [c for c in letters if f"{c}." in response])
    by_text = False
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, o in zip(letters, options) if o.lower() in response.lower()]
        by_text = True
    if not candidates:
        return None
    if by_text:  # several: the one mentioned last
        return max(candidates, key=lambda c: response.lower().rfind(options[letters.index(c)].lower()))
    return max(candidates, key=lambda c: response.rfind(f"({c})" if brackets else f" {c} "))


def mmmu_normalize(s):
    """MMMU's normalize_str: numbers to floats rounded to 2 decimals, other strings lower-cased."""
    s = str(s).strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
        return [" " + s, s + " "] if len(s) == 1 else [s]


def mmmu_open_predictions(response):
    """MMMU's parse_open_response: the tails of the key sentences plus every number in them."""
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys, indicators = [], ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    for i, sentence in enumerate(sentences):
        shortest = None  # the shortest tail; as in the original, an empty tail does not count as found
        for ind in indicators + (["="] if i == len(sentences) - 1 else []):
            tail = sentence.split(ind)[-1].strip() if ind in sentence else None
            if tail is not None and (not shortest or len(tail) < len(shortest)):
                shortest = tail
        if shortest and shortest not in [":", ",", ".", "!", "?", ";", "'"]:
            keys.append(shortest)
    keys = keys or [response]
    found = [n for k in keys for n in re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", k)
             + re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", k)
             + re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", k)]
    return [p for s in keys + found for p in mmmu_normalize(s)]



def marked(response):
    """Whether a response marks its answer (an <answer> tag, a closed thought, or a box), so that rewards.py reads
    it; an unmarked response is prose, read by the benchmark's own rules."""
    return "<answer>" in response or "</think>" in response or last_boxed(response) is not None


def still_thinking(response):
    return "<think>" in response and "</think>" not in response


def judge_choice(response, options, answer):
    """(the letter picked, correct?). Our format (<answer>, </think>) is read with rewards.choice_letter first;
    other prose with MMMU-Pro's parser first, then a \\boxed{} or "the answer is" if that finds nothing."""
    if still_thinking(response):
        return None, False
    ours = "<answer>" in response or "</think>" in response
    prose = response.rsplit("</think>", 1)[-1]
    extracted = extract_answer(response, prose=False, several=False) or ""  # MMMU-Pro's parser reads the prose
    read_tags = lambda: choice_letter(extracted, options) or official_choice(extracted, options)  # noqa: E731
    letter = (read_tags() or official_choice(prose, options)) if ours else (official_choice(prose, options)
                                                                         or choice_letter(extracted, options))
    return letter, letter == answer


WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                         "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}
ANSWER_IS = re.compile(r"answer\b[^.\n]{0,40}?(?:\bis\b|:|=)", re.IGNORECASE)
CHOICE_IS = re.compile(r"(?:answer|option|choice)\b[^.\n]{0,40}?(?:\bis\b|:|=)", re.IGNORECASE)


def numbers(text):
    text = re.sub(r"\b(" + "|".join(WORDS) + r")\b", lambda m: WORDS[m.group(1).lower()], text, flags=re.IGNORECASE)
    return [n.replace(",", "") for n in NUMBER.findall(text)]


def prose_number(text):
    """The final number of unmarked prose: the first after the last "answer is", else the last of all."""
    phrases = list(ANSWER_IS.finditer(text))
    if phrases:
        tail = numbers(text[phrases[-1].end():].split("\n")[0])
        if tail:
            return tail[0]
    found = numbers(text)
    return found[-1] if found else None


def judge_math(response, answer):
    """Free-form answers: rewards.math_equal on the marked answer, or on the final number of unmarked prose."""
    if still_thinking(response):
        return None, False
    extracted = extract_answer(response)
    if extracted is None:
        return None, False
    if not marked(response) and len(extracted.split()) > 3 and not math_equal(extracted, answer):
        extracted = prose_number(extracted) or extracted
    return extracted, math_equal(extracted, answer)


def edit_distance(a, b):
    a, b = a[:1000], b[:1000]  # bounded time: no option is that long
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def mathvista_normalize(extraction, row):
    """MathVista's normalize_extracted_answer (evaluation/calculate_score.py), rule for rule."""
    choices = row.get("choices") or []
    if row["question_type"] == "multi_choice":
        extraction = str(extraction).strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = list(data.LETTERS[:len(choices)])
        if extraction in letters:
            return choices[letters.index(extraction)]
        distances = [edit_distance(extraction, c) for c in choices]  # nearest choice, first on ties
        return choices[distances.index(min(distances))]
    try:
        if row["answer_type"] == "integer":
            return str(int(float(extraction)))
        if row["answer_type"] == "float":
            return str(round(float(extraction), int(row["precision"])))
    except (TypeError, ValueError, OverflowError):
        return None
    return str(extraction)  # list


def mathvista_extract(response, row):
    """Our stand-in for MathVista's GPT-4 extraction: the answer the response gives, as a letter or number."""
    text, choices = response.strip(), row.get("choices") or []
    multi = row["question_type"] == "multi_choice"
    if not text or still_thinking(text):
        return ""
    if multi and text in choices:
        return text
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return text
    if marked(text):
        text = extract_answer(text, prose=False, several=False) or ""
        if multi:  # a choice's own text -> its letter: the official rules read "(b)" as option B
            return data.LETTERS[choices.index(text)] if text in choices else choice_letter(text, choices) or text
        return text if row["answer_type"] == "list" else (prose_number(text) or text)
    if multi:  # unmarked: the last "answer/option is X" that names a choice, a final bare letter, "(X)", a text
        letters = data.LETTERS[:len(choices)]
        for phrase in reversed(list(CHOICE_IS.finditer(text))):  # the phrase must be followed by the choice
            tail = text[phrase.end():].split("\n")[0].replace("*", "").strip(" .:")
            if m := re.match(rf"\(?([{letters}])\)?(?!\w)", tail):
                return m.group(1)
            if named := [c for c in choices if re.match(rf"{re.escape(str(c))}(?!\w)", tail, re.IGNORECASE)]:
                return letters[choices.index(max(named, key=len))]
        last_line = re.sub(r"[*().:\s]", "", text.splitlines()[-1])
        if len(last_line) == 1 and last_line in letters:
            return last_line
        if in_brackets := re.findall(rf"\(([{letters}])\)", text):
            return in_brackets[-1]
        mentioned = [(m.end(), len(c), c) for c in choices if str(c).strip()
                     for m in re.finditer(rf"(?<!\w){re.escape(str(c))}(?!\w)", text, re.IGNORECASE)]
        if mentioned:
            return letters[choices.index(max(mentioned)[2])]
        numeric = any(re.search(r"\d", str(c)) for c in choices)  # then the nearest choice to the final number
        return (numeric and prose_number(text)) or text.splitlines()[-1]
    if row["answer_type"] == "list" and (lists := re.findall(r"\[[^\[\]]*\]", text)):
        return lists[-1]
    return prose_number(text) or ""


def judge_mathvista(response, row):
    extraction = mathvista_extract(response, row)
    if row["answer_type"] == "list":  # written as the answers are: "[2014, 2016]"
        extraction = "[" + ", ".join(numbers(extraction)) + "]"
    prediction = mathvista_normalize(extraction, row)
    return extraction, prediction == row["answer"]


def judge_mmmu_open(response, answer):
    """MMMU's eval_open: a gold number must equal a predicted number; a gold string must occur in a prediction."""
    if still_thinking(response):
        return None, False
    text = (extract_answer(response, prose=False, several=False) or "") if marked(response) else response
    golds = ast.literal_eval(answer) if answer.strip().startswith("[") else [answer]
    norm = [g for gold in golds for g in mmmu_normalize(gold)]
    preds = mmmu_open_predictions(text)
    correct = any((p in norm) if not isinstance(p, str) else any(isinstance(g, str) and g in p for g in norm)
                  for p in preds)
    return text.strip()[:200], correct


def judge(bench, response, row):
    """(extracted answer, correct?) for one response to one raw benchmark row."""
    spec, response = BENCHMARKS[bench], response or ""
    if bench == "mathvista":
        return judge_mathvista(response, row)
    t = spec["task"](row)
    if t["open"]:
        return judge_mmmu_open(response, t["answer"])
    if t["options"]:
        return judge_choice(response, t["options"], t["answer"])
    return judge_math(response, t["answer"])


def score(bench, response, item):
    """True if `response` answers the raw hub-schema row `item` of benchmark `bench` correctly."""
    if bench not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {bench!r}; known: {', '.join(BENCHMARKS)}")
    return bool(judge(bench, response, item)[1])


# ====================================================================================================
# The run: benchmark by benchmark, each rank a share of the items

def parse_args(argv=None):
    ap = cli_parser(__doc__)
    # what to evaluate
    ap.add_argument("--bench", default="all", help=f"comma-separated names, or all: {', '.join(BENCHMARKS)}")
    ap.add_argument("--model", default=data.BASE_MODEL, help="hub id, local checkpoint, or `tiny` (default: the base)")
    ap.add_argument("--data", action="append", default=[], help="PATH, BENCH=PATH (repeatable), toy; default: hub")
    ap.add_argument("--image-root", help="where relative image paths start (default: the data's directory)")
    ap.add_argument("--limit", type=POSITIVE_INT, default=None, help="only the first N rows of each benchmark")
    ap.add_argument("--out", default="runs/eval", help="records (resumable), summary.json, results.md")
    # protocol (§3, appendix C)
    ap.add_argument("--samples", type=POSITIVE_INT, default=1, help="K samples per item: avg/maj/pass@K (§3: 1, or 5)")
    ap.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0: greedy (§3: greedy; 0.3 with 5 samples)")
    ap.add_argument("--top-p", type=PROBABILITY, default=1.0, help="nucleus sampling (§3: none)")
    ap.add_argument("--repetition-penalty", type=POSITIVE, default=1.0, help="model.generate's repetition "
                    "penalty; 1: off (ours; Qwen2.5-VL-7B-Instruct's generation_config.json asks for 1.05)")
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=4096, help="cap on generated tokens, all told (§3: 4,096)")
    ap.add_argument("--think-budget", type=COUNT, help="forced exit after N thinking tokens; 0: off (ours: cap - 512)")
    ap.add_argument("--answer-budget", type=POSITIVE_INT, default=512, help="answer tokens after a forced exit (ours)")
    ap.add_argument("--template", choices=["mc", "math", "train"], help="the prompt for every benchmark (default: "
                    "each one's appendix-C template; train: the training prompt)")
    ap.add_argument("--min-pixels", type=POSITIVE_INT, default=262144, help="image resolution (X-Reasoner-7B's model card)")
    ap.add_argument("--max-pixels", type=COUNT, default=262144, help="image resolution (X-Reasoner-7B's model card); "
                    "0: the processor's own")
    ap.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="KV-cache slots decoded together, "
                    "each refilled as its row ends (ours)")
    ap.add_argument("--seed", type=COUNT, default=0, help="sampling seeds, per (item, sample) (ours)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (same tokens, faster "
                    "after a compile of seconds to a minute)")
    # the text-only ablation (Table 6)
    ap.add_argument("--no-image", action="store_true", help="drop every image from the prompts")
    ap.add_argument("--text-solvable-out", help="record the items right in all K samples (bench<TAB>id)")
    ap.add_argument("--exclude-ids", action="append", default=[], help="id files to leave out (their union)")
    ap.add_argument("--compare", action="store_true", help="the paper's numbers beside ours (T6's with --exclude-ids)")
    args = ap.parse_args(argv)
    args.passed = passed_flags(ap, argv)
    # the tiny model's ~40-token answers: a short cap, the forced exit inside it (announced once the model loads)
    args.preset = toy_preset(args, {"max_new_tokens": 64, "answer_budget": 16}) if "toy" in args.data else ""
    args.exclude_ids = [p for entry in args.exclude_ids for p in entry.split(",") if p]
    if args.think_budget is None:
        args.think_budget = max(args.max_new_tokens - args.answer_budget, 0)
    runs.check_writable(args.out, "--out")  # before anything loads or is written
    if missing := [p for p in args.exclude_ids if not Path(p).is_file()]:
        raise DataError(f"--exclude-ids {', '.join(missing)}: no such file")
    return args


def main(argv=None):
    args = parse_args(argv)
    benches, given = requested(args)
    args.model = data.check_model(args.model)
    rank, world, device = setup_distributed()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = data.load_model(args.model, dtype=dtype, device=device, progress=rank == 0).eval()
    args.fingerprint = fingerprint(data.resolve_model(args.model))
    if args.preset and rank == 0:
        print(args.preset, file=sys.stderr)
    processor = data.load_processor(args.model)
    if args.max_pixels:
        processor.image_processor.size = {"shortest_edge": args.min_pixels, "longest_edge": args.max_pixels}
    summaries, failed = [], []
    with runs.locked(args.out, rank, device):  # one evaluation at a time writes into --out
        for bench in benches:
            try:
                s = evaluate_bench(bench, given.get(bench), args, model, processor, rank, world)
            except DataError as e:  # one unavailable benchmark does not cost the others' results
                print(f"error: {e}", file=sys.stderr)
                failed.append(bench)
                continue
            if s:
                summaries.append(s)
                print(f"{bench}: {s['accuracy']}% of {s['n']}", file=sys.stderr)
        if rank == 0 and summaries:
            print(records.write_results(Path(args.out), summaries, PAPER_MODELS, args.compare, bool(args.exclude_ids),
                                        f"{args.model}: {args.samples} samples at temperature {args.temperature}"))
    if failed:
        raise DataError(f"{len(failed)} benchmark(s) not evaluated: {', '.join(failed)}")
    return summaries


def evaluate_bench(bench, source, args, model, processor, rank, world):
    """One benchmark: each rank generates and judges its share of the (item, sample) pairs not yet on disk,
    appending one JSON line per sample; rank 0 returns the summary (the others None)."""
    tasks, skipped = data.load_benchmark(bench, BENCHMARKS[bench], source, args.image_root, not args.no_image,
                                         records.read_ids(args.exclude_ids, bench), args.limit)
    done = open_records(Path(args.out), bench, args, rank)
    todo = shard([(t, k) for t in tasks for k in range(args.samples) if (t["id"], k) not in done], rank, world)
    path = Path(args.out) / (f"{bench}.jsonl" if world == 1 else f"{bench}.rank{rank}.jsonl")
    decoded = {"decode_forwards": 0, "live": 0.0, "slots": 0, "generated": len(todo)}  # occupancy: live / slots
    with open(path, "a") as f, tqdm(total=len(todo), desc=bench, disable=rank != 0) as bar:
        if f.tell() and not path.read_bytes().endswith(b"\n"):
            f.write("\n")  # end the line a crash cut short; records.read_records skips it
        for start in range(0, len(todo), args.batch_size * 16):  # parts, each on disk before the next: resumable
            part, s = todo[start:start + args.batch_size * 16], {}
            seeds = [generate.row_seed(args.seed, zlib.crc32(f"{t['id']}/{k}".encode())) for t, k in part]
            prompts = [prompt_text(bench, t, args.template) for t, _ in part]
            chats = [[data.user_message(p, [] if args.no_image else t["images"])] for p, (t, _) in zip(prompts, part)]
            completions = generate.generate(model, processor, chats, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p, seed=seeds,
                                   repetition_penalty=args.repetition_penalty,
                                   think_budget=args.think_budget or None, answer_budget=args.answer_budget,
                                   batch_size=args.batch_size, stats=s, compile=args.compile)
            n = s.get("decode_forwards", 0) * min(args.batch_size, len(part))
            decoded |= {"decode_forwards": decoded["decode_forwards"] + s.get("decode_forwards", 0),
                        "live": decoded["live"] + n * s.get("occupancy", 0), "slots": decoded["slots"] + n}
            for (t, k), prompt, c in zip(part, prompts, completions):
                extracted, correct = judge(bench, c.text, t["row"])
                f.write(json.dumps({"id": t["id"], "sample": k, "prompt": prompt, "images": 0 if args.no_image else
                                    len(t["images"]), "response": c.text,
                                    "extracted": extracted, "correct": bool(correct), "finish_reason":
                                    c.finish_reason, "tokens": c.num_tokens, "words": len(c.text.split())}) + "\n")
            f.flush()  # what is on disk is kept by a rerun
            bar.update(len(part))
    decoded = all_reduce_dict(decoded, next(model.parameters()).device)
    if rank != 0:
        return None
    ids = {t["id"] for t in tasks}
    samples = [r for (i, k), r in records.read_records(Path(args.out), bench).items() if i in ids and k < args.samples]
    if args.text_solvable_out:  # Table 6: the items answered right in all K image-free samples
        by_id = {}
        for r in samples:
            by_id.setdefault(r["id"], []).append(r["correct"])
        records.write_solvable(args.text_solvable_out, bench,
                               sorted(i for i, c in by_id.items() if len(c) == args.samples and all(c)))
    # the decoding of this call: after a resume it generated only the samples missing from the records
    return summarize(bench, samples, args.samples, skipped) | {"model": args.model, "fingerprint": args.fingerprint,
                                                               "generated": int(decoded["generated"]),
                                                               "decode_forwards": int(decoded["decode_forwards"]),
                                                               "occupancy": decoded["live"] / max(decoded["slots"], 1)}


def prompt_text(bench, t, template=None):
    """The exact user turn: the benchmark's appendix-C template (or `template`), the question, its options."""
    return data.eval_prompt(t["question"], t["options"], template or BENCHMARKS[bench]["template"])


# ====================================================================================================
# Plumbing: where the data comes from, and summaries (the files on disk, records and results: plumbing/records.py)

def requested(args):
    """The benchmarks asked for, and where each one's rows come from (--data; the hub where not given)."""
    benches = [b for b in BENCHMARKS if b != "custom"] if args.bench == "all" else \
        list(dict.fromkeys(b.strip() for b in args.bench.split(",") if b.strip()))  # all: the paper's; each once
    if unknown := [b for b in benches if b not in BENCHMARKS]:
        raise DataError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if not benches:
        raise DataError(f"--bench {args.bench!r} names no benchmark; known: {', '.join(BENCHMARKS)}")
    given = {}
    for entry in args.data:
        name, sep, path = entry.partition("=")
        if sep and name in BENCHMARKS:
            given[name] = path
        elif entry == "toy" or len(benches) == 1:
            given.update({b: entry for b in benches})
        else:
            raise DataError(f"--data {entry}: with several benchmarks, write BENCH=PATH")
    return benches, given


def open_records(out, bench, args, rank):
    """The records `out` holds for `bench`, if the same weights made them under the same protocol (plumbing)."""
    protocol = {k: getattr(args, k) for k in ("temperature", "top_p", "max_new_tokens", "think_budget",
                                              "answer_budget", "no_image", "min_pixels", "max_pixels", "seed",
                                              "template")}
    if args.repetition_penalty != 1.0:  # recorded only when used: records made before the flag existed stay valid
        protocol["repetition_penalty"] = args.repetition_penalty
    records.reuse_records(out, bench, protocol, args.fingerprint, args.model, rank)
    return records.read_records(out, bench)


def summarize(bench, records, k, skipped):
    by_id = {}
    for r in records:
        by_id.setdefault(r["id"], []).append(r)
    n = len(by_id)

    def majority(samples):  # maj@K: the most frequent extracted answer (first seen on ties)
        votes = Counter(s["extracted"] for s in samples if s["extracted"] not in (None, ""))
        return bool(votes) and any(s["correct"] for s in samples if s["extracted"] == votes.most_common(1)[0][0])
    pct = lambda x: round(100 * x / max(n, 1), 2)  # noqa: E731
    return {"bench": bench, "n": n, "samples": k, "skipped": skipped,
            "accuracy": round(100 * sum(r["correct"] for r in records) / max(len(records), 1), 2),
            f"maj@{k}": pct(sum(majority(s) for s in by_id.values())),
            f"pass@{k}": pct(sum(any(x["correct"] for x in s) for s in by_id.values())),
            "forced_exit_pct": round(100 * sum(r["finish_reason"] == "forced_exit" for r in records)
                                     / max(len(records), 1), 2),
            "mean_words": round(sum(r["words"] for r in records) / max(len(records), 1), 1),
            "label": BENCHMARKS.get(bench, {}).get("label", bench), "paper": paper_numbers(bench),
            "paper_text_solvable": TEXT_SOLVABLE.get(bench)}


if __name__ == "__main__":
    cli(main)
