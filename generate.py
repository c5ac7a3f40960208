"""Batched sampling with a KV cache and the paper's forced exit, for text and images (Qwen2.5-VL).

GRPO's rollouts and every evaluation run through `generate()` below: our own decode loop over the model's
`forward` (a decode step: its language model and head alone), written out so each step of sampling is visible.

    1. encode    each chat through the processor (text + images -> input_ids, pixel_values, image_grid_thw)
    2. admit     prompts, shortest first, into free slots of a preallocated KV cache (SlotCache): `batch_size`
                 slots, each refilled as soon as its row ends (continuous batching)
    3. prefill   one forward over the admitted prompts, left-padded, with the multimodal rotary positions
                 (M-RoPE) computed by us, their keys and values written into their slots
    4. decode    one token per live row per step, each at its own cache column and position (decode_one_token),
                 written in place; greedy at temperature 0, else temperature + top-p, each row with its own
                 seeded generator (the same samples whatever the slots or rows around it); one host sync a step
    5. stop      a row ends at <|im_end|>/EOS or its budget; the last live row takes its slot (compact)
    6. forced exit (§2.1): a row that has thought for `think_budget` tokens without closing </think> gets
                 "</think>" appended and may answer for `answer_budget` more tokens

    python generate.py --model tiny --prompt "What is 2 + 3?" [--image cat.png] [--temperature 0.7]
    python generate.py --model PATH --input prompts.jsonl --output out.jsonl --think-budget 3584

Deliberate simplifications: one cache row per slot, as long as the longest prompt plus the budget (no paged
blocks), attention over the longest live row with a mask, torch.compile only on request (--compile) and without
CUDA graphs; sharding across ranks is the caller's business (plumbing.distributed.shard), so this function always
takes a plain, unsharded model.
"""
import os
import sys
import time
import weakref
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers.cache_utils import Cache, CacheLayerMixin

import data
import rewards
from plumbing import runs
from plumbing.cli import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, DataError, cli, cli_parser
from plumbing.distributed import setup_distributed, shard

THINK_END = "</think>"
PREFILL_ROWS = 16  # prompts per prefill forward (ours): bounds its activations, which sit beside the whole KV cache
ADMIT_AT = 4  # free slots (at most; an eighth of them) worth a prefill forward (ours): one freed slot waits a little


@dataclass
class Completion:
    text: str
    token_ids: list
    finish_reason: str  # "stop" | "forced_exit" | "length"
    num_tokens: int
    sampled: list = None  # per token: 1 if the model sampled it, 0 if the forced exit wrote it (no gradient in RL)
    logprobs: list = None  # per token: log-prob under the distribution it was drawn from (0.0: greedy, or forced)


# ----------------------------------------------------------------------------------------------------
# 1. Encode

def encode(processor, conversation):
    """One chat -> model inputs (batch of 1) with the generation prompt appended."""
    if not hasattr(processor, "image_processor"):  # a text-only model's tokenizer: its template wants strings
        conversation = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                         "".join(part.get("text", "") for part in m["content"])} for m in conversation]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt")


def encode_all(processor, conversations, limit):
    """Step 1 for every chat, and each prompt's length; a prompt that fills the model's context is an error. A chat
    passed several times (GRPO's group: the same object) is encoded once and shared."""
    once = {}
    for c in conversations:
        if id(c) not in once:
            once[id(c)] = encode(processor, c)
    encodings = [once[id(c)] for c in conversations]
    lengths = [e["input_ids"].shape[1] for e in encodings]
    for i, n in enumerate(lengths):
        if n >= limit:
            raise ValueError(f"prompt {i} has {n} tokens; the model's context is {limit}")
    return encodings, lengths


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


# ----------------------------------------------------------------------------------------------------
# 2. Admit: the slot cache, what each slot holds, and when free slots are worth a prefill

