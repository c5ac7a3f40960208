"""Data and models for X-Reasoner (arXiv 2505.03981): the paper's prompts, dataset rows -> model inputs, loading.

Every stage imports this file; it holds no training logic. In pipeline order:

- The paper's prompt templates (appendix C), word for word (its published numbers are in evaluate.py).
- SFT rows: OpenThoughts-114k (`conversations=[{from: user}, {from: assistant}]`, the reply wrapped in
  <|begin_of_thought|> ... <|end_of_solution|>) rewritten to the paper's `<think>...</think><answer>...</answer>`,
  the loss masked to the assistant's tokens; tokenized once per machine into a file every rank maps.
- RL rows: Orz-math-57k (`[{from: human, value}, {from: assistant, ground_truth: {value}}]`), plus MedQA-style
  multiple-choice rows for the X-Reasoner-Med continuation.
- Benchmark rows (MMMU's string-repr options and image_1..7, MathVista's choices, ...) -> one task dict each.
- Models through `from_pretrained`, `--model tiny` included: a few-layer Qwen2.5-VL built once, offline, with the
  real transformers classes and processor (plumbing/tiny.py), loaded exactly as Qwen/Qwen2.5-VL-7B-Instruct is.
Malformed rows are counted and skipped with a message, never dropped silently.

    python data.py --model tiny           # build (if needed) and print the tiny checkpoint's path
    python data.py --sft toy              # convert the toy SFT set and print its statistics
"""
import ast
import hashlib
import io
import json
import os
import random
import re
import sys
import urllib.request
import zlib
from pathlib import Path

# torch, transformers, PIL and the token file (torch) are imported where they are used, each marked "heavy":
# `import data` stays light for the processes that only read rows (a test holds it to that).

from plumbing.cli import POSITIVE_INT, DataError, check_model_dir, cli, cli_parser, hub_id
from plumbing import tiny

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
# Default sources (the paper's). Each also accepts a local .json/.jsonl/.parquet path.
OPENTHOUGHTS = "open-thoughts/OpenThoughts-114k"
ORZ_MATH_URL = ("https://github.com/Open-Reasoner-Zero/Open-Reasoner-Zero/raw/refs/heads/main/"
                "data/orz_math_57k_collected.json")
BASE_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
TOY_DIR = Path(__file__).resolve().parent / "toy"
TOY = {"sft": TOY_DIR / "sft.jsonl", "rl": TOY_DIR / "rl.json", "mathvista": TOY_DIR / "mathvista.json"}
CACHE = Path(os.environ.get("XREASONER_CACHE", Path.home() / ".cache" / "x-reasoner"))


def cache_error(e):
    """The one line for a cache that cannot be written (read-only, full, not a directory), naming where it is
    and the variable that moves it."""
    where = f"XREASONER_CACHE={CACHE}" if "XREASONER_CACHE" in os.environ else f"the cache {CACHE}"
    return DataError(f"{where} cannot be written ({e.strerror or e}): point XREASONER_CACHE at a writable directory")
IM_END = "<|im_end|>"


# ----------------------------------------------------------------------------------------------------
# Reading rows from the hub, a URL or a local file

