"""SFT training throughput: tokens/s per device and, on a GPU, model FLOPs utilization (MFU).

    python bench/bench_sft.py             # CPU: the tiny model (and the 150M shape), short sequences
    python bench/bench_sft.py --gpu       # CUDA: bf16 random-weight 3B and 7B shapes at 4,096 tokens
    python bench/bench_sft.py --tokenize 2400   # the SFT token cache on Qwen's real tokenizer (tiny-qwen)

One device, the exact step of sft.py: sft.sft_step (token_loss_sum -> backward -> clip -> AdamW) on a model
sharded by sft.shard_model over a process group of one, as `python sft.py` runs it: fp32 master weights, bf16
compute and activation checkpointing on GPU. MFU = 6 x trainable params x tokens/s / peak FLOPs.
Target on an H100: MFU >= 40% for the 3B shape.
"""
import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
import sft  # noqa: E402
from bench_generate import random_model  # noqa: E402
from plumbing import runs  # noqa: E402
from plumbing.distributed import setup_distributed  # noqa: E402


class RandomRows:
    """`batch` random sequences of `seq` tokens, every token a target: the SFT set's interface (data.py)."""

    def __init__(self, batch, seq, vocab):
        self.ids = torch.randint(10, vocab, (batch, seq))
        self.lengths, self.n_target, self.images = [seq] * batch, [seq - 1] * batch, {}

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "images": []}


def bench(model, processor, device, batch, seq, steps):
    model = sft.shard_model(model, device, checkpointing=device.type == "cuda")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    rows = RandomRows(batch, seq, model.config.text_config.vocab_size)
    args = SimpleNamespace(micro_batch=batch, grad_clip=1.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(steps + 1):
        sync()
        t = time.perf_counter()
        sft.sft_step(model, optimizer, trainable, rows, list(range(batch)), processor, args, 0, 1, device)
        sync()
        if i:  # the first step warms up kernels and allocates optimizer state
            times.append(time.perf_counter() - t)
    tok_s = batch * seq / (sum(times) / len(times))
    return tok_s, runs.mfu(tok_s, sum(p.numel() for p in trainable), device)


def long_thought(rng, words=1920):
    """A synthetic chain of thought of ~3,500 Qwen tokens: English, numbers, a little LaTeX, as OpenThoughts' are."""
    vocab = ("so we need the sum of both terms then check whether that holds let us try again wait maybe "
             "compute next step because therefore the answer is").split()
    pieces = [rng.choice(vocab) if rng.random() < 0.8 else
              rng.choice([str(rng.randint(0, 9999)), f"$\\frac{{{rng.randint(1, 99)}}}{{{rng.randint(2, 99)}}}$",
                          "$x^2 + y^2$", "=", "\n\n"]) for _ in range(words)]
    return "<think>\n" + " ".join(pieces) + "\n</think>\n<answer>42</answer>"


def tokenize(rows):
    """tokens/s of data.load_sft_data building its cache from `rows` synthetic long rows, as for OpenThoughts."""
    import json
    import random
    import tempfile
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "rows.jsonl"
        source.write_text("".join(json.dumps({"question": f"Problem {i}: find x.", "response": long_thought(rng)})
                                  + "\n" for i in range(rows)))
        data.CACHE = Path(tmp) / "cache"
        processor = data.load_processor("tiny-qwen")
        started = time.perf_counter()
        examples = data.load_sft_data(str(source), processor, max_len=16384)
        seconds = time.perf_counter() - started
    tokens = sum(examples.lengths)
    print(f"{rows} rows, {tokens / rows:.0f} tokens a row (Qwen's tokenizer): {seconds:.1f} s, {tokens / seconds:,.0f} "
          f"tokens/s, {rows / seconds:.0f} rows/s on {min(8, os.cpu_count() or 1)} tokenizing processes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="bf16 3B/7B shapes on CUDA, with MFU")
    ap.add_argument("--tokenize", type=int, metavar="ROWS", help="time the SFT token cache on ROWS long rows instead")
    args = ap.parse_args()
    if args.tokenize:
        return tokenize(args.tokenize)
    setup_distributed()
    processor = data.load_processor("tiny")
    if args.gpu:
        device, shapes = torch.device("cuda"), [("3B", 1, 4096), ("7B", 1, 4096)]
    else:
        device, shapes = torch.device("cpu"), [("tiny", 4, 512), ("150M", 2, 512)]
    print(f"{'model':>6} {'batch':>5} {'seq':>5} {'tokens/s':>10} {'MFU':>6}")
    for shape, batch, seq in shapes:
        if shape == "tiny":
            model = data.load_model("tiny").to(device)
        else:
            model = random_model(shape, processor, torch.float32, device)
        try:
            tok_s, util = bench(model, processor, device, batch, seq, steps=3)
            print(f"{shape:>6} {batch:>5} {seq:>5} {tok_s:>10.0f} {'' if util is None else f'{util:.1%}':>6}", flush=True)
        except torch.OutOfMemoryError:
            print(f"{shape:>6} {batch:>5} {seq:>5}  out of memory on one device (use FSDP across GPUs)")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