class SlotCache(Cache):
    """The KV cache of `slots` rows of up to `max_len` tokens, preallocated once and written in place (transformers'
    DynamicCache appends with torch.cat, which copies the whole cache at every step). The model's attention layers
    call update() on it with no say in where to write, so each forward is told first, in one call: write_prompts()
    before a prefill, write_at() before a decode step. Live rows fill slots [0, live)."""

    def __init__(self, config, slots, max_len, dtype, device):
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        shape = (slots, text.num_key_value_heads, max_len, head_dim)
        super().__init__(layers=[SlotLayer(self, shape, dtype, device) for _ in range(text.num_hidden_layers)])
        self.prompt_slots, self.columns, self.width = None, None, 0

    def write_prompts(self, prompt_slots):
        """The next forward is a prefill: its left-padded prompts fill columns [0, P) of slots `prompt_slots`."""
        self.prompt_slots, self.columns, self.width = prompt_slots, None, 0

    def write_at(self, columns, width):
        """The next forward is a decode step: live row b (slot b) writes its key and value at column columns[b]
        ((live,), on the device); attention then reads columns [0, width), each row's mask hiding what is not its."""
        self.prompt_slots, self.columns, self.width = None, columns, width


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values, (slots, kv_heads, max_len, head_dim), written where the cache says."""

    def __init__(self, cache, shape, dtype, device):
        super().__init__()
        # a weak reference: a cycle cache -> layer -> cache would keep ~16 GB (7B, 64 slots) alive until a GC pass
        self.cache, self.is_initialized = weakref.proxy(cache), True
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):                  # (B, kv_heads, T, head_dim)
        c = self.cache
        if c.columns is None:  # a prefill: the admitted prompts, left-padded to one width P
            width = key_states.shape[2]
            self.keys[c.prompt_slots, :, :width], self.values[c.prompt_slots, :, :width] = key_states, value_states
            return key_states, value_states
        live = torch.arange(len(c.columns), device=c.columns.device)
        self.keys[live, :, c.columns] = key_states[:, :, 0]                          # in place: no copy of the rest
        self.values[live, :, c.columns] = value_states[:, :, 0]
        return self.keys[:len(live), :, :c.width], self.values[:len(live), :, :c.width]

    def get_seq_length(self):
        return 0 if self.cache.columns is None else self.cache.width - 1

    def get_mask_sizes(self, query_length):
        return (query_length if self.cache.columns is None else self.cache.width), 0

    def get_max_length(self):
        return self.keys.shape[2]


@dataclass
class Slots:
    """Per-slot state on the device: the rotary position of the slot's next token (slots,), and its additive
    attention mask (slots, max_len): 0 on its own tokens, the dtype's minimum on its left padding and beyond (eager
    attention adds the mask, so it must be a float, not a bool). With a repetition penalty, `seen` (slots, vocab):
    the token ids the slot's row holds, prompt included. How far each row has written is its Row's `written`."""
    position: torch.Tensor
    mask: torch.Tensor
    seen: torch.Tensor = None

    def hold(self, tokens):
        """The token each live row has just written joins what it holds (for the repetition penalty, if any)."""
        if self.seen is not None:
            rows = torch.arange(len(tokens), device=self.seen.device)
            self.seen[rows, torch.tensor(tokens, device=self.seen.device)] = True

    def move(self, cache, src, dst, columns):
        """Row `src` takes slot `dst`: its state and the `columns` it has written of its cache row, nothing else."""
        for t in (self.position, self.mask, *([self.seen] if self.seen is not None else [])):
            t[dst] = t[src]
        for layer in cache.layers:
            layer.keys[dst, :, :columns].copy_(layer.keys[src, :, :columns])
            layer.values[dst, :, :columns].copy_(layer.values[src, :, :columns])


def allocate(model, slots, max_len, vocab=None):
    """Step 2's memory, once: the slot cache and the per-slot state, on the model's device and in its dtype;
    `vocab`: the width of the seen-token mask a repetition penalty needs (None: no penalty, no mask)."""
    p = next(model.parameters())
    cache = SlotCache(model.config, slots, max_len, p.dtype, p.device)
    state = Slots(torch.zeros(slots, dtype=torch.long, device=p.device),
                  torch.zeros(slots, max_len, dtype=p.dtype, device=p.device),
                  torch.zeros(slots, vocab, dtype=torch.bool, device=p.device) if vocab else None)
    return cache, state


def admit_now(free, slots, pending):
    """Whether to prefill now. A prefill is a forward of its own between two decode steps, so filling one slot at a
    time would cost a forward per finished row: wait until ADMIT_AT slots are free (fewer with few slots: an
    eighth of them, at least one), or all the pending prompts fit, before admitting."""
    worth_a_forward = min(ADMIT_AT, max(1, slots // 8))
    return pending > 0 and free >= min(worth_a_forward, pending)


# ----------------------------------------------------------------------------------------------------
# 3. Prefill

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


def vision_inputs(batch):
    """The image tensors of a batch, if it has any (a text-only model takes no such arguments)."""
    return {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}


def prefill(model, tokenizer, encodings, cache, slots, start):
    """Step 3 for newly admitted prompts: one forward over them, left-padded, with M-RoPE positions we compute, their
    keys and values written into slots [start, start + n). Returns their next-token logits (n, vocab) and P, the
    columns each of their cache rows now holds (their left padding included)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(encodings, tokenizer.pad_token_id).items()}      # (n, P) each
    positions, next_pos = rope_positions(model, batch)
    mask = batch["attention_mask"] if not bool(batch["attention_mask"].all()) else None
    n, P = batch["input_ids"].shape
    admitted = slice(start, start + n)
    cache.write_prompts(admitted)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                   **vision_inputs(batch), past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    slots.mask[admitted] = torch.finfo(slots.mask.dtype).min  # what a slot's last row left behind, and the padding
    slots.mask[admitted, :P] = slots.mask[admitted, :P].masked_fill(batch["attention_mask"].bool(), 0.0)
    slots.position[admitted] = next_pos
    if slots.seen is not None:  # the prompt's tokens count as seen, as in model.generate; its left padding does not
        ids = batch["input_ids"]
        held = torch.where(batch["attention_mask"].bool(), ids, ids[:, -1:])  # a pad stands for the last real token
        slots.seen[admitted] = torch.zeros_like(slots.seen[admitted]).scatter(
            1, held.clamp(max=slots.seen.shape[1] - 1), True)
    return logits, P


