"""Data and models for X-Reasoner (arXiv 2505.03981): prompts, dataset rows -> model inputs, loading.

Every stage imports this file; it holds no training logic. Three things live here:

1. What the paper prints: its prompt templates (appendix C), word for word, and its published numbers, each with
   the figure or table it comes from (evaluate.py --compare sets them beside ours).
2. Row converters for the two training sets, in their published schemas:
   - SFT: OpenThoughts-114k (`system`, `conversations=[{from: user}, {from: assistant}]`), the assistant
     value wrapped in <|begin_of_thought|> ... <|end_of_solution|>. We rewrite it to the paper's
     `<think>...</think><answer>...</answer>` format and mask the loss to the assistant's tokens.
   - RL: Orz-math-57k (a JSON list of `[{from: human, value}, {from: assistant, ground_truth: {value}}]`),
     plus MedQA-style multiple-choice rows for the X-Reasoner-Med continuation.
   - Evaluation: each benchmark's row (MMMU's string-repr options and image_1..7, MathVista's choices, ...)
     reduced to one task dict; evaluate.py says which converter serves which benchmark, load_benchmark reads
     them, and read_records reads back evaluate.py's per-sample records.
   Malformed rows are counted and skipped with a message, never dropped silently.
3. Model loading through `from_pretrained`, including `--model tiny`: a few-layer Qwen2.5-VL built once,
   offline, with the real transformers classes and the real processor (toy/tiny.py), so every stage runs on a
   CPU through exactly the code path that loads Qwen/Qwen2.5-VL-7B-Instruct.

    python data.py --model tiny           # build (if needed) and print the tiny checkpoint's path
    python data.py --sft toy              # convert the toy SFT set and print its statistics
"""
import argparse
import ast
import hashlib
import json
import os
import re
import sys
import urllib.request
import zlib
from pathlib import Path

# ----------------------------------------------------------------------------------------------------
# The paper's prompts (appendix C), verbatim.
TRAIN_PROMPT = (
    "You will solve a problem/request. You should provide your thoughts within <think> </think> tags "
    "before providing the answer.\nWrite your final answer within <answer> </answer> tags. "
    "Here is the question: {question}"
)
EVAL_MC_PROMPT = (
    "You should provide your thoughts within <think> </think> tags, then answer with just one of the "
    "options below within <answer> </answer> tags (For example, if the question is \n'Is the earth flat?\n"
    " A: Yes \nB: No', you should answer with <think>...</think> <answer>B: No </answer>). "
    "Here is the question: {question}"
)
EVAL_MATH_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and you as the assistant solves "
    "it. You should first think about the reasoning process in the mind and then provide the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think><answer> the final answer as the "
    "option letter or the number depending on the question </answer> (For example, if the question is \n"
    "'Is the earth flat?\n A: Yes \nB: No', you should answer with <think> your reasoning </think> "
    "<answer>B: No</answer>. If the question is 'What is 1+1?', you should answer with <think> your "
    "reasoning </think> <answer>2 </answer>).\n\nHere is the question: {question}"
)
OPTIONS_SUFFIX = " Options:\n\n{options}"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

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
# Default sources (the paper's). Each also accepts a local .json/.jsonl/.parquet path.
OPENTHOUGHTS = "open-thoughts/OpenThoughts-114k"
ORZ_MATH_URL = ("https://github.com/Open-Reasoner-Zero/Open-Reasoner-Zero/raw/refs/heads/main/"
                "data/orz_math_57k_collected.json")
BASE_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
TOY_DIR = Path(__file__).resolve().parent / "toy"
TOY = {"sft": TOY_DIR / "sft.jsonl", "rl": TOY_DIR / "rl.json", "mathvista": TOY_DIR / "mathvista.json"}
CACHE = Path(os.environ.get("XREASONER_CACHE", Path.home() / ".cache" / "x-reasoner"))
IM_END = "<|im_end|>"


class DataError(ValueError):
    """Bad input the user can fix (missing file, unusable dataset); scripts print it as one line."""


# ----------------------------------------------------------------------------------------------------
# Reading rows from the hub, a URL or a local file