def read_rows(source, split="train", toy=None, config=None):
    """Rows of a dataset as an iterable of dicts/lists: `toy`, a local file, a URL or a hub id (+ config)."""
    if source == "toy":
        source = str(TOY[toy])
    path = Path(source)
    if path.is_file():
        if path.suffix == ".json":
            try:
                rows = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is no part of the JSON
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{source} is not valid JSON ({getattr(e, 'msg', e)}, line {getattr(e, 'lineno', 1)})")
            return list(rows.values()) if isinstance(rows, dict) else rows  # MathVista: {pid: row}
        if path.suffix == ".jsonl":
            return list(iter_jsonl(path))
        if path.suffix == ".parquet":
            import datasets  # heavy, and needed only for parquet and hub sources
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        raise DataError(f"{source}: unsupported file type {path.suffix!r} (use .json, .jsonl or .parquet)")
    if source.startswith(("http://", "https://")):
        local = CACHE / "downloads" / source.rsplit("/", 1)[-1]
        if not local.exists():
            try:
                local.parent.mkdir(parents=True, exist_ok=True)
                urllib.request.urlretrieve(source, str(local) + ".part")
                os.replace(str(local) + ".part", local)  # a half download never looks complete
            except PermissionError as e:
                raise cache_error(e) from None
            except OSError as e:
                raise DataError(f"cannot download {source} ({e}); download it yourself and pass the path") from e
        return read_rows(str(local))
    if path.suffix in (".json", ".jsonl", ".parquet") or source.startswith((".", "/")):
        raise DataError(f"{source}: no such file")
    try:
        import datasets  # heavy, and needed only for parquet and hub sources
        return datasets.load_dataset(source, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, typo, gated: all end in the same advice
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name = f"{source}/{config}" if config else source
        raise DataError(f"cannot load {name!r}: not a local file, and the hub load failed ({first})") from e


def write_jsonl(path, rows):
    """Rows as JSON lines, written aside and renamed: a crash never leaves half a file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a file to write")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {e.strerror}") from e


def iter_jsonl(path):
    """The rows of a JSONL file one at a time; a line that is not JSON becomes a ValueError naming file and line,
    which convert_rows counts as a malformed row instead of stopping."""
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows editors) is not part of line 1
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    yield ValueError(f"{path} line {n} is not JSON ({e.msg})")


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
    if not out:  # one line: the error says the count
        raise DataError(f"{what}: no usable rows ({bad} malformed; first: {first_error})")
    if bad:
        print(f"{what}: skipped {bad} of {bad + len(out)} malformed rows (first: {first_error})", file=sys.stderr)
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
    multiple-choice template (or `train`, the training prompt; `none`, the question alone), then any options."""
    text = {"mc": EVAL_MC_PROMPT, "math": EVAL_MATH_PROMPT, "train": TRAIN_PROMPT, "none": "{question}"}[template]
    text = text.format(question=question)
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
    """An RGB PIL image from a decoded hub image, a {bytes, path} dict or a path (relative to `root`). An image
    that is missing, truncated or not an image is a ValueError naming it: the row is counted and skipped."""
    from PIL import Image  # heavy
    if hasattr(value, "convert"):
        return value.convert("RGB")
    embedded = isinstance(value, dict) and value.get("bytes")
    path = Path(value["path"] if isinstance(value, dict) and value.get("path") else "(embedded)" if embedded
                else value)
    path = path if embedded or path.is_absolute() or root is None else Path(root) / path
    if not embedded and not path.is_file():
        raise ValueError(f"image {path} is missing")
    try:  # convert() decodes the whole image: a truncated file fails here, not later in a batch
        return Image.open(io.BytesIO(value["bytes"]) if embedded else path).convert("RGB")
    except OSError as e:  # PIL's truncated-file and unidentified-image errors name no file
        problem = "is truncated" if "truncated" in str(e) else f"cannot be read ({e})"
        raise ValueError(f"image {path} {problem}") from None


# ----------------------------------------------------------------------------------------------------
# SFT rows: OpenThoughts-114k -> paper format -> (input_ids, labels), tokenized once per machine

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
    `images` (paths, relative to `root`) go where the question says <image k>; the example records them.
    """
    pictures = [load_image(p, root) for p in images]
    if pictures and not hasattr(processor, "image_processor"):
        raise ValueError("a row with images, for a model that reads no images")
    user = user_message(template.format(question=question) if template else question, pictures)
    prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(
        [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False)
    if not full.startswith(prompt + answer + IM_END):
        raise ValueError("chat template does not render as prompt + answer + <|im_end|>")
    if pictures:
        grid = processor.image_processor(images=pictures, return_tensors="pt")["image_grid_thw"]
        prompt = expand_image_pads(prompt, (grid.prod(-1) // processor.image_processor.merge_size ** 2).tolist())
    # Prompt and reply tokenized apart, as generation sees them (the prompt encoded alone, then the reply's tokens):
    # in one string Qwen's BPE would merge a reply's leading newlines into the prompt's last "\n".
    # What the template puts after <|im_end|> (a newline) is dropped: no label, so no reason to compute it.
    prompt_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = processor.tokenizer(answer + IM_END, add_special_tokens=False)["input_ids"]
    ids, labels = prompt_ids + reply_ids, [-100] * len(prompt_ids) + reply_ids
    truncated = len(ids) > max_len
    ids, labels = ids[:max_len], labels[:max_len]
    if all(l == -100 for l in labels):
        raise ValueError(f"prompt alone is longer than max_len={max_len}")
    paths = [str(Path(p) if Path(p).is_absolute() or root is None else Path(root) / p) for p in images]
    return {"input_ids": ids, "labels": labels, "truncated": truncated, "images": paths}


def sft_row(row, processor, max_len, root):
    """One SFT row of any schema, tokenized: the token file's row function (it runs in the tokenizing workers)."""
    return sft_example(*parse_sft_row(row), processor, max_len, row.get("images") or [], sft_template(row), root)


SFT_CACHE_VERSION = 2  # bump when sft_example's output changes


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


def load_sft_data(source, processor, max_len=4096, build=True, wait=None, report=True):
    """The tokenized SFT set (tokens.TokenFile), tokenized once per machine (sft_cache). Under torchrun the
    ranks with `build` (local rank 0) make it while the others wait in `wait()`, then all of them map it."""
    from plumbing import tokens  # heavy
    path = sft_cache(source, processor, max_len)
    error = None
    if build and not (path / "meta.json").exists():
        try:
            root = Path(str(TOY["sft"]) if source == "toy" else source).parent  # where relative image paths start
            tokens.build(iter_rows(source, toy="sft"), sft_row, (processor, max_len, root), path, "sft data",
                         meta={"source": str(source), "max_len": max_len})
        except DataError as e:  # every rank must still reach wait(), or the others would hang
            error = e
        except OSError as e:
            error = cache_error(e)
    if wait is not None and wait(error is not None):
        raise error or DataError(f"sft data: preparing {source} failed on another rank (its error says why)")
    if error:
        raise error
    examples = tokens.TokenFile(path)
    m = examples.meta
    if report:
        print(f"sft data: {len(examples)} examples, {m['truncated']} truncated to {max_len} tokens"
              + (f", {m['skipped']} malformed rows skipped" if m["skipped"] else "") + f" (cache {path})",
              file=sys.stderr)
    return examples


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
# Models: from_pretrained for everything; `tiny` is built locally once (plumbing/tiny.py), then read back the same way

TINY = ("tiny", "tiny-text", "tiny-qwen")  # names of the locally built models
# Qwen2's vocab.json and merges.txt, for tiny-qwen: ../shared/qwen2-tokenizer beside the checkout, or QWEN2_TOKENIZER
QWEN_FILES = Path(os.environ.get("QWEN2_TOKENIZER", TOY_DIR.parent.parent / "shared" / "qwen2-tokenizer"))


def tiny_corpus():
    """What the tiny tokenizer is trained on: the paper's templates and the toy data, so prompts stay short."""
    return [TRAIN_PROMPT, EVAL_MC_PROMPT, EVAL_MATH_PROMPT, OPTIONS_SUFFIX, "You are a helpful assistant."] + \
        [path.read_text() for path in TOY.values() if path.exists()]


def check_model(name):
    """Before anything loads: a --model that cannot load fails in one line; `tiny` is built on first use. Returns
    the model to load: a run directory (runs/sft) stands for its final checkpoint (runs/sft/final)."""
    if name in TINY:
        if name == "tiny-qwen" and not all((QWEN_FILES / f).is_file() for f in ("vocab.json", "merges.txt")):
            raise DataError(f"tiny-qwen needs Qwen2's vocab.json and merges.txt in {QWEN_FILES} (or set "
                            f"QWEN2_TOKENIZER)")
        return name
    final = Path(name) / "final"
    if not (Path(name) / "config.json").exists() and (final / "config.json").exists():
        if os.environ.get("RANK", "0") == "0":
            print(f"--model {name} is a run directory: loading its final checkpoint, {final}", file=sys.stderr)
        name = str(final)
    check_model_dir(name)
    return name


def resolve_model(name):
    """A path or hub id for from_pretrained; the tiny models are built on first use (plumbing/tiny.py)."""
    name = check_model(name)
    if name not in TINY:
        return name
    try:
        return tiny.ensure(name, CACHE, tiny_corpus(), QWEN_FILES)
    except OSError as e:
        raise cache_error(e) from None


def from_disk(path, what, load):
    """load() a model, config or processor from `path`; what fails is one line. A checkpoint deleted after
    check_model passed it (another job pruning it, say) reaches from_pretrained as a path that is not there, which
    transformers takes for a malformed hub id ("Repo id must be in the form ..."): we say what happened."""
    try:
        return load()
    except (OSError, ValueError) as e:
        if not Path(path).exists() and not hub_id(path) and path not in TINY:
            raise DataError(f"--model {path}: the directory vanished while the {what} loaded (deleted or moved by "
                            f"another process?)") from None
        if isinstance(e, OSError):
            raise DataError(f"cannot load {what} {path!r}: {str(e).splitlines()[0]}") from e
        raise


def load_processor(name):
    from transformers import AutoProcessor  # heavy
    path = resolve_model(name)
    processor = from_disk(path, "processor", lambda: AutoProcessor.from_pretrained(path))
    tokenizer_of(processor).padding_side = "left"
    return processor


def tokenizer_of(processor):
    """A VLM's processor holds its tokenizer; a text-only model's processor is its tokenizer."""
    return getattr(processor, "tokenizer", processor)


def model_class(config):
    """Qwen2.5-VL; a text-only causal LM (a distillation teacher such as QwQ-32B) when there is no vision part."""
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration  # heavy
    return Qwen2_5_VLForConditionalGeneration if hasattr(config, "vision_config") else AutoModelForCausalLM


def load_model(name, dtype=None, device="cpu", progress=False):
    """A model from a hub id, a local directory (e.g. an SFT checkpoint), `tiny` or `tiny-text`; `progress`: the
    bar of the shards read, for the one loading process."""
    import torch  # heavy
    from transformers import AutoConfig  # heavy
    from transformers.utils import logging  # heavy
    logging.enable_progress_bar() if progress else logging.disable_progress_bar()
    path = resolve_model(name)
    model = from_disk(path, "model", lambda: model_class(AutoConfig.from_pretrained(path)).from_pretrained(
        path, dtype=dtype or torch.float32))
    return model.to(device)


def model_from_config(name, dtype=None):
    """The model's architecture with uninitialised weights, on the current default device (`with
    torch.device("meta")`: no memory at all), and its generation settings; load_sharded fills it in."""
    import torch  # heavy
    from transformers import AutoConfig, GenerationConfig  # heavy
    path = resolve_model(name)
    config = from_disk(path, "config", lambda: AutoConfig.from_pretrained(path))
    model = model_class(config)._from_config(config, dtype=dtype or torch.float32)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass  # none saved: the defaults from_pretrained would use too
    return model


def main(argv=None):
    ap = cli_parser(__doc__)
    ap.add_argument("--model", help="build/resolve a model (`tiny`) and print its path")
    ap.add_argument("--sft", help="convert an SFT source (`toy`, path, hub id) and print statistics")
    ap.add_argument("--rl", help="convert an RL source (`toy`, path, URL) and print statistics")
    ap.add_argument("--max-len", type=POSITIVE_INT, default=4096, help="SFT truncation length (B.1: 4,096)")
    args = ap.parse_args(argv)
    if not (args.model or args.sft or args.rl):
        ap.print_help()
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


if __name__ == "__main__":
    cli(main)
