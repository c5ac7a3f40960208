"""Decode speed: generate.py's slot cache with continuous batching, side by side with the chunked loop it replaced
(kept below as the reference path: a DynamicCache grown by torch.cat, chunks run to their longest row) and with
transformers' model.generate. Same settings, interleaved runs: each ratio is the median over `--repeats` of the
ratio within a pair of neighbouring runs (a drift in a shared machine's speed cancels within a pair; the best of
each alone gave the 7B-KV row 1.47x to 1.78x over runs of the same code), tok/s the best run.

    python bench/bench_generate.py                 # CPU: the rows below; --json ends with one JSON object
    python bench/bench_generate.py --gpu           # CUDA: bf16 3B/7B shapes, batch 64, 1,024 new tokens

Rows (greedy, random weights, no stop token reached unless per-row caps say so):
    tiny_b16          the tiny model, 16 equal prompts, 64 new tokens: ours / reference
    kv7b_b16          7B's per-layer KV shape (4 KV heads x 128), 2 layers, 16 x 512 new tokens: ours / reference
    shape150m_b16     a ~150M Qwen2.5-VL shape, 16 x 32 new tokens: ours / reference
    longtail_*        512 prompts whose caps are drawn lognormal (median 48, at most 256), 32 slots (16 rows a
                      slot, as 1,024 rollouts on 64 slots): wall-time
                      speed-up, decode forwards ours / reference, and our occupancy (live rows per forward / slots)
    hf_tiny_b16       ours / model.generate on the tiny row
    compile_tiny_b1   the tiny model, 1 prompt, 128 new tokens: ours eager / ours with --compile (compile_s: its
                      compile time)
"""
import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import generate as G  # noqa: E402

SHAPES = {  # text hidden, layers, heads, kv heads, intermediate (vision tower kept small: prompts are text)
    "150M": (768, 12, 12, 2, 2048), "3B": (2048, 36, 16, 2, 11008), "7B": (3584, 28, 28, 4, 18944),
    "kv7b": (512, 2, 4, 4, 128)}  # 7B's KV per layer (4 heads of 128); a thin MLP, so the cache dominates


def random_model(shape, processor, dtype, device):
    from transformers import Qwen2_5_VLForConditionalGeneration
    hidden, layers, heads, kv, inter = SHAPES[shape]
    config = data.load_model("tiny").config
    tc = config.text_config
    tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads = hidden, layers, heads
    tc.num_key_value_heads, tc.intermediate_size, tc.layer_types = kv, inter, ["full_attention"] * layers
    half = hidden // heads // 2
    tc.rope_parameters["mrope_section"] = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    config.vision_config.out_hidden_size = hidden
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype).eval()
    return model


