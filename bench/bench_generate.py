"""Decode speed: our loop (generate.py) vs transformers' model.generate, side by side, same settings.

    python bench/bench_generate.py                 # CPU: tiny and a ~150M-parameter Qwen2.5-VL shape
    python bench/bench_generate.py --gpu           # CUDA: bf16 3B/7B shapes, batch 64, 1,024 new tokens

Greedy decoding, random weights (no download), no stop token reached, so both produce the same number of
tokens. Prints tokens/s for each and our speed as a ratio of model.generate's. On a GPU it also prints the
fraction of the memory-bandwidth bound: each decode step must read all weights plus the KV cache once.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import generate as G  # noqa: E402

SHAPES = {  # text hidden, layers, heads, kv heads, intermediate (vision tower kept small: prompts are text)
    "150M": (768, 12, 12, 2, 2048), "3B": (2048, 36, 16, 2, 11008), "7B": (3584, 28, 28, 4, 18944)}


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


def time_both(model, processor, batch, new_tokens, repeats=2):
    convs = [[data.user_message(f"Question {i}: what is {i} + {i}?")] for i in range(batch)]
    inputs = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", padding=True).to(model.device)
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # both run the full length
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    best = {"ours": 1e9, "hf": 1e9}
    for _ in range(repeats):
        sync(); t = time.perf_counter()
        G.generate(model, processor, convs, max_new_tokens=new_tokens, batch_size=batch)
        sync(); best["ours"] = min(best["ours"], time.perf_counter() - t)
        sync(); t = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync(); best["hf"] = min(best["hf"], time.perf_counter() - t)
    model.generation_config.eos_token_id = eos
    return {k: batch * new_tokens / v for k, v in best.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="bf16 3B/7B shapes on CUDA")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per sequence (default: per shape)")
    args = ap.parse_args()
    processor = data.load_processor("tiny")
    torch.manual_seed(0)
    if args.gpu:
        runs = [(s, b, args.new_tokens or 1024) for s in ("3B", "7B") for b in (1, 64)]
        dtype, device, peak_bw = torch.bfloat16, "cuda", 3.35e12  # H100 SXM HBM3
    else:
        runs = [("tiny", 1, 64), ("tiny", 16, 64), ("150M", 1, 32), ("150M", 16, 32)]
        dtype, device, peak_bw = torch.float32, "cpu", None
    print(f"{'model':>6} {'batch':>5} {'new':>5} {'ours tok/s':>11} {'generate tok/s':>15} {'ratio':>6}")
    for shape, batch, new in runs:
        model = data.load_model("tiny").eval() if shape == "tiny" else random_model(shape, processor, dtype, device)
        r = time_both(model, processor, batch, new, repeats=3)
        line = f"{shape:>6} {batch:>5} {new:>5} {r['ours']:>11.1f} {r['hf']:>15.1f} {r['ours'] / r['hf']:>6.2f}"
        if peak_bw:
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            tc = model.config.text_config
            kv = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 2
            step_bytes = weights + batch * kv * (new // 2 + 64)  # average cache length over the run
            line += f"  bandwidth bound {r['ours'] / batch * step_bytes / peak_bw:.0%}"
        print(line, flush=True)
        del model


if __name__ == "__main__":
    main()
