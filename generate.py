"""Batched sampling with a KV cache and the paper's forced exit, for text and images (Qwen2.5-VL).

GRPO's rollouts and every evaluation run through `generate()` below: our own decode loop over the model's
`forward`, written out so that each step of sampling is visible.

    1. encode    each chat through the processor (text + images -> input_ids, pixel_values, image_grid_thw)
    2. batch     sort by length, cut into chunks of `batch_size`, left-pad each chunk
    3. prefill   one forward over the prompts with the multimodal rotary positions (M-RoPE) computed by us
    4. decode    one token per step from the KV cache; greedy at temperature 0, else temperature + top-p,
                 each row with its own seeded generator (same samples whatever the batch around it)
    5. stop      a row ends at <|im_end|>/EOS or its budget, and leaves the batch and the cache at once
    6. forced exit (§2.1): a row that has thought for `think_budget` tokens without closing </think> gets
                 "</think>" appended and may answer for `answer_budget` more tokens

    python generate.py --model tiny --prompt "What is 2 + 3?" [--image cat.png] [--temperature 0.7]
    python generate.py --model PATH --input prompts.jsonl --output out.jsonl --think-budget 3584

Deliberate simplifications: a dynamic (growing) KV cache and no CUDA graphs; sharding across ranks is the
caller's business (`shard()` below), so this function always takes a plain, unsharded model.
"""
import os
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import DynamicCache

import data
import rewards
from plumbing import runs
from plumbing.cli import COUNT, NON_NEGATIVE, POSITIVE_INT, PROBABILITY, DataError, cli, cli_parser
from plumbing.distributed import setup_distributed

THINK_END = "</think>"


@dataclass
class Completion:
    text: str
    token_ids: list
    finish_reason: str  # "stop" | "forced_exit" | "length"
    num_tokens: int
    sampled: list = None  # per token: 1 if the model sampled it, 0 if the forced exit wrote it (no gradient in RL)


def encode(processor, conversation):
    """One chat -> model inputs (batch of 1) with the generation prompt appended."""
    if not hasattr(processor, "image_processor"):  # a text-only model's tokenizer: its template wants strings
        conversation = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                         "".join(part.get("text", "") for part in m["content"])} for m in conversation]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")


def collate(encodings, pad_id):
    """Left-pad a chunk so every prompt ends at the same column, where generation starts."""
    width = max(e["input_ids"].shape[1] for e in encodings)
    batch = {"input_ids": torch.full((len(encodings), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(len(encodings), width, dtype=torch.long),
             "mm_token_type_ids": torch.zeros(len(encodings), width, dtype=torch.long)}
    for i, e in enumerate(encodings):
        n = e["input_ids"].shape[1]
        batch["input_ids"][i, width - n:] = e["input_ids"][0]
        batch["attention_mask"][i, width - n:] = 1
        if "mm_token_type_ids" in e:
            batch["mm_token_type_ids"][i, width - n:] = e["mm_token_type_ids"][0]
    images = [e for e in encodings if "pixel_values" in e]
    if images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in images])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in images])
    return batch


def rope_positions(model, batch):
    """Qwen2.5-VL's 3-D rotary positions (time, height, width) for the prompt, and the next text position.

    Image tokens share positions laid out on their grid, so after an image the next text position is less than
    the token count. We compute it once here and carry it ourselves; the model's cached `rope_deltas` stay
    untouched, so a later training forward on the same model object cannot pick up stale state.
    A text-only causal LM (a distillation teacher) gets ordinary positions 0, 1, 2, ... after the left padding.
    """
    if not hasattr(model.model, "get_rope_index"):
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return positions, positions[:, -1] + 1  # (B, L), (B,)
    positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                              image_grid_thw=batch.get("image_grid_thw"),
                                              attention_mask=batch["attention_mask"])
    return positions, positions.amax(dim=(0, 2)) + 1  # (3, B, L), (B,)


def next_positions(next_pos, like):
    """Positions of one new token per row, (3, B, 1): a text token sits at the same place on M-RoPE's three axes
    (time, height, width), so all three advance together; a plain causal LM takes (B, 1)."""
    if like.dim() == 3:
        return next_pos.view(1, -1, 1).expand(3, -1, 1)  # the 3 axes of M-RoPE, one position each
    return next_pos.view(-1, 1)


def vision_inputs(batch):
    """The image tensors of a batch, if it has any (a text-only model takes no such arguments)."""
    return {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}