@torch.no_grad()
def chunk_reference(model, tokenizer, encodings, seeds, budgets, *, temperature, top_p, think_budget,
                   answer_budget, stop_ids, may_close):
    """generate.py before its slot cache: one chunk decoded until its longest row ends, the cache grown by
    torch.cat (DynamicCache) and cut down by batch_select_indices as rows finish. Rows end at their own budget."""
    device = next(model.parameters()).device
    # 2-3. left-pad, then one forward over all prompts fills the KV cache and gives each row's next-token logits
    batch = {k: v.to(device) for k, v in G.collate(encodings, tokenizer.pad_token_id).items()}      # (B, L) each
    positions, next_pos = G.rope_positions(model, batch)                                 # (3, B, L), (B,)
    # Without padding the causal mask is implicit: passing None lets attention skip building a mask each step.
    mask = batch["attention_mask"] if not bool(batch["attention_mask"].all()) else None             # (B, L)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                   **G.vision_inputs(batch), past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    rows = [G.Row(torch.Generator(device=device).manual_seed(s), think_budget is not None) for s in seeds]
    live = list(rows)                    # the rows still in the batch, in batch order
    forwards, occupied = 0, 0
    for _ in range(max(budgets)):
        # 4. one token per live row                                                   logits: (B_live, vocab)
        token = G.sample(logits, temperature, top_p, [row.generator for row in live])[0]  # (B_live,)
        keep = []
        for j, row in enumerate(live):
            if row.forced:               # 6. a forced exit writes its "</think>" over what was sampled
                token[j] = row.forced.pop(0)
                row.sampled.append(0)
            else:
                row.sampled.append(1)
                if row.answer_left is not None:
                    row.answer_left -= 1
            if G.advance(row, int(token[j]), tokenizer, think_budget=think_budget, answer_budget=answer_budget,
                         stop_ids=stop_ids, may_close=may_close) and len(row.tokens) < budgets[rows.index(row)]:
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
        logits = model(input_ids=token[:, None], attention_mask=mask,
                       position_ids=G.next_positions(next_pos, positions.dim()),
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_pos, forwards, occupied = next_pos + 1, forwards + 1, occupied + len(live)
    STATS["forwards"] += forwards
    STATS["occupied"] += occupied
    return [G.Completion(tokenizer.decode(row.tokens, skip_special_tokens=True), row.tokens, row.finish_reason,
                       len(row.tokens), row.sampled) for row in rows]


STATS = {"forwards": 0, "occupied": 0}


def reference_generate(model, processor, conversations, *, max_new_tokens, batch_size, temperature=0.0, top_p=1.0,
                       seed=0, think_budget=None, answer_budget=512):
    """The reference path: prompts sorted by length, cut into chunks of `batch_size`, each chunk run to its end."""
    tokenizer = processor.tokenizer
    stop_ids, may_close = G.stop_tokens(model, tokenizer)
    encodings = [G.encode(processor, c) for c in conversations]
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(encodings)
    order = sorted(range(len(encodings)), key=lambda i: encodings[i]["input_ids"].shape[1])
    results = [None] * len(encodings)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        chunk = chunk_reference(model, tokenizer, [encodings[i] for i in rows], [G.row_seed(seed, i) for i in rows],
                                [budgets[i] for i in rows], temperature=temperature, top_p=top_p,
                                think_budget=think_budget, answer_budget=answer_budget, stop_ids=stop_ids,
                                may_close=may_close)
        for i, c in zip(rows, chunk):
            results[i] = c
    return results



def timed(fn, sync):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def compare(model, processor, convs, budgets, slots, repeats, hf=False):
    """Seconds of ours, the reference (and model.generate), interleaved: the best of each and the median paired
    ratio other / ours; forwards and occupancy of each."""
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # every row runs to its cap
    sync = torch.cuda.synchronize if next(model.parameters()).device.type == "cuda" else (lambda: None)
    runs, stats = {"ours": [], "ref": [], "hf": []}, {}
    for _ in range(repeats):
        runs["ours"].append(timed(lambda: G.generate(model, processor, convs, max_new_tokens=budgets, batch_size=slots,
                                                     seed=0, stats=stats), sync)[0])
        STATS.update(forwards=0, occupied=0)
        runs["ref"].append(timed(lambda: reference_generate(model, processor, convs, max_new_tokens=budgets,
                                                            batch_size=slots), sync)[0])
        if hf:
            inputs = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                   return_tensors="pt", padding=True).to(model.device)
            runs["hf"].append(timed(lambda: model.generate(**inputs, max_new_tokens=budgets, min_new_tokens=budgets,
                                                           do_sample=False), sync)[0])
    model.generation_config.eos_token_id = eos
    ref_forwards = STATS["forwards"]
    best = {k: min(v) for k, v in runs.items() if v}
    best.update({f"{k}_ratio": statistics.median(o / u for o, u in zip(runs[k], runs["ours"])) for k in ("ref", "hf")
                 if runs[k]})
    return best, {"forwards": stats["decode_forwards"], "occupancy": stats["occupancy"], "ref_forwards": ref_forwards,
                  "ref_occupancy": STATS["occupied"] / max(ref_forwards * slots, 1)}


def copy_bandwidth(megabytes=256, repeats=5):
    """This host's memory bandwidth as a tensor copy sees it, GB/s read + written: what the reference's torch.cat of
    the whole cache at every step pays for."""
    src = torch.ones(megabytes * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: dst.copy_(src), lambda: None)[0] for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def kv_sweep(processor, lengths=(128, 256, 512, 1024), repeats=5):
    """What the kv7b row depends on. Both loops read the same keys and values in attention; the reference also copies
    its whole cache at every step (DynamicCache's torch.cat: 16 rows x 2 layers x K, V, 73 MB at 560 columns), ours
    writes one column in place. So the ratio grows with the cache's length (the copies add up quadratically) and
    falls as the host's memory bandwidth rises against its compute. The ratio at several lengths, and the host's
    copy bandwidth."""
    model = random_model("kv7b", processor, torch.float32, "cpu")
    out = {"copy_gb_s": round(copy_bandwidth(), 1)}
    for new in lengths:
        best, _ = compare(model, processor, prompts(16), new, 16, repeats)
        out[f"kv7b_b16_new{new}"] = round(best["ref_ratio"], 3)
        print(f"kv7b_b16, {new} new tokens: speed-up {best['ref_ratio']:.2f}x", flush=True)
    print(f"copy bandwidth {out['copy_gb_s']} GB/s")
    return out