def read_rows(source, split="train", toy=None, config=None):
    """Rows of a dataset as an iterable of dicts/lists: `toy`, a local file, a URL or a hub id (+ config)."""
    if source == "toy":
        source = str(TOY[toy])
    path = Path(source)
    if path.is_file():
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
            return list(rows.values()) if isinstance(rows, dict) else rows  # MathVista: {pid: row}
        if path.suffix == ".jsonl":
            return list(iter_jsonl(path))
        if path.suffix == ".parquet":
            import datasets
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        raise DataError(f"{source}: unsupported file type {path.suffix!r} (use .json, .jsonl or .parquet)")
    if source.startswith(("http://", "https://")):
        local = CACHE / "downloads" / source.rsplit("/", 1)[-1]
        if not local.exists():
            try:
                local.parent.mkdir(parents=True, exist_ok=True)
                urllib.request.urlretrieve(source, str(local) + ".part")
                os.replace(str(local) + ".part", local)  # a half download never looks complete
            except OSError as e:
                raise DataError(f"cannot download {source} ({e}); download it yourself and pass the path") from e
        return read_rows(str(local))
    if path.suffix in (".json", ".jsonl", ".parquet") or source.startswith((".", "/")):
        raise DataError(f"{source}: no such file")
    try:
        import datasets
        return datasets.load_dataset(source, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, typo, gated: all end in the same advice
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = f"{source}/{config}" if config else source
        raise DataError(f"cannot load {name!r}: not a local file, and the hub load failed ({first})") from e


def write_jsonl(path, rows):
    """Rows as JSON lines, written aside and renamed: a crash never leaves half a file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def iter_jsonl(path):
    """The rows of a JSONL file one at a time; a line that is not JSON becomes a ValueError naming file and line,
    which convert_rows counts as a malformed row instead of stopping."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    yield ValueError(f"{path} line {n} is not JSON ({e.msg})")


def read_ids(paths, bench):
    """Ids to leave out of `bench`: the union over files, each a JSON list or lines of "id" (any benchmark) or
    "bench<TAB>id" (as --text-solvable-out writes them)."""
    ids = set()
    for path in paths:
        text = Path(path).read_text()
        if text.lstrip().startswith("["):
            ids |= set(map(str, json.loads(text)))
            continue
        for line in filter(str.strip, text.splitlines()):
            b, tab, i = line.rstrip("\n").partition("\t")
            ids |= {i} if tab and b == bench else set() if tab else {line.strip()}
    return ids


def write_solvable(path, bench, ids):
    """Record `bench`'s text-solvable ids in `path` beside the other benchmarks' (one file serves a run)."""
    path = Path(path)
    keep = [line for line in (path.read_text().splitlines() if path.exists() else [])
            if not line.startswith(bench + "\t")]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep + [f"{bench}\t{i}" for i in ids]))
    tmp.replace(path)