def sample(logits, temperature, top_p, generators):
    """Next token per row: argmax at temperature 0; else softmax(logits / T), truncated to the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before a token already reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])


def forced_exit_ids(tokenizer, ids):
    """The tokens of "</think>" as the tokenizer encodes them after this row's text (merges can cross the seam)."""
    context = tokenizer.decode(ids[-4:])  # a few tokens of context are enough for a BPE merge across the seam
    before = tokenizer.encode(context, add_special_tokens=False)
    after = tokenizer.encode(context + THINK_END, add_special_tokens=False)
    if after[:len(before)] == before:
        return after[len(before):]
    return tokenizer.encode(THINK_END, add_special_tokens=False)


@dataclass
class Row:
    """One prompt's progress through the decode loop, filled in by steps 4-6."""
    generator: torch.Generator       # its own sampling stream: the same samples whatever the batch around it
    thinking: bool                   # inside its thought with a think budget to watch
    tokens: list = field(default_factory=list)   # the response so far
    sampled: list = field(default_factory=list)  # per token: 1 if the model sampled it, 0 if the forced exit wrote it
    forced: list = field(default_factory=list)   # "</think>" tokens still to feed after a forced exit
    answer_left: int = None          # answer tokens left after a forced exit; None: no forced exit
    finish_reason: str = "length"    # "length" until it stops otherwise


def advance(row, t, tokenizer, *, think_budget, answer_budget, stop_ids, may_close):
    """Steps 5-6 for one row after its new token t: watch for "</think>", stop, or begin a forced exit.
    Returns whether the row goes on."""
    row.tokens.append(t)
    # "</think>" is 8 characters, so it spans at most the last 8 tokens; decode them only after a token with ">"
    if row.thinking and may_close[t] and THINK_END in tokenizer.decode(row.tokens[-len(THINK_END):]):
        row.thinking = False             # the model closed its thought itself
    if t in stop_ids:
        row.finish_reason = "forced_exit" if row.answer_left is not None else "stop"
        return False
    if row.thinking and len(row.tokens) >= think_budget:  # §2.1: stop thinking, answer now
        row.thinking = False
        row.forced = forced_exit_ids(tokenizer, row.tokens)
        row.answer_left = answer_budget
        row.finish_reason = "forced_exit"
    return not (row.answer_left is not None and row.answer_left <= 0 and not row.forced)  # answer budget spent


@torch.no_grad()
def generate_chunk(model, tokenizer, encodings, seeds, *, max_new_tokens, temperature, top_p, think_budget,
                   answer_budget, stop_ids, may_close):
    """Steps 2-6 for one chunk of prompts: a Completion per prompt, in the chunk's order."""
    device = next(model.parameters()).device
    # 2-3. left-pad, then one forward over all prompts fills the KV cache and gives each row's next-token logits
    batch = {k: v.to(device) for k, v in collate(encodings, tokenizer.pad_token_id).items()}      # (B, L) each
    positions, next_pos = rope_positions(model, batch)                                 # (3, B, L), (B,)
    # Without padding the causal mask is implicit: passing None lets attention skip building a mask each step.
    mask = batch["attention_mask"] if not bool(batch["attention_mask"].all()) else None             # (B, L)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                   **vision_inputs(batch), past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    rows = [Row(torch.Generator(device=device).manual_seed(s), think_budget is not None) for s in seeds]
    live = list(rows)                    # the rows still in the batch, in batch order
    for _ in range(max_new_tokens):
        # 4. one token per live row                                                   logits: (B_live, vocab)
        token = sample(logits, temperature, top_p, [row.generator for row in live])     # (B_live,)
        keep = []
        for j, row in enumerate(live):
            if row.forced:               # 6. a forced exit writes its "</think>" over what was sampled
                token[j] = row.forced.pop(0)
                row.sampled.append(0)
            else:
                row.sampled.append(1)
                if row.answer_left is not None:
                    row.answer_left -= 1
            if advance(row, int(token[j]), tokenizer, think_budget=think_budget, answer_budget=answer_budget,
                       stop_ids=stop_ids, may_close=may_close):
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(live):        # 5. finished rows leave the batch and the cache
            idx = torch.tensor(keep, device=device)
            for layer in cache.layers:
                layer.batch_select_indices(idx)
            token, next_pos = token[idx], next_pos[idx]
            mask = mask[idx] if mask is not None else None
            live = [live[j] for j in keep]
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)                 # (B_live, L + t)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_positions(next_pos, positions),
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_pos = next_pos + 1
    return [Completion(tokenizer.decode(row.tokens, skip_special_tokens=True), row.tokens, row.finish_reason,
                       len(row.tokens), row.sampled) for row in rows]


