"""bench/bench_memory.py: the simulated peak checked against exact counts and against real tensors."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_memory as bm  # noqa: E402
import data  # noqa: E402

TINY = ["--shape", "tiny", "--micro-batch", "2", "--seq", "64"]


def shard_bytes(shapes, world, nbytes):
    """FSDP2 puts ceil(rows / world) rows of every parameter on each rank (the last ranks' shards padded)."""
    return sum(math.ceil(s[0] / world) * math.prod(s[1:]) * nbytes for s in shapes)


@pytest.mark.parametrize("world", [2, 3])
def test_parameter_gradient_and_optimizer_bytes_are_the_exact_counts(world):
    model = data.load_model("tiny")
    shapes = [tuple(p.shape) for p in model.parameters()]
    trainable = [tuple(p.shape) for n, p in model.named_parameters() if not n.startswith("model.visual")]
    row = bm.main([*TINY, "--stage", "sft", "--world", str(world)])
    gib = bm.GIB
    assert row["params_gib"] * gib == shard_bytes(shapes, world, 4)           # fp32 master shards, vision too
    assert row["grads_gib"] * gib == shard_bytes(trainable, world, 4)         # the vision tower is frozen
    assert row["optimizer_gib"] * gib == 2 * shard_bytes(trainable, world, 4)  # AdamW: exp_avg, exp_avg_sq
    assert row["other_gib"] > 0


@pytest.mark.parametrize("stage,extra", [("sft", []), ("grpo", ["--gen-batch", "4", "--prompt-len", "16",
                                                                 "--new-tokens", "32"])])
def test_fake_tensors_give_the_peak_of_real_ones(stage, extra):
    """The same steps on real CPU tensors: the same peak, up to the one causal mask the fake run must build
    because it cannot look at the data (B x 1 x L x L booleans)."""
    fake = bm.main([*TINY, "--stage", stage, "--world", "2", *extra])
    real = bm.main([*TINY, "--stage", stage, "--world", "2", "--real", *extra])
    length = 64 if stage == "sft" else 16 + 32
    assert 0 <= (fake["peak_gib"] - real["peak_gib"]) * bm.GIB <= 2 * length * length
    for key in ("params_gib", "grads_gib", "optimizer_gib"):
        assert fake[key] == real[key]


def test_the_papers_7b_runs_fit_where_the_paper_ran_them():
    """Qwen2.5-VL-7B on 8 ranks: SFT at micro-batch 4 x 4,096 (B.1) under 36 GiB per GPU; GRPO at 16 prompts x 8
    samples per rank, 4,096 new tokens (B.2) under 72 GiB, and under 36 GiB with --offload (A100-40GB)."""
    sft = bm.main(["--stage", "sft", "--shape", "7b", "--world", "8"])
    assert sft["peak_gib"] <= 36 and sft["params_gib"] == pytest.approx(8.29e9 * 4 / 8 / bm.GIB, rel=0.01)
    grpo = bm.main(["--stage", "grpo", "--shape", "7b", "--world", "8"])
    assert 36 < grpo["peak_gib"] <= 72 and grpo["kv_cache_gib"] > 10  # the 64 x 4,608-token cache is counted
    parked = bm.main(["--stage", "grpo", "--shape", "7b", "--world", "8", "--offload"])
    assert parked["peak_gib"] <= 36 and parked["kv_cache_gib"] == grpo["kv_cache_gib"]


def test_a_refresh_gathers_the_trained_weights_in_the_copys_dtype():
    """grpo.refresh_inference_copy under the simulation: the bytes a refresh all-gathers are the trained
    parameters' count times 2 (a bf16 copy; the frozen vision tower is not gathered again), against 4 bytes for
    every parameter and buffer before; and --offload, which now drops the weights the refresh overwrites instead of
    copying them out and back, does not raise the peak."""
    model = data.load_model("tiny")
    trained = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.visual"))
    everything = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    grpo_run = ["--stage", "grpo", "--world", "2", "--gen-batch", "4", "--prompt-len", "16", "--new-tokens", "32"]
    row = bm.main([*TINY, *grpo_run])
    assert row["refresh_gathered_gib"] * bm.GIB == 2 * trained
    assert row["refresh_all_fp32_gib"] * bm.GIB == 4 * everything
    assert bm.main([*TINY, *grpo_run, "--offload"])["peak_gib"] <= row["peak_gib"]