# ----------------------------------------------------------------------------------------------------
# 4. Decode

def next_positions(next_pos, axes):
    """Positions of one new token per row, (3, B, 1): a text token sits at the same place on M-RoPE's three axes
    (time, height, width), so all three advance together; a plain causal LM (`axes` 2: (B, L) positions) takes
    (B, 1)."""
    if axes == 3:
        return next_pos.view(1, -1, 1).expand(3, -1, 1)  # the 3 axes of M-RoPE, one position each
    return next_pos.view(-1, 1)


def decode_one_token(forward, tokens, columns, cache, slots, axes):
    """Step 4: one forward of one token per live row: row b (slot b) writes its key and value at cache column
    columns[b] (the columns it has written so far) and sits at its own rotary position (`axes`: 3 for M-RoPE, 2
    for a plain LM). `forward` is decoder_step(model) or its compiled form (compiled()): next-token logits (live,
    vocab)."""
    live = len(columns)
    at = torch.tensor(columns, device=tokens.device)
    cache.write_at(at, width=max(columns) + 1)
    slots.mask[torch.arange(live, device=tokens.device), at] = 0.0  # each row now also sees the token it writes
    logits = forward(input_ids=tokens[:, None], attention_mask=slots.mask[:live, None, None, :cache.width],
                     position_ids=next_positions(slots.position[:live], axes), past_key_values=cache, use_cache=True)
    slots.position[:live] += 1
    return logits


def decoder_step(model):
    """The decode forward: the language model and its head alone. No image arrives in a decode step and we pass
    the positions, so the VLM's wrapper (image merge, rope bookkeeping, output classes) has nothing to do; skipping
    it is ~13% of a tiny model's step (measured; negligible at 7B)."""
    if hasattr(model, "get_decoder"):
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        return lambda **inputs: head(decoder(**inputs).last_hidden_state[:, -1])
    return lambda **inputs: model(**inputs).logits[:, -1]  # not a transformers model: any forward giving .logits


def compiled(model):
    """--compile: the decode forward, compiled once per model with dynamic shapes (live rows and attention length
    change without a recompile). No CUDA graphs (a simplification): one per (live rows, length) pair.
    Its first call, mostly compiling, is timed into `model.compile_s`; later calls go straight through."""
    if getattr(model, "_compiled_forward", None) is None:
        forward, first = torch.compile(decoder_step(model), dynamic=True), [True]

        def timed_first_call(**inputs):
            if not first:
                return forward(**inputs)
            started = time.perf_counter()
            out = forward(**inputs)  # compiles
            model.compile_s, first[:] = time.perf_counter() - started, []
            return out
        model._compiled_forward = timed_first_call
    return model._compiled_forward