def generate(model, processor, conversations, *, max_new_tokens=4096, temperature=0.0, top_p=1.0,
             think_budget=None, answer_budget=512, batch_size=32, seed=None, progress=False):
    """Complete each chat; returns one Completion per conversation, in input order.
    `seed`: an int (row i uses a seed derived from it and i) or a list with one seed per conversation."""
    if not conversations:
        return []
    tokenizer = data.tokenizer_of(processor)
    stop_ids = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                   else [model.generation_config.eos_token_id]) | {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    stop_ids.discard(None)
    # Only a token containing ">" can complete "</think>": decode a row's tail only after one of those.
    if getattr(tokenizer, "_may_close", None) is None:
        tokenizer._may_close = [">" in (t or "") for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))]
    text_config = model.config.get_text_config()
    may_close = tokenizer._may_close + [False] * (text_config.vocab_size - len(tokenizer._may_close))
    limit = text_config.max_position_embeddings
    encodings = [encode(processor, c) for c in conversations]
    results = [None] * len(conversations)
    for i, e in enumerate(encodings):
        if e["input_ids"].shape[1] >= limit:
            raise ValueError(f"prompt {i} has {e['input_ids'].shape[1]} tokens; the model's context is {limit}")
    if isinstance(seed, (list, tuple)):  # one seed per conversation (GRPO: independent of how rows are sharded)
        seeds = list(seed)
    else:
        base = seed if seed is not None else torch.randint(0, 2**31 - 1, ()).item()
        seeds = [row_seed(base, i) for i in range(len(conversations))]  # a row's samples depend on its index
    order = sorted(range(len(encodings)), key=lambda i: encodings[i]["input_ids"].shape[1])
    bar = tqdm(total=len(order), desc="generate", disable=not progress, delay=5, leave=False)  # shown if slow
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        budget = min(max_new_tokens, limit - max(encodings[i]["input_ids"].shape[1] for i in rows))
        chunk = generate_chunk(model, tokenizer, [encodings[i] for i in rows], [seeds[i] for i in rows],
                               max_new_tokens=budget, temperature=temperature, top_p=top_p, think_budget=think_budget,
                               answer_budget=answer_budget, stop_ids=stop_ids, may_close=may_close)
        for i, c in zip(rows, chunk):
            results[i] = c
        bar.update(len(rows))
    bar.close()
    return results


def row_seed(base, key):
    """The seed of one row's sampling stream, from the run's seed and the row's own key (its index, or a hash of
    (question, sample)): a row samples the same tokens whatever batch, rank or order it lands in."""
    return base * 1_000_003 + key


def shard(items, rank, world):
    """This rank's share of a list (every world-th item), so gathering interleaves back into order."""
    return items[rank::world]


def unshard(gathered):
    """Inverse of shard(): lists from each rank (e.g. from all_gather_object) back in the original order."""
    out = []
    for i in range(max(len(g) for g in gathered)):
        out.extend(g[i] for g in gathered if i < len(g))
    return out


# ----------------------------------------------------------------------------------------------------
# Distillation (X-Reasoner-Med, §3.2): a teacher's chains of thought on the training questions, kept if correct

def with_think_open(text):
    """QwQ-style chat templates open <think> in the prompt, so the completion starts inside the thought."""
    return text if "</think>" not in text or text.lstrip().startswith("<think>") else "<think>\n" + text