def prompts(n):
    return [[data.user_message(f"Question {i}: what is {i} + {i}?")] for i in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="bf16 3B/7B shapes on CUDA, tokens/s against the bandwidth bound")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved runs of each")
    ap.add_argument("--json", action="store_true", help="end with one JSON object of the ratios")
    ap.add_argument("--kv-sweep", action="store_true", help="the kv7b row at 128-1024 new tokens, and this host's "
                    "copy bandwidth: what that row depends on")
    args = ap.parse_args(argv)
    processor = data.load_processor("tiny")
    torch.manual_seed(0)
    if args.gpu:
        return gpu(processor)
    if args.kv_sweep:
        out = kv_sweep(processor, repeats=args.repeats)
        if args.json:
            print(json.dumps(out))
        return out
    out = {}
    tiny = data.load_model("tiny").eval()
    for key, model, batch, new in [("tiny_b16", tiny, 16, 64),
                                   ("kv7b_b16", random_model("kv7b", processor, torch.float32, "cpu"), 16, 512),
                                   ("shape150m_b16", random_model("150M", processor, torch.float32, "cpu"), 16, 32)]:
        best, _ = compare(model, processor, prompts(batch), new, batch, args.repeats, hf=key == "tiny_b16")
        out[key] = best["ref_ratio"]
        if key == "tiny_b16":
            out["hf_tiny_b16"] = best["hf_ratio"]
        print(f"{key:>14}: ours {batch * new / best['ours']:8.1f} tok/s, reference {batch * new / best['ref']:8.1f}, "
              f"speed-up {out[key]:.2f}x", flush=True)
    rng = random.Random(0)
    caps = [min(256, max(1, round(rng.lognormvariate(0, 0.9) * 48))) for _ in range(512)]  # median 48, long tail
    best, s = compare(tiny, processor, prompts(len(caps)), caps, 32, max(1, args.repeats - 1))
    out.update(longtail_speedup=best["ref_ratio"], longtail_forwards_ratio=s["forwards"] / s["ref_forwards"],
               longtail_occupancy=s["occupancy"], longtail_ref_occupancy=s["ref_occupancy"])
    print(f"      longtail: {sum(caps)} tokens in {len(caps)} rows, 32 slots: speed-up {out['longtail_speedup']:.2f}x, decode "
          f"forwards {s['forwards']} vs {s['ref_forwards']} ({out['longtail_forwards_ratio']:.2f}), occupancy "
          f"{s['occupancy']:.2f} vs {s['ref_occupancy']:.2f}")
    out.update(compiled(tiny, processor, args.repeats))
    if args.json:
        print(json.dumps(out))
    return out


def compiled(model, processor, repeats, new=128):
    """--compile at batch 1: ours eager against ours with the decode step compiled, interleaved, after compiling."""
    convs, stats, runs = prompts(1), {}, {True: [], False: []}
    run = lambda compile: G.generate(model, processor, convs, max_new_tokens=new, batch_size=1, stats=stats,  # noqa
                                     compile=compile)
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    same = run(True)[0].token_ids == run(False)[0].token_ids  # the first compiled call compiles
    for _ in range(repeats + 2):  # a batch-1 forward is short: a few more runs steady the median
        for compile in (False, True):
            runs[compile].append(timed(lambda: run(compile), lambda: None)[0])
    model.generation_config.eos_token_id = eos
    ratio = statistics.median(e / c for e, c in zip(runs[False], runs[True]))
    print(f"  compile_tiny_b1: eager {new / min(runs[False]):8.1f} tok/s, compiled {new / min(runs[True]):8.1f}, "
          f"speed-up {ratio:.2f}x, compile {model.compile_s:.1f} s, same tokens: {same}")
    return {"compile_tiny_b1": ratio, "compile_s": model.compile_s, "compile_same_tokens": same}


def step_bytes(model, batch, cache_len):
    """The least a decode step must read: every weight it multiplies by (the decoder layers, the final norm, the
    head; not the vision tower, and of the embedding table only `batch` rows) and `batch` KV caches of
    `cache_len` tokens."""
    decoder, size = model.get_decoder(), lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    embed = decoder.embed_tokens.weight
    weights = size(decoder.layers.parameters()) + size(decoder.norm.parameters()) + \
        size(model.get_output_embeddings().parameters()) + batch * embed.shape[1] * embed.element_size()
    tc = model.config.get_text_config()
    per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads)
    return weights + batch * cache_len * per_token * embed.element_size()


def gpu(processor, device="cuda", dtype=torch.bfloat16, shapes=("3B", "7B"), batches=(1, 64), new=1024,
        peak_bw=None):
    """tokens/s of ours against the bound of reading a step's bytes (step_bytes) once at the device's peak
    bandwidth; the arguments other than `processor` exist for the CPU test of this path."""
    if peak_bw is None:  # HBM3e / HBM3 (NVIDIA's H200 and H100 SXM data sheets)
        peak_bw = 4.8e12 if "H200" in torch.cuda.get_device_name() else 3.35e12
    rows = []
    for shape in shapes:
        model = random_model(shape, processor, dtype, device)
        for batch in batches:
            convs = prompts(batch)
            best, _ = compare(model, processor, convs, new, batch, 1)
            prompt = sum(G.encode(processor, c)["input_ids"].shape[1] for c in convs) / batch
            tok_s = batch * new / best["ours"]
            bound = peak_bw / step_bytes(model, batch, prompt + new / 2) * batch  # at the run's mean cache length
            rows.append({"shape": shape, "batch": batch, "tok_s": tok_s, "bound_tok_s": bound,
                         "ref_tok_s": batch * new / best["ref"]})
            print(f"{shape} batch {batch}: ours {tok_s:.0f} tok/s ({tok_s / bound:.0%} of the bandwidth bound "
                  f"{bound:.0f}), reference {rows[-1]['ref_tok_s']:.0f} tok/s", flush=True)
        del model
    return rows


if __name__ == "__main__":
    main()