def penalize_repeats(logits, seen, penalty):
    """The repetition penalty of model.generate (CTRL, Keskar et al. 2019, as transformers applies it): a token the
    row already holds, prompt included, has its logit divided by `penalty` when positive, multiplied when negative."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def sample(logits, temperature, top_p, generators):
    """Next token per row, (B,), and its log-prob under the distribution it was drawn from, (B,): argmax at
    temperature 0 (a point mass: log-prob 0); else softmax(logits / T), truncated to the top-p nucleus and
    renormalized. GRPO compares that log-prob with the training policy's (the rollout-policy gap)."""
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.zeros(tokens.shape, device=logits.device)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before a token already reaches top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    tokens = torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])
    return tokens, (probs.gather(-1, tokens[:, None])[:, 0] / probs.sum(-1)).log()  # the nucleus renormalized


def next_tokens(logits, live, slots, temperature, top_p, repetition_penalty):
    """Step 4's choice for every live row: the repetition penalty (if any), then sample(); the tokens and their
    log-probs come to the host in one transfer, the step's one sync (ids are exact in float64)."""
    if repetition_penalty != 1.0:
        logits = penalize_repeats(logits, slots.seen[:len(live)], repetition_penalty)
    picked, logp = sample(logits, temperature, top_p, [row.generator for row in live])
    picked, logp = torch.stack([picked.double(), logp.double()]).tolist()
    return [int(t) for t in picked], logp


# ----------------------------------------------------------------------------------------------------
# 5-6. Stop, or force the exit

@dataclass
class Row:
    """One prompt's progress through the decode loop, filled in by steps 2-6."""
    generator: torch.Generator       # its own sampling stream: the same samples whatever the batch around it
    thinking: bool                   # inside its thought with a think budget to watch
    tokens: list = field(default_factory=list)   # the response so far
    sampled: list = field(default_factory=list)  # per token: 1 if the model sampled it, 0 if the forced exit wrote it
    logprobs: list = field(default_factory=list)  # per token: log-prob of the sampled token where it was drawn
    forced: list = field(default_factory=list)   # "</think>" tokens still to feed after a forced exit
    answer_left: int = None          # answer tokens left after a forced exit; None: no forced exit
    finish_reason: str = "length"    # "length" until it stops otherwise
    index: int = None                # which conversation it answers
    budget: int = None               # at most this many tokens (max_new_tokens, or less near the context's end)
    written: int = 0                 # columns of its cache row written so far (left padding included)

    def completion(self, tokenizer):
        """What generate() returns for this row once it ends."""
        return Completion(tokenizer.decode(self.tokens, skip_special_tokens=True), self.tokens, self.finish_reason,
                          len(self.tokens), self.sampled, self.logprobs)


def step_row(row, t, logp, tokenizer, **rules):
    """Steps 5-6 for one row: its sampled token t (log-prob logp), or instead the next token of a forced exit; False
    when it ends."""
    if row.forced:                   # 6. a forced exit writes its "</think>" over what was sampled
        t = row.forced.pop(0)
        row.sampled.append(0)
        row.logprobs.append(0.0)
    else:
        row.sampled.append(1)
        row.logprobs.append(logp)
        if row.answer_left is not None:
            row.answer_left -= 1
    return advance(row, t, tokenizer, **rules) and len(row.tokens) < row.budget  # at the budget: "length"


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


def forced_exit_ids(tokenizer, ids):
    """The tokens of "</think>" as the tokenizer encodes them after this row's text (merges can cross the seam)."""
    context = tokenizer.decode(ids[-4:])  # a few tokens of context are enough for a BPE merge across the seam
    before = tokenizer.encode(context, add_special_tokens=False)
    after = tokenizer.encode(context + THINK_END, add_special_tokens=False)
    if after[:len(before)] == before:
        return after[len(before):]
    return tokenizer.encode(THINK_END, add_special_tokens=False)