def read_records(out, bench):
    """evaluate.py's per-sample records for `bench` in `out`, by (id, sample), from every rank's file."""
    records, bad = {}, 0
    for path in sorted(out.glob(f"{bench}.jsonl")) + sorted(out.glob(f"{bench}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                records[(r["id"], r["sample"])] = r
            except (json.JSONDecodeError, KeyError):
                bad += 1  # a line cut short by a crash: that sample is generated again
    if bad:
        print(f"{bench}: ignoring {bad} unreadable lines in {out}", file=sys.stderr)
    return records


def iter_rows(source, toy=None):
    """Like read_rows, but a local JSONL file is streamed rather than held in memory at once."""
    path = Path(str(TOY[toy]) if source == "toy" else source)
    return iter_jsonl(path) if path.is_file() and path.suffix == ".jsonl" else read_rows(source, toy=toy)


def convert_rows(rows, parse, what):
    """Apply `parse` to every row; count and report the malformed ones (parse raises ValueError/KeyError...)."""
    out, bad, first_error = [], 0, None
    for row in rows:
        try:
            if isinstance(row, Exception):  # a row that could not even be read (iter_jsonl)
                raise row
            out.append(parse(row))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as e:  # OSError: images
            bad += 1
            first_error = first_error or f"{type(e).__name__}: {e}"
    if bad:
        print(f"{what}: skipped {bad} of {bad + len(out)} malformed rows (first: {first_error})", file=sys.stderr)
    if not out:
        raise DataError(f"{what}: no usable rows ({bad} malformed; first: {first_error})")
    return out


# ----------------------------------------------------------------------------------------------------
# Prompts as chat messages (the Qwen2.5-VL processor's format: text and PIL images as content parts)

def format_options(options):
    return "\n".join(f"{LETTERS[i]}: {text}" for i, text in enumerate(options))


def user_message(text, images=()):
    """A user turn; image k goes where the text says <image k> (MMMU), the others before the text."""
    parts, placed = [], set()
    for piece in re.split(r"(<image \d+>)", text):
        k = int(piece[7:-1]) - 1 if re.fullmatch(r"<image \d+>", piece) else None
        if k is not None and k < len(images) and k not in placed:
            parts.append({"type": "image", "image": images[k]})
            placed.add(k)
        elif piece:
            parts.append({"type": "text", "text": piece})
    first = [{"type": "image", "image": im} for k, im in enumerate(images) if k not in placed]
    return {"role": "user", "content": first + parts}


def eval_prompt(question, options=None, template="mc"):
    """Appendix C: the math template (mathematical benchmarks, their multiple-choice items included) or the
    multiple-choice template (or, `train`, the training prompt); followed by the options when there are some."""
    text = {"mc": EVAL_MC_PROMPT, "math": EVAL_MATH_PROMPT, "train": TRAIN_PROMPT}[template].format(question=question)
    return text + OPTIONS_SUFFIX.format(options=format_options(options)) if options else text


def options_list(value):
    """Options as a list, from a list, a {letter: text} dict (MedQA) or a list's string repr (MMMU)."""
    if isinstance(value, str):
        value = ast.literal_eval(value) if value.strip() else []
    if isinstance(value, dict):
        return [value[k] for k in sorted(value) if value[k] is not None and str(value[k]).strip()]
    if value and all(isinstance(o, (list, tuple)) for o in value):  # MMMU-Pro has "[['A', 'B', ...]]": one list
        value = [o for inner in value for o in inner]
    return [str(o) for o in (value or [])]


def load_image(value, root=None):
    """An RGB PIL image from a decoded hub image, a {bytes, path} dict or a path (relative to `root`)."""
    from PIL import Image
    if hasattr(value, "convert"):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        import io
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    path = Path(value["path"] if isinstance(value, dict) else value)
    path = path if path.is_absolute() or root is None else Path(root) / path
    if not path.is_file():
        raise FileNotFoundError(f"missing image {path}")
    return Image.open(path).convert("RGB")


# ----------------------------------------------------------------------------------------------------
# Benchmark rows (evaluate.py) -> one task dict: question, options, answer (a letter when there are options)

def task(question, answer, options=None, images=(), pid=None, letter=True, open_ended=False):
    """A benchmark row reduced to what the prompt and the judge need (`answer`: a letter when there are options)."""
    if answer is None or str(answer).strip() == "":
        raise ValueError("row has no answer")
    options = options or None
    answer = str(answer).strip()
    if options and letter and not (len(answer) == 1 and "A" <= answer.upper() < LETTERS[len(options)]):
        raise ValueError(f"answer {answer!r} is not one of the {len(options)} option letters")
    return {"id": str(pid), "question": str(question).strip(), "options": options, "open": open_ended,
            "answer": answer.upper() if options and letter else answer, "images": [i for i in images if i]}


MMMU_SUBJECTS = ("Accounting Agriculture Architecture_and_Engineering Art Art_Theory Basic_Medical_Science Biology "
                 "Chemistry Clinical_Medicine Computer_Science Design Diagnostics_and_Laboratory_Medicine Economics "
                 "Electronics Energy_and_Power Finance Geography History Literature Manage Marketing Materials Math "
                 "Mechanical_Engineering Music Pharmacy Physics Psychology Public_Health Sociology").split()
MMMU_HEALTH = ("Basic_Medical_Science Clinical_Medicine Diagnostics_and_Laboratory_Medicine Pharmacy "
               "Public_Health").split()


def mmmu_subject(row):  # MMMU-Pro rows name it; MMMU's ids hold it: validation_Art_12
    return (row.get("subject") or re.sub(r"^[a-z]+_|_\d+$", "", str(row.get("id", "")))).replace(" ", "_")


def mmmu_task(row):  # MMMU and MMMU-Pro: options as a string repr, images in image_1..image_7
    is_open = row.get("question_type") == "open"  # free form, judged by MMMU's parse_open_response
    return task(row["question"], row["answer"], [] if is_open else options_list(row.get("options")),
                [row.get(f"image_{k}") for k in range(1, 8)], row["id"], open_ended=is_open)


def mathvista_task(row):  # the answer is a choice's text, not a letter
    return task(row["question"] + (f" (Unit: {row['unit']})" if row.get("unit") else ""), row["answer"],
                row.get("choices") if row["question_type"] == "multi_choice" else None,
                [row.get("decoded_image") or row.get("image")], row["pid"], letter=False)


def mmstar_task(row):  # options live in the question: "...\nOptions: A: x, B: y, C: z, D: w"
    stem, _, opts = row["question"].rpartition("Options:")
    options = [o.strip().rstrip(",").strip() for o in re.split(r"(?:^|,\s*)[A-F]:\s", opts.strip())[1:]]
    return task(stem or row["question"], row["answer"], options, [row["image"]], row["index"])


def omnimed_task(row):  # OmniMedVQA: option_A..option_D, the answer as the option's text
    options = [row[f"option_{k}"] for k in "ABCDEF" if row.get(f"option_{k}") not in (None, "")]
    answer = LETTERS[options.index(row["gt_answer"])]  # ValueError (counted) if the answer is no option
    return task(row["question"], answer, options, [row["image_path"]], row["question_id"])


def fields(question, answer, options=None, images=None, pid="id", strip=None):
    """A task() maker for a schema given by field names (images: one path/image or a list of them)."""
    def make(row):
        ims = row.get(images) if images else None
        q = row[question].split(strip)[0] if strip else row[question]
        return task(q, row[answer], options_list(row.get(options)) if options else None,
                    ims if isinstance(ims, list) else [ims], row.get(pid, zlib.crc32(row[question].encode())))
    return make


TOY_BENCH = {"mathvista": TOY["mathvista"], "mmmu": TOY_DIR / "mmmu.json", "mmmu-pro": TOY_DIR / "mmmu_pro.json",
             "medqa": TOY_DIR / "medqa.jsonl", "mmlu-pro": TOY_DIR / "mmlu_pro.json"}  # offline fixtures


def load_benchmark(bench, spec, source=None, image_root=None, images=True, exclude=(), limit=None):
    """Benchmark `bench` (evaluate.BENCHMARKS[bench] is `spec`) from the hub, a local file or directory, or `toy`:
    (tasks with images loaded, rows skipped). Malformed rows and missing images are counted, then skipped;
    `exclude` (ids) and `limit` (first N rows) apply before any image is read."""
    if source is None and spec["hub"] is None:
        raise DataError(f"{bench}: no public hub copy; pass --data {bench}=PATH (schema in evaluate.py)")
    if source == "toy":
        if bench not in TOY_BENCH:
            raise DataError(f"{bench}: no toy fixture (toy fixtures: {', '.join(TOY_BENCH)})")
        source = str(TOY_BENCH[bench])
    if source is not None:
        files = sorted(p for p in Path(source).glob("*") if p.suffix in (".json", ".jsonl", ".parquet")) \
            if Path(source).is_dir() else [source]
        rows = [r for f in files for r in read_rows(str(f))]
        root = image_root or (source if Path(source).is_dir() else Path(source).parent)
    else:
        rows = [r for c in spec["configs"] for r in read_rows(spec["hub"], spec["split"], config=c)]
        root = image_root
    rows = [r for r in rows if spec.get("keep", lambda r: True)(r)]
    if source is None and len(rows) != spec["n"]:
        print(f"{bench}: {len(rows)} rows where the dataset card has {spec['n']}", file=sys.stderr)
    if spec.get("sample") and len(rows) > spec["sample"]:
        import random
        rows = random.Random(0).sample(rows, spec["sample"])
    if exclude or limit:
        def wanted(row):
            try:
                return spec["task"](row)["id"] not in exclude
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                return True  # malformed: convert_rows counts it
        rows = [r for r in rows if wanted(r)][:limit]

    def convert(row):
        t = spec["task"](row)
        return t | {"images": [load_image(im, root) for im in t["images"]] if images else [], "row": row}
    tasks = convert_rows(rows, convert, bench)
    if len({t["id"] for t in tasks}) != len(tasks):
        raise DataError(f"{bench}: item ids are not unique")
    return tasks, len(rows) - len(tasks)


# ----------------------------------------------------------------------------------------------------
# SFT rows: OpenThoughts-114k -> paper format -> (input_ids, labels)

def parse_openthoughts(row):
    """(question, assistant text in the paper's format) from one OpenThoughts-114k row."""
    turns = {t["from"]: t["value"] for t in row["conversations"]}
    question, reply = turns["user"].strip(), turns["assistant"]
    if not question:
        raise ValueError("empty question")
    markers = ("<|begin_of_thought|>", "<|end_of_thought|>", "<|begin_of_solution|>", "<|end_of_solution|>")
    cuts = [reply.find(m) for m in markers]
    if min(cuts) < 0 or cuts != sorted(cuts):
        raise ValueError("assistant turn lacks the thought/solution markers")
    thought = reply[cuts[0] + len(markers[0]):cuts[1]].strip()
    solution = reply[cuts[2] + len(markers[2]):cuts[3]].strip()
    if not thought or not solution:
        raise ValueError("empty thought or solution")
    return question, f"<think>\n{thought}\n</think>\n<answer>\n{solution}\n</answer>"


def parse_distilled(row):
    """(question, response) from a distilled row (generate.py --distil): {"question", "response", ...}, the
    question already holding its options; the response must be in the paper's <think>/<answer> format."""
    question, response = str(row["question"]).strip(), str(row["response"]).strip()
    if not question or "</think>" not in response or not re.search(r"<answer>.*?</answer>", response, re.S):
        raise ValueError("distilled row lacks a question or a <think>...</think><answer>...</answer> response")
    return question, response


def parse_chat(row):
    """(user text, reply) from a chat row, {"messages": [{"role": "user", "content": str},
    {"role": "assistant", "content": str}]}: one turn each, asked as written (no template)."""
    turns = row["messages"]
    if [t.get("role") for t in turns] != ["user", "assistant"]:
        raise ValueError("a chat row needs exactly one user turn, then one assistant turn")
    question, reply = (str(t["content"]).strip() if isinstance(t["content"], str) else None for t in turns)
    if not question or not reply:
        raise ValueError("chat turns must be non-empty strings")
    return question, reply


def parse_sft_row(row):
    """An SFT row -> (question, reply), in any of three schemas: OpenThoughts-114k (`conversations`) and distilled
    (`question`, `response`), both asked through appendix C's training prompt (sft_template), or a chat
    (`messages`), asked as written. Any row may name `images` (paths relative to its file), placed where the text
    says <image k>."""
    if "messages" in row:
        return parse_chat(row)
    return parse_openthoughts(row) if "conversations" in row else parse_distilled(row)


def sft_template(row):
    return None if "messages" in row else TRAIN_PROMPT


def expand_image_pads(text, counts):
    """The chat template writes one <|image_pad|> per image; the model reads one per merged patch (as the
    processor expands them)."""
    pieces = text.split("<|image_pad|>")
    if len(pieces) != len(counts) + 1:
        raise ValueError(f"{len(pieces) - 1} image places in the text for {len(counts)} images")
    return pieces[0] + "".join("<|image_pad|>" * n + piece for n, piece in zip(counts, pieces[1:]))


def sft_example(question, answer, processor, max_len, images=(), template=TRAIN_PROMPT, root=None):
    """Tokenize one conversation with the model's chat template; labels = -100 except the assistant's reply.

    The labeled span is the assistant text plus its closing <|im_end|>, so the model learns to stop.
    Labels come from character offsets of the full rendering, so tokens are exactly those the model sees.
    `images` (paths, relative to `root`) go where the question says <image k>; the example records them.
    """
    pictures = [load_image(p, root) for p in images]
    if pictures and not hasattr(processor, "image_processor"):
        raise ValueError("a row with images, for a model that reads no images")
    user = user_message(template.format(question=question) if template else question, pictures)
    prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(
        [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template does not render as prompt + answer + <|im_end|>")
    if pictures:
        grid = processor.image_processor(images=pictures, return_tensors="pt")["image_grid_thw"]
        counts = (grid.prod(-1) // processor.image_processor.merge_size ** 2).tolist()
        prompt, full = expand_image_pads(prompt, counts), expand_image_pads(full, counts)
    start, end = len(prompt), len(prompt) + len(answer) + len(IM_END)
    if full[start:end] != answer + IM_END:
        raise ValueError("chat template does not render as prompt + answer + <|im_end|>")
    # Drop what the template puts after <|im_end|> (a newline): no label, so no reason to compute it.
    enc = processor.tokenizer(full[:end], add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if start <= a and b <= end else -100 for t, (a, b) in zip(ids, enc["offset_mapping"])]
    truncated = len(ids) > max_len
    ids, labels = ids[:max_len], labels[:max_len]
    if all(l == -100 for l in labels):
        raise ValueError(f"prompt alone is longer than max_len={max_len}")
    paths = [str(Path(p) if Path(p).is_absolute() or root is None else Path(root) / p) for p in images]
    return {"input_ids": ids, "labels": labels, "truncated": truncated, "images": paths}


def load_sft_data(source, processor, max_len=4096, build=True, wait=None, report=True):
    """The tokenized SFT set (SFTSet), from a cache tokenized once per machine (sft_cache). Under torchrun the
    ranks with `build` (local rank 0) make it while the others wait in `wait()`, then all of them map it."""
    path = sft_cache(source, processor, max_len)
    error = None
    if build and not (path / "meta.json").exists():
        try:
            build_sft_cache(source, processor, max_len, path)
        except DataError as e:  # every rank must still reach wait(), or the others would hang
            error = e
    if wait is not None and wait(error is not None):
        raise error or DataError(f"sft data: preparing {source} failed on another rank (its error says why)")
    if error:
        raise error
    examples = SFTSet(path)
    m = examples.meta
    if report:
        print(f"sft data: {len(examples)} examples, {m['truncated']} truncated to {max_len} tokens"
              + (f", {m['skipped']} malformed rows skipped" if m["skipped"] else "") + f" (cache {path})",
              file=sys.stderr)
    return examples


# ----------------------------------------------------------------------------------------------------
# The SFT set at scale: tokenized once per machine into an int32 file that every rank maps from disk. 114k
# conversations of up to 4,096 tokens are ~1 GB as int32 but 15-20 GB as Python lists of ints, per rank.

SFT_CACHE_VERSION = 1  # bump when sft_example's output changes


def source_identity(source):
    """What the tokenized set depends on in the source: a file's path, size and mtime, or a hub dataset's
    fingerprint."""
    path = Path(str(TOY["sft"]) if source == "toy" else source)
    if path.is_file():
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    rows = read_rows(source, toy="sft")
    return [source, getattr(rows, "_fingerprint", None) or len(rows)]


def sft_cache(source, processor, max_len):
    """The cache directory for this source, tokenizer, chat template and max_len."""
    tok = tokenizer_of(processor)
    template = getattr(processor, "chat_template", None) or tok.chat_template
    key = json.dumps([source_identity(source), tok.backend_tokenizer.to_str(), template, max_len, SFT_CACHE_VERSION])
    return CACHE / "sft" / hashlib.sha1(key.encode()).hexdigest()[:16]


def _tokenize_chunk(rows):
    """Worker: rows -> (int32 token bytes, length, first labeled position, truncated) or the error's text."""
    import numpy as np
    out = []
    for row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            e = sft_example(*parse_sft_row(row), _WORKER["processor"], _WORKER["max_len"], row.get("images") or [],
                            sft_template(row), _WORKER["root"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            out.append(f"{type(err).__name__}: {err}")
            continue
        start = next(i for i, label in enumerate(e["labels"]) if label != -100)
        if any(label == -100 for label in e["labels"][start:]):  # the reply is one span at the end
            raise AssertionError("sft_example produced a non-contiguous label span")
        out.append((np.asarray(e["input_ids"], dtype=np.int32).tobytes(), len(e["input_ids"]), start, e["truncated"],
                    e["images"]))
    return out


_WORKER = {}


def _init_worker(processor, max_len, root=None):
    _WORKER.update(processor=processor, max_len=max_len, root=root)


def _chunks(rows, size=256):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_sft_cache(source, processor, max_len, path, processes=None):
    """Tokenize every row once (in `processes` worker processes) into path/tokens.bin (int32, concatenated),
    path/index.pt ((N, 3): offset, length, first labeled position) and path/meta.json; written aside, renamed."""
    import multiprocessing
    import shutil
    import tempfile
    import torch
    from tqdm import tqdm
    import itertools
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    root = Path(str(TOY["sft"]) if source == "toy" else source).parent  # where relative image paths start
    _init_worker(processor, max_len, root)
    rows = iter(iter_rows(source, toy="sft"))
    head = list(itertools.islice(rows, 2048))
    # A few thousand rows take seconds here; more go to worker processes. They start from a clean forkserver,
    # not by forking this process, whose other threads may hold locks a forked child would wait on for ever
    # (they import the launching script, so a script calling this guards its work with __name__ == "__main__").
    pool = multiprocessing.get_context("forkserver").Pool(
        processes or min(8, os.cpu_count() or 1), _init_worker, (processor, max_len, root)) \
        if len(head) == 2048 else None
    index, images, bad, first_error, truncated, offset = [], {}, 0, None, 0, 0
    with open(tmp / "tokens.bin", "wb") as f, tqdm(desc="tokenize", unit=" rows", mininterval=5, delay=2) as bar:
        chunks = _chunks(itertools.chain(head, rows))
        for results in (pool.imap(_tokenize_chunk, chunks) if pool else map(_tokenize_chunk, chunks)):
            for r in results:
                if isinstance(r, str):
                    bad, first_error = bad + 1, first_error or r
                    continue
                f.write(r[0])
                if r[4]:
                    images[len(index)] = r[4]
                index.append((offset, r[1], r[2]))
                offset, truncated = offset + r[1], truncated + r[3]
            bar.update(len(results))
    if pool:
        pool.close()
        pool.join()
    if not index:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"sft data: no usable rows ({bad} malformed; first: {first_error})")
    if bad:
        print(f"sft data: skipped {bad} of {bad + len(index)} malformed rows (first: {first_error})", file=sys.stderr)
    torch.save(torch.tensor(index, dtype=torch.int64), tmp / "index.pt")
    if images:  # example index -> its image paths, read again when a batch is made
        (tmp / "images.json").write_text(json.dumps(images))
    (tmp / "meta.json").write_text(json.dumps({"source": str(source), "examples": len(index), "tokens": offset,
                                               "truncated": truncated, "skipped": bad, "max_len": max_len}))
    try:
        os.rename(tmp, path)
    except OSError:  # another machine sharing this cache finished first; its files are the same
        shutil.rmtree(tmp, ignore_errors=True)


class SFTSet:
    """The tokenized SFT set, mapped from disk: only the pages a rank reads become resident."""

    def __init__(self, path):
        import torch
        index = torch.load(Path(path) / "index.pt")  # (N, 3): offset, length, first labeled position
        self.meta = json.loads((Path(path) / "meta.json").read_text())
        self.offsets, self.label_starts = index[:, 0].tolist(), index[:, 2].tolist()
        self.lengths = index[:, 1].tolist()
        # tokens each sequence is trained to predict (position 0 predicts nothing)
        self.n_target = (index[:, 1] - index[:, 2].clamp(min=1)).tolist()
        self.tokens = torch.from_file(str(Path(path) / "tokens.bin"), shared=False, size=self.meta["tokens"],
                                      dtype=torch.int32)
        images = Path(path) / "images.json"
        self.images = {int(k): v for k, v in json.loads(images.read_text()).items()} if images.exists() else {}

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        ids = self.tokens[self.offsets[i]:self.offsets[i] + self.lengths[i]].long()
        labels = ids.clone()
        labels[:self.label_starts[i]] = -100
        return {"input_ids": ids, "labels": labels, "images": self.images.get(i, [])}


# ----------------------------------------------------------------------------------------------------
# RL rows: Orz-math-57k (math, verified answer) and MedQA-style rows (multiple choice)

def parse_rl_row(row):
    """One RL prompt: {"messages": [user], "answer": gold, "options": list|None}."""
    if isinstance(row, list):  # Orz: [{from: human, value}, {from: assistant, ground_truth: {value}}]
        question, answer, options = row[0]["value"], row[1]["ground_truth"]["value"], None
    elif "options" in row:  # MedQA-USMLE: question, options {A: text}, answer_idx
        options = options_list(row["options"])
        question, answer = row["question"], row.get("answer_idx") or row["answer"]
    else:
        question, answer, options = row["question"], row["answer"], None
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):  # None, [1, 2], True: no answer
        raise ValueError(f"answer is {type(answer).__name__} {answer!r}, not a string or a number")
    question, answer = str(question).strip(), str(answer).strip()
    if not question or not answer:
        raise ValueError("empty question or answer")
    if options:  # appendix C: the options follow the question
        question += OPTIONS_SUFFIX.format(options=format_options(options))
    return {"messages": [user_message(TRAIN_PROMPT.format(question=question))], "question": question,
            "answer": answer, "options": options}


def load_rl_data(source):
    return convert_rows(read_rows(source, toy="rl"), parse_rl_row, "rl data")


# ----------------------------------------------------------------------------------------------------
# Models: from_pretrained for everything; `tiny` is built locally once (toy/tiny.py), then read back the same way

TINY = ("tiny", "tiny-text")  # names of the locally built models



def check_model(name):
    """Fail at once, in one line, on a --model that cannot load: a path that does not exist and is no hub id, a
    directory without a readable config.json, missing or truncated weight files (their headers say how long
    they must be). A hub id passes: only the hub can tell."""
    path = Path(name)
    if name in TINY:
        return
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith(".") and not path.parent.is_dir():
            return  # "org/name", and no local directory "org" it could be a path into
        raise DataError(f"--model {name}: no such directory, and not a hub id")
    if not path.is_dir():
        raise DataError(f"--model {name}: not a directory")
    try:
        json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise DataError(f"--model {name}: no config.json, so not a model directory") from None
    except json.JSONDecodeError as e:
        raise DataError(f"--model {name}: config.json is not valid JSON ({e.msg} at line {e.lineno})") from None
    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        [f.name for f in sorted(path.glob("*.safetensors"))]
    if not shards and not (path / "pytorch_model.bin").exists():
        raise DataError(f"--model {name}: no weights (*.safetensors) in the directory")
    for shard in shards:
        f = path / shard
        if not f.exists():
            raise DataError(f"--model {name}: {shard} is missing")
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(fh.read(n)) if 0 < n < size else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
        if header is None:
            raise DataError(f"--model {name}: {shard} is not a readable safetensors file")
        expected = 8 + n + max([v["data_offsets"][1] for v in header.values() if isinstance(v, dict)
                                and "data_offsets" in v], default=0)
        if size != expected:
            raise DataError(f"--model {name}: {shard} is truncated ({size:,} of {expected:,} bytes)")


def model_fingerprint(name):
    """A short hash of what a model's outputs depend on: its config, and per weight file the size, the header
    and 16 evenly spaced 4 KiB samples of the weights (retrained weights differ everywhere; reading 64 KiB per
    file is fast at any size). For a hub id, the id itself."""
    path = Path(resolve_model(name))
    if not path.is_dir():
        return hashlib.sha1(name.encode()).hexdigest()[:12]
    h = hashlib.sha1((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for k in range(16):
                fh.seek(size * k // 16)
                h.update(fh.read(4096))
    return h.hexdigest()[:12]


def cli_parser(doc):
    """An argument parser whose --help opens with the script's purpose and launch commands (the docstring's first
    two paragraphs), one line per flag, and no abbreviated flags (so presets can see what was passed)."""
    return argparse.ArgumentParser(description="\n\n".join(doc.split("\n\n")[:2]), allow_abbrev=False,
                                   usage="%(prog)s [options]",
                                   formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
                                       prog, max_help_position=34, width=120))


def passed_flags(parser, argv):
    """The options given on the command line (by dest), so that a preset fills in only the others."""
    argv = sys.argv[1:] if argv is None else argv
    return {a.dest for a in parser._actions for opt in a.option_strings
            if any(x == opt or x.startswith(opt + "=") for x in argv)}


def toy_preset(args, preset):
    """`--data toy`: every option the user did not pass takes the value sized for the toy task on a CPU (the
    paper's defaults are for the real data). Returns the one line to announce it with, once the inputs check."""
    chosen = {k: v for k, v in preset.items() if k not in args.passed}
    for k, v in chosen.items():
        setattr(args, k, v)
    return "toy preset: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in chosen.items()) + \
        "; flags you pass win" if chosen else ""


def cli(main):
    """Run a script's main(): bad input (DataError) ends as one line on stderr and exit code 1, no traceback."""
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")


def resolve_model(name):
    """A path or hub id for from_pretrained; `tiny`/`tiny-text` are built on first use (atomically: ranks race)."""
    if name not in TINY:
        check_model(name)
        return name
    from toy import tiny  # the builders: toy/tiny.py
    # The tokenizer is trained on the toy data and templates: a change to them is a new checkpoint.
    version = tiny.VERSION + ("-text" if name == "tiny-text" else "")
    path = CACHE / f"{version}-{hashlib.sha1(repr(tiny.corpus()).encode()).hexdigest()[:8]}"
    if not (path / "config.json").exists():
        import tempfile
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=CACHE, prefix=".tiny-")
        (tiny.build if name == "tiny" else tiny.build_text)(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first; theirs is identical
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def load_processor(name):
    from transformers import AutoProcessor
    path = resolve_model(name)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except OSError as e:
        raise DataError(f"cannot load processor {name!r}: {str(e).splitlines()[0]}") from e
    tokenizer_of(processor).padding_side = "left"
    return processor


def tokenizer_of(processor):
    """A VLM's processor holds its tokenizer; a text-only model's processor is its tokenizer."""
    return getattr(processor, "tokenizer", processor)


def model_class(config):
    """Qwen2.5-VL; a text-only causal LM (a distillation teacher such as QwQ-32B) when there is no vision part."""
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration if hasattr(config, "vision_config") else AutoModelForCausalLM


def transformers_progress(show):
    """transformers' progress bars (reading and writing checkpoint shards): on for one loading process, off for
    the other ranks and for every checkpoint a run writes."""
    from transformers.utils import logging
    logging.enable_progress_bar() if show else logging.disable_progress_bar()


def load_model(name, dtype=None, device="cpu", progress=False):
    """A model from a hub id, a local directory (e.g. an SFT checkpoint), `tiny` or `tiny-text`."""
    import torch
    from transformers import AutoConfig
    transformers_progress(progress)
    path = resolve_model(name)
    try:
        model = model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=dtype or torch.float32)
    except OSError as e:
        raise DataError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from e
    return model.to(device)


def model_from_config(name, dtype=None):
    """The model's architecture with uninitialised weights, on the current default device (`with
    torch.device("meta")`: no memory at all), and its generation settings; load_sharded fills it in."""
    import torch
    from transformers import AutoConfig, GenerationConfig
    path = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(path)
        model = model_class(config)._from_config(config, dtype=dtype or torch.float32)
    except OSError as e:
        raise DataError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from e
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass  # none saved: the defaults from_pretrained would use too
    return model


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="build/resolve a model (`tiny`) and print its path")
    ap.add_argument("--sft", help="convert an SFT source (`toy`, path, hub id) and print statistics")
    ap.add_argument("--rl", help="convert an RL source (`toy`, path, URL) and print statistics")
    ap.add_argument("--max-len", type=int, default=4096)
    args = ap.parse_args()

    def main():
        if args.model:
            print(resolve_model(args.model))
        if args.sft:
            ex = load_sft_data(args.sft, load_processor(args.model or "tiny"), args.max_len)
            lengths = sorted(ex.lengths)
            print(f"{len(ex)} examples; tokens min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}")
        if args.rl:
            rows = load_rl_data(args.rl)
            print(f"{len(rows)} prompts; first: {rows[0]['messages'][0]['content'][-1]['text'][-80:]!r} "
                  f"-> {rows[0]['answer']!r}")
    cli(main)