def select_correct(rows, completions, samples):
    """Rejection sampling (§2.1): of each row's `samples` completions, keep those in the paper's format whose
    tagged answer is right (rewards.py, tags required), as SFT rows {"question", "response", "answer"}."""
    kept = []
    for i, c in enumerate(completions):
        row, text = rows[i // samples], with_think_open(c.text)
        options = row.get("options")
        ok = (rewards.choice_reward(text, options, row["answer"], require_tags=True) if options
              else rewards.math_reward(text, row["answer"], require_tags=True))
        if ok and "</think>" in text:
            kept.append({"question": row["question"], "response": text, "answer": row["answer"]})
    return kept


def distil(model, processor, rows, samples=4, seed=0, **sampling):
    """`samples` completions of each RL-schema row (data.load_rl_data), seeded per (question, sample) so that
    the split over ranks changes nothing; the correct ones."""
    conversations = [r["messages"] for r in rows for _ in range(samples)]
    seeds = [row_seed(seed, zlib.crc32(f"{r['question']}/{k}".encode())) for r in rows for k in range(samples)]
    return select_correct(rows, generate(model, processor, conversations, seed=seeds, **sampling), samples)


def parse_args(argv=None):
    ap = cli_parser(__doc__)
    # model
    ap.add_argument("--model", default=data.BASE_MODEL, help="hub id, local directory, or `tiny` (default: the base)")
    ap.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                    help="auto: bf16 on GPU, fp32 on CPU")
    # input
    ap.add_argument("--prompt", help="one user message")
    ap.add_argument("--image", action="append", default=[], help="an image for --prompt (repeatable)")
    ap.add_argument("--input", help="JSONL of {'prompt': str, 'images': [paths]}")
    ap.add_argument("--output", help="JSONL for the completions (with --input), or the distilled rows")
    ap.add_argument("--template", choices=["train", "mc", "math", "none"], default="train",
                    help="appendix C's prompt around each message: training, multiple-choice, math, or none")
    ap.add_argument("--distil", help="RL-schema rows (MedQA): keep a teacher's right answers as SFT rows (§3.2)")
    ap.add_argument("--samples", type=POSITIVE_INT, default=4, help="completions per question with --distil (ours)")
    # sampling
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=4096, help="cap on generated tokens (§3: 4,096)")
    ap.add_argument("--temperature", type=NON_NEGATIVE, default=0.0, help="0: greedy (§3's evaluation)")
    ap.add_argument("--top-p", type=PROBABILITY, default=1.0, help="nucleus sampling; 1: off (§3: off)")
    ap.add_argument("--think-budget", type=POSITIVE_INT, default=None, help="forced exit after N thinking tokens (§2.1)")
    ap.add_argument("--answer-budget", type=POSITIVE_INT, default=512, help="answer tokens after a forced exit (ours)")
    ap.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="sequences per generation batch (ours)")
    ap.add_argument("--seed", type=COUNT, default=0, help="sampling seed (ours)")
    args = ap.parse_args(argv)
    if args.distil and not args.output:
        ap.error("--distil needs --output")
    if not args.distil and args.input is None and args.prompt is None:
        ap.error("give --prompt or --input")
    if args.output and Path(args.output).is_dir():
        raise DataError(f"--output {args.output} is a directory, not a file to write")
    if args.output:
        runs.check_writable(Path(args.output).parent, "--output")
    return args


def input_row(row):
    """One --input row; a lone surrogate (JSON's "\\ud800") cannot be tokenized: the row is counted and skipped."""
    return row | {"prompt": str(row["prompt"]).encode("utf-8").decode(), "images": row.get("images") or []}


def main(argv=None):
    args = parse_args(argv)
    data.check_model(args.model)
    if not args.distil:  # bad rows are counted and skipped before the model loads
        rows = data.read_rows(args.input) if args.input else [{"prompt": args.prompt, "images": args.image}]
        rows = data.convert_rows(rows, input_row, "--input")
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device != "cpu" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    model = data.load_model(args.model, dtype=dtype, device=device, progress=True).eval()
    processor = data.load_processor(args.model)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    think_budget=args.think_budget, answer_budget=args.answer_budget, batch_size=args.batch_size)
    if args.distil:
        return distil_main(args, model, processor, sampling)
    print(f"template: {args.template}" + {"train": " (appendix C's training prompt: what SFT and GRPO saw)",
                                         "none": " (the message as given)"}.get(args.template, " (appendix C)"),
          file=sys.stderr)
    try:
        conversations = [[data.user_message(data.eval_prompt(r["prompt"], None, args.template),
                                            [data.load_image(p) for p in r["images"]])] for r in rows]
        completions = generate(model, processor, conversations, seed=args.seed, progress=args.input is not None,
                               **sampling)
    except (ValueError, OSError) as e:  # a missing image, a prompt longer than the context
        raise DataError(str(e)) from e
    if args.output:
        data.write_jsonl(args.output, [{**r, **asdict(c)} for r, c in zip(rows, completions)])
    else:
        for c in completions:
            print(c.text)
            print(f"[{c.finish_reason}, {c.num_tokens} tokens]", file=sys.stderr)


def distil_main(args, model, processor, sampling):
    """--distil: under torchrun each rank takes every world-th question; rank 0 writes all the kept rows."""
    rank, world, _ = setup_distributed()
    rows = data.load_rl_data(args.distil)
    kept = distil(model, processor, shard(rows, rank, world), args.samples, args.seed, progress=rank == 0, **sampling)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, kept)
        kept = [row for part in parts for row in part]
    if rank == 0:
        data.write_jsonl(args.output, kept)
        print(f"distil: kept {len(kept)} of {len(rows) * args.samples} completions ({len(rows)} questions x "
              f"{args.samples}); wrote {args.output}", file=sys.stderr)
    return kept


if __name__ == "__main__":
    cli(main)