def compact(cache, slots, rows, done, tokens):
    """Step 5: finished rows leave. Each hole, from the front, takes the last live row: one cache row is copied per
    finished row, never the whole cache. Returns the live rows and their next input tokens, in slot order."""
    j, last = 0, len(rows) - 1
    while True:
        while last >= 0 and done[last]:
            last -= 1
        while j < last and not done[j]:
            j += 1
        if j >= last:
            break
        slots.move(cache, last, j, rows[last].written)
        rows[j], tokens[j], done[j], done[last] = rows[last], tokens[last], False, True
    return rows[:last + 1], tokens[:last + 1]


def stop_tokens(model, tokenizer):
    """The ids that end a row (the model's EOS ids and <|im_end|>), and per token id whether it can complete
    "</think>" (only a token containing ">" can: a row's tail is decoded only after one of those). The second list
    covers the tokenizer's ids only: a model's embedding may have more rows (Qwen2.5-VL: 152,064 for 151,665 tokens)
    and generate() never samples those 399 (ours; HF and vLLM do not mask them): a row without a token decodes to
    nothing, so the reward would read a text that is not the tokens trained on. A trained model gives them ~0."""
    eos = model.generation_config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    stop_ids.discard(None)
    if getattr(tokenizer, "_may_close", None) is None:
        tokenizer._may_close = [">" in (t or "") for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))]
    return stop_ids, tokenizer._may_close


# ----------------------------------------------------------------------------------------------------
# The loop: steps 1-6

@torch.inference_mode()  # not no_grad: no version counters or autograd views; ~10% of a tiny model's step (ours)
def generate(model, processor, conversations, *, max_new_tokens=4096, temperature=0.0, top_p=1.0,
             repetition_penalty=1.0, think_budget=None, answer_budget=512, batch_size=32, seed=None, progress=False,
             stats=None, compile=False):
    """Complete each chat; returns one Completion per conversation, in input order. `batch_size` slots are
    decoded together and a slot is refilled as soon as its row ends (continuous batching); every row keeps its
    own budget, forced exit and seeded generator, so its output does not depend on the slots or the rows beside
    it. `max_new_tokens` and `seed`: one for all (row i's seed derived from it and i) or one per conversation.
    `repetition_penalty` (1.0: none) as model.generate applies it (penalize_repeats); a checkpoint's
    generation_config.json is not read: what is sampled is what the arguments say.
    `stats`, a dict, gets decode_forwards, occupancy (live rows per forward / slots) and with `compile` compile_s."""
    n = len(conversations)
    budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
    if not conversations or max(budgets) <= 0:
        return [Completion("", [], "length", 0, []) for _ in conversations]
    tokenizer = data.tokenizer_of(processor)
    stop_ids, may_close = stop_tokens(model, tokenizer)
    limit = model.config.get_text_config().max_position_embeddings
    encodings, lengths = encode_all(processor, conversations, limit)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else \
        [row_seed(torch.randint(0, 2**31 - 1, ()).item() if seed is None else seed, i) for i in range(n)]
    device, slots_n = next(model.parameters()).device, min(batch_size, n)
    cache, slots = allocate(model, slots_n, min(limit, max(lengths) + max(budgets)),
                            len(may_close) if repetition_penalty != 1.0 else None)
    axes = 3 if hasattr(model.model, "get_rope_index") else 2  # M-RoPE's (t, h, w), or a plain LM's one position
    forward = compiled(model) if compile else decoder_step(model)
    pending = sorted(range(n), key=lambda i: lengths[i])  # similar lengths prefill together
    results, live, logits, forwards, occupied = [None] * n, [], None, 0, 0
    bar = tqdm(total=n, desc="generate", disable=not progress, delay=5, leave=False)  # shown if slow
    while pending or live:
        free = slots_n - len(live)
        if admit_now(free, slots_n, len(pending)):
            take = min(free, PREFILL_ROWS)
            new, pending = pending[:take], pending[take:]
            new_logits, width = prefill(model, tokenizer, [encodings[i] for i in new], cache, slots, len(live))
            live += [Row(torch.Generator(device=device).manual_seed(seeds[i]), think_budget is not None, index=i,
                         budget=min(budgets[i], limit - lengths[i]), written=width) for i in new]
            logits = new_logits if logits is None else torch.cat([logits, new_logits])
        picked, logp = next_tokens(logits[:, :len(may_close)], live, slots, temperature, top_p, repetition_penalty)
        done = [not step_row(row, t, lp, tokenizer, think_budget=think_budget, answer_budget=answer_budget,
                             stop_ids=stop_ids, may_close=may_close) for row, t, lp in zip(live, picked, logp)]
        tokens = [row.tokens[-1] for row in live]  # a forced exit wrote over what was sampled
        slots.hold(tokens)
        for row in (row for row, d in zip(live, done) if d):
            results[row.index] = row.completion(tokenizer)
            bar.update(1)
        live, tokens = compact(cache, slots, live, done, tokens)
        if not live:
            logits = None
            continue
        logits = decode_one_token(forward, torch.tensor(tokens, device=device), [row.written for row in live], cache,
                                  slots, axes)
        forwards, occupied = forwards + 1, occupied + len(live)
        for row in live:
            row.written += 1
    bar.close()
    if stats is not None:
        stats.update(decode_forwards=forwards, occupancy=occupied / max(forwards * slots_n, 1))
        stats.update({"compile_s": model.compile_s} if compile else {})
    return results


