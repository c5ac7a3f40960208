"""SFT training throughput: tokens/s per device and, on a GPU, model FLOPs utilization (MFU).

    python bench/bench_sft.py             # CPU: the tiny model (and the 150M shape), short sequences
    python bench/bench_sft.py --gpu       # CUDA: bf16 random-weight 3B and 7B shapes at 4,096 tokens

One device, the exact step of sft.py: token_loss_sum -> backward -> clip -> AdamW, fp32 master weights with
bf16 autocast on GPU, activation checkpointing on GPU. MFU = 6 x trainable params x tokens/s / peak FLOPs.
Target on an H100: MFU >= 40% for the 3B shape.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
import sft  # noqa: E402
from bench_generate import random_model  # noqa: E402


def bench(model, device, batch, seq, steps):
    model.model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(10, vocab, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(steps + 1):
        sync(); t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = sft.token_loss_sum(model, ids, ids, mask) / ids.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i:  # the first step warms up kernels and allocates optimizer state
            times.append(time.perf_counter() - t)
    tok_s = batch * seq / (sum(times) / len(times))
    return tok_s, sft.mfu(tok_s, sum(p.numel() for p in params), device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="bf16 3B/7B shapes on CUDA, with MFU")
    args = ap.parse_args()
    processor = data.load_processor("tiny")
    if args.gpu:
        device, runs = torch.device("cuda"), [("3B", 1, 4096), ("7B", 1, 4096)]
    else:
        device, runs = torch.device("cpu"), [("tiny", 4, 512), ("150M", 2, 512)]
    print(f"{'model':>6} {'batch':>5} {'seq':>5} {'tokens/s':>10} {'MFU':>6}")
    for shape, batch, seq in runs:
        if shape == "tiny":
            model = data.load_model("tiny").to(device)
        else:
            model = random_model(shape, processor, torch.float32, device)
            if device.type == "cuda":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        try:
            tok_s, util = bench(model, device, batch, seq, steps=3)
            print(f"{shape:>6} {batch:>5} {seq:>5} {tok_s:>10.0f} {'' if util is None else f'{util:.1%}':>6}", flush=True)
        except torch.OutOfMemoryError:
            print(f"{shape:>6} {batch:>5} {seq:>5}  out of memory on one device (use FSDP across GPUs)")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