def row_seed(*keys):
    """The seed of one row's sampling stream, from the keys that name the row: the run's seed, then e.g. its index,
    or a hash of (question, sample), or (step, prompt, sample) in GRPO. A row samples the same tokens whatever batch,
    rank or order it lands in. row_seed(a, b) = a * 1,000,003 + b; more keys fold in the same way (mod 2^63)."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + key) % 2 ** 63
    return seed


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
    ap.add_argument("--repetition-penalty", type=POSITIVE, default=1.0, help="model.generate's repetition "
                    "penalty; 1: off (ours; Qwen2.5-VL-7B-Instruct's generation_config.json asks for 1.05)")
    ap.add_argument("--think-budget", type=POSITIVE_INT, default=None, help="forced exit after N thinking tokens (§2.1)")
    ap.add_argument("--answer-budget", type=POSITIVE_INT, default=512, help="answer tokens after a forced exit (ours)")
    ap.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="KV-cache slots decoded together, "
                    "each refilled as its row ends (ours)")
    ap.add_argument("--seed", type=COUNT, default=0, help="sampling seed (ours)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (same tokens; compiling "
                    "takes seconds to a minute, worth it for long runs)")
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
    """One --input row with its images read; a missing or unreadable image, or a lone surrogate (JSON's "\\ud800",
    which cannot be tokenized), is a malformed row: counted and skipped."""
    images = row.get("images") or []
    return row | {"prompt": str(row["prompt"]).encode("utf-8").decode(), "images": images,
                  "pictures": [data.load_image(p) for p in images]}


def main(argv=None):
    args = parse_args(argv)
    args.model = data.check_model(args.model)
    if not args.distil:  # bad rows are counted and skipped before the model loads
        rows = data.read_rows(args.input) if args.input else [{"prompt": args.prompt, "images": args.image}]
        rows = data.convert_rows(rows, input_row, "--input" if args.input else "--prompt")
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device != "cpu" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    model = data.load_model(args.model, dtype=dtype, device=device, progress=True).eval()
    processor = data.load_processor(args.model)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty,
                    think_budget=args.think_budget, answer_budget=args.answer_budget, batch_size=args.batch_size,
                    compile=args.compile)
    if args.distil:
        return distil_main(args, model, processor, sampling)
    print(f"template: {args.template}" + {"train": " (appendix C's training prompt: what SFT and GRPO saw)",
                                         "none": " (the message as given)"}.get(args.template, " (appendix C)"),
          file=sys.stderr)
    try:
        conversations = [[data.user_message(data.eval_prompt(r["prompt"], None, args.template), r.pop("pictures"))]
                         for r in rows]
        stats = {}
        completions = generate(model, processor, conversations, seed=args.seed, progress=args.input is not None,
                               stats=stats, **sampling)
    except ValueError as e:  # a prompt longer than the context
        raise DataError(str(e)) from e
    if args.compile:
        print(f"compile: {stats['compile_s']:.1f} s (the first decode step)", file=sys.stderr)
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
