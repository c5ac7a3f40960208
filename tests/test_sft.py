import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_error, snapshot, torchrun

import data
import sft
from plumbing import charts

ARGS = ["--model", "tiny", "--data", "toy", "--global-batch", "8", "--lr", "1e-3"]


def run(args, nproc=1):
    """sft.py as its command line runs it; under torchrun every rank must have destroyed its process group by the
    time the interpreter exits (plumbing.cli), or the exit status would be right only by luck."""
    r, at_exit = torchrun("sft.py", args, nproc)
    if nproc > 1 and r.returncode == 0:
        assert at_exit == {k: "destroyed" for k in range(nproc)}, at_exit
    return r


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return data.load_model(str(path)).state_dict()


def test_two_ranks_and_any_accumulation_give_the_same_step(tmp_path):
    """Loss is averaged over every assistant token of the global batch, so the devices/accumulation split
    cannot change the numbers: 1 process x 2 micro-batches, 1 x 4, and 2 ranks x 2 (FSDP2, gloo)."""
    runs = {"1x2": (1, "4"), "1x4": (1, "2"), "2x2": (2, "2")}
    for name, (nproc, micro) in runs.items():
        r = run([*ARGS, "--micro-batch", micro, "--max-steps", "2", "--out", str(tmp_path / name)], nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    ref_loss, ref_w = losses(tmp_path / "1x2"), weights(tmp_path / "1x2" / "final")
    for name in ("1x4", "2x2"):
        assert losses(tmp_path / name) == pytest.approx(ref_loss, rel=1e-5)
        w = weights(tmp_path / name / "final")
        assert w.keys() == ref_w.keys()
        # fp32 sums in a different order: agreement to ~1e-6 after an lr=1e-3 Adam step
        assert max((w[k] - ref_w[k]).abs().max().item() for k in w) < 1e-5
    before = data.load_model("tiny").state_dict()
    moved = max((ref_w[k] - before[k]).abs().max().item() for k in ref_w)
    assert moved > 1e-4  # the step did change the weights, so the comparison above means something


def test_resume_continues_exactly(tmp_path):
    straight, first = tmp_path / "straight", tmp_path / "first"
    sft.main([*ARGS, "--micro-batch", "4", "--max-steps", "4", "--out", str(straight)])
    sft.main([*ARGS, "--micro-batch", "4", "--max-steps", "2", "--final-state", "--out", str(first)])
    sft.main([*ARGS, "--micro-batch", "4", "--max-steps", "4", "--out", str(first), "--resume", str(first / "final")])
    assert losses(first) == pytest.approx(losses(straight), rel=1e-6)
    a, b = weights(straight / "final"), weights(first / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    assert json.loads((first / "final" / "train_state.json").read_text())["step"] == 4


def test_one_device_runs_the_fsdp2_code_of_n_devices(tmp_path):
    """Plain `python sft.py` starts a process group of one and shards with FSDP2 like torchrun's ranks do, so one
    GPU gets the same bf16 mixed precision as eight (the plain model would compute in fp32)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    model = sft.main([*ARGS, "--micro-batch", "8", "--max-steps", "1", "--out", str(tmp_path)])
    assert dist.is_initialized() and dist.get_world_size() == 1
    assert all(isinstance(p, DTensor) for p in model.parameters())
    policy = sft.shard_model(data.load_model("tiny"), torch.device("cpu"), bf16=True)
    assert {p.dtype for p in policy.parameters()} == {torch.float32}  # master weights stay fp32
    hidden = sft.last_hidden(policy, input_ids=torch.tensor([[1, 20, 30]]))
    assert hidden.dtype == torch.bfloat16  # computed in bf16, as on a GPU


def test_checkpoint_loads_with_from_pretrained_and_matches_memory(tmp_path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    model = sft.main([*ARGS, "--micro-batch", "4", "--max-steps", "2", "--out", str(tmp_path)]).eval()
    final = tmp_path / "final"
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(final).eval()
    AutoProcessor.from_pretrained(final)  # tokenizer and processor files are there too
    ids = torch.tensor([[1, 20, 30, 40, 50, 2]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary directory left behind


def test_loss_falls_and_the_format_is_learned(sft_tiny):
    path, metrics = sft_tiny
    assert metrics[-1]["loss"] < 0.25 * metrics[0]["loss"]
    import generate
    model, processor = data.load_model(path).eval(), data.load_processor(path)
    rows = data.load_rl_data("toy")[:10]
    outs = generate.generate(model, processor, [r["messages"] for r in rows], max_new_tokens=60)
    for o in outs:
        assert o.finish_reason == "stop"
        assert o.text.startswith("<think>\n") and "\n</think>\n<answer>\n" in o.text and o.text.endswith("</answer>")


def test_metrics_have_what_a_researcher_reads(tmp_path):
    sft.main(["--model", "tiny", "--data", "toy", "--global-batch", "50", "--micro-batch", "25", "--epochs", "3",
              "--lr", "1e-3", "--lr-decay", "0.8", "--out", str(tmp_path)])
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "padding", "mfu"} <= metrics[0].keys()
    assert [m["epoch"] for m in metrics] == [0, 0, 1, 1, 2, 2]  # 100 examples, 50 a step
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3, 1e-3, 8e-4, 8e-4, 6.4e-4, 6.4e-4])  # B.1: x0.8 per epoch


def test_warmup_is_linear_over_its_share_of_all_steps_then_the_b1_schedule(tmp_path):
    """--warmup 0.5 of 6 steps: lr x 1/3, 2/3, 1 over the first three, then B.1's x0.8 per epoch (off by default:
    B.1 names no warm-up)."""
    sft.main(["--model", "tiny", "--data", "toy", "--global-batch", "50", "--micro-batch", "25", "--epochs", "3",
              "--lr", "1e-3", "--lr-decay", "0.8", "--warmup", "0.5", "--out", str(tmp_path)])
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3 / 3, 2e-3 / 3, 8e-4, 8e-4, 6.4e-4, 6.4e-4])
    assert sft.parse_args([]).warmup == 0.0


def test_gradient_clipping_is_off_by_default_as_in_b1(tmp_path, monkeypatch):
    """Appendix B.1 lists no clipping: by default the norm is measured, not applied."""
    norms = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, max_norm: norms.append(max_norm) or real(p, max_norm))
    sft.main([*ARGS, "--micro-batch", "8", "--max-steps", "1", "--out", str(tmp_path / "a")])
    sft.main([*ARGS, "--micro-batch", "8", "--max-steps", "1", "--grad-clip", "0.5", "--out", str(tmp_path / "b")])
    assert norms == [float("inf"), 0.5]


def test_length_grouping_keeps_every_example_once_and_cuts_padding():
    lengths = [((i * 37) % 100) + 10 for i in range(256)]
    batches = sft.epoch_batches(lengths, 16, window=4, seed=0, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(256))
    def pad(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    ungrouped = sft.epoch_batches(lengths, 16, window=1, seed=0, epoch=0)
    assert pad(batches) < 0.5 * pad(ungrouped)
    assert sft.epoch_batches(lengths, 16, 4, 0, 1) != batches  # a new order each epoch
    mbs = [sft.micro_batches(batches[0], lengths, 4, r, 2) for r in range(2)]
    assert sorted(i for r in mbs for mb in r for i in mb) == sorted(batches[0])


BAD = ["missing_model", "truncated_weights", "bad_config", "out_is_a_file", "out_under_a_file", "finished_run",
       "no_usable_rows", "resume_with_other_settings", "resume_from_weights_alone"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_1_and_out_unchanged(tmp_path, broken, capsys, case):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"from": "user", "value": "q"}]}) + "\n")
    finished, weights_alone = tmp_path / "finished", tmp_path / "weights_alone"
    sft.main([*ARGS, "--micro-batch", "8", "--max-steps", "1", "--final-state", "--out", str(finished)])
    sft.main([*ARGS, "--micro-batch", "8", "--max-steps", "1", "--out", str(weights_alone)])
    capsys.readouterr()
    out = tmp_path / "out"
    argv, first = {
        "missing_model": (["--model", str(broken.missing)], f"--model {broken.missing}: no such directory, and not "
                                                              f"a hub id"),
        "truncated_weights": (["--model", str(broken.truncated)], f"--model {broken.truncated}: model.safetensors "
                              f"is truncated ({broken.size // 2:,} of {broken.size:,} bytes)"),
        "bad_config": (["--model", str(broken.bad_config)], f"--model {broken.bad_config}: config.json is not valid "
                       f"JSON (Expecting property name enclosed in double quotes at line 1)"),
        "out_is_a_file": (["--out", str(broken.file)], f"--out {broken.file} is a file, not a directory"),
        "out_under_a_file": (["--out", str(broken.file / "sub")], f"cannot write to --out {broken.file / 'sub'}: "
                             f"{broken.file} is not a writable directory"),
        "finished_run": (["--out", str(finished)], f"--out {finished} already holds a run; pass --overwrite to "
                         f"replace it, or choose another --out"),
        "no_usable_rows": (["--data", str(bad)], "sft data: no usable rows (1 malformed; first: KeyError: 'assistant')"),
        "resume_with_other_settings": (["--out", str(finished), "--resume", str(finished / "final"), "--lr", "2e-3"],
                                       "--resume with other settings than the run's: --lr 0.001 -> 0.002; pass "
                                       "--allow-changes to continue anyway"),
        "resume_from_weights_alone": (["--out", str(weights_alone), "--resume", str(weights_alone / "final")],
                                      f"--resume {weights_alone / 'final'}: holds the weights alone, no optimizer "
                                      f"state (a final checkpoint keeps it with --final-state)"),
    }[case]
    argv = [*ARGS, "--micro-batch", "8", "--max-steps", "1", "--out", str(out), *argv]
    watched = [out, finished, weights_alone, broken.file]
    before = [snapshot(p) for p in watched]
    status, lines = cli_error(sft.main, argv, capsys)
    assert (status, lines[0]) == (1, "error: " + first) and len(lines) == 1
    assert [snapshot(p) for p in watched] == before  # nothing written, nothing left behind


def test_the_command_line_prints_one_line_and_exits_1(tmp_path):
    r = run(["--model", str(tmp_path / "nope"), "--data", "toy", "--out", str(tmp_path / "out")])
    assert r.returncode == 1 and r.stderr == f"error: --model {tmp_path / 'nope'}: no such directory, and not a hub id\n"
    assert not (tmp_path / "out").exists()


def test_run_directories_refuse_overwrite_and_resume(tmp_path, capsys):
    """A finished run is refused, replaced with --overwrite (fresh metrics, not appended), and a resume from an
    earlier checkpoint rewrites the metrics after it instead of repeating them."""
    out, straight = tmp_path / "run", tmp_path / "straight"
    common = [*ARGS, "--micro-batch", "4", "--save-every", "2", "--max-steps", "4", "--final-state"]
    sft.main([*common, "--out", str(straight)])
    sft.main([*common, "--out", str(out)])
    record = json.loads((out / "args.json").read_text())
    assert record["stage"] == "sft" and record["args"]["lr"] == 1e-3 and set(record["versions"]) >= {"torch",
                                                                                                        "transformers"}
    with pytest.raises(data.DataError, match="already holds a run"):
        sft.main([*common, "--out", str(out)])
    sft.main([*common, "--out", str(out), "--overwrite"])  # replaced, not appended to
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]
    # a run cut off after step 3 (checkpoint at 2): no final/, its metrics hold steps 1-3; the resume redoes step 3
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(rows[:3]) + "\n")
    shutil.rmtree(out / "final")
    sft.main([*common, "--out", str(out), "--resume", str(out / "step_2")])
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == pytest.approx(losses(straight), rel=1e-6)
    assert json.loads((out / "args.json").read_text())["resumes"][0]["step"] == 2
    # a changed hyperparameter needs --allow-changes, which names it
    sft.main([*common, "--max-steps", "5", "--out", str(out), "--resume", str(out / "final"), "--lr", "2e-3",
              "--allow-changes"])
    assert "resuming with changed settings: --lr 0.001 -> 0.002" in capsys.readouterr().err


def stopped_after_two_steps(tmp_path, sig):
    """An SFT run sent `sig` once two steps are logged: (exit status, stderr)."""
    import time
    proc = subprocess.Popen([sys.executable, "sft.py", *ARGS, "--micro-batch", "4", "--epochs", "50",
                             "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigterm_saves_a_resumable_checkpoint_and_exits_cleanly(tmp_path):
    import signal
    code, err = stopped_after_two_steps(tmp_path, signal.SIGTERM)  # what a cluster scheduler sends before preempting
    assert code == 0, err[-2000:]
    last = max(tmp_path.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    assert f"saved {last}; continue with --resume {last}" in err
    assert json.loads((last / "train_state.json").read_text())["step"] == len(losses(tmp_path))
    assert (last / "config.json").exists() and (last / "train_state").is_dir()
    assert not list(tmp_path.glob(".*tmp"))


def test_chunked_lm_head_loss_equals_the_full_logits_loss():
    """The LM head runs on assistant positions only, a few at a time under checkpointing; loss and gradients
    equal those of the straightforward full-logits cross-entropy (relative 1e-6; the weights in float64 so that
    only the order of float32 sums, not the method, could make a difference)."""
    import torch.nn.functional as F
    model = data.load_model("tiny").double()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 900, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :15] = -100                       # prompt
    labels[1, 30:], mask = -100, torch.ones_like(ids)
    mask[1, 30:] = 0                            # a padded row

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros(()) for p in model.parameters()]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    full = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
    full_grads = grads(full)
    for chunk in (7, 1024):  # several chunks, and one
        loss = sft.token_loss_sum(model, ids, labels, mask, chunk=chunk)
        assert loss.item() == pytest.approx(full.item(), rel=1e-6)
        for a, b in zip(grads(loss), full_grads):
            assert (a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-12


LOAD_SCRIPT = '''
import json, resource, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
import sft
from plumbing.distributed import setup_distributed
rank, world, device = setup_distributed()
with torch.device("meta"):  # import the model code first: its ~250 MB are not the load's
    sft.data.model_from_config(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = sft.load_sharded(sys.argv[1], device)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
sums = {n: [float(p.full_tensor().double().sum()), float(p.full_tensor().double().square().sum())]
        for n, p in model.named_parameters()}
json.dump({"before": before, "after": after, "sums": sums}, open(f"{sys.argv[2]}/rank{rank}.json", "w"))
dist.destroy_process_group()
'''


def test_only_rank_0_reads_the_checkpoint(tmp_path):
    """torchrun x 2 on a 108M-parameter Qwen2.5-VL (432 MB in fp32): rank 1 builds the model on the meta device
    and receives its shards, so its resident memory grows by well under one fp32 copy (reading the checkpoint
    itself would cost a full copy on top of its shard), and both ranks hold exactly the checkpoint's weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    config = data.load_model("tiny").config
    tc = config.text_config
    tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_attention_heads = 1024, 3072, 9, 16
    tc.layer_types = ["full_attention"] * 9
    config.vision_config.out_hidden_size = 1024
    torch.manual_seed(0)
    big = Qwen2_5_VLForConditionalGeneration(config)
    n_params = sum(p.numel() for p in big.parameters())
    assert n_params >= 100e6
    big.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "load.py").write_text(LOAD_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "load.py"), str(tmp_path / "ckpt"), str(tmp_path), str(ROOT)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    copy = 4 * n_params
    grown = ranks[1]["after"] - ranks[1]["before"]
    assert grown < 0.75 * copy, (grown / copy)  # its half of the shards and some broadcast buffers, not a copy
    expected = {n: [p.double().sum().item(), p.double().square().sum().item()] for n, p in big.named_parameters()}
    for rank in ranks:
        assert rank["sums"].keys() == expected.keys()
        assert all(rank["sums"][n] == pytest.approx(expected[n], rel=1e-9) for n in expected)


RUN_SCRIPT = '''
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
import sft, data
import transformers.models.auto.processing_auto, transformers.image_processing_utils  # library imports (~3 s),
load, memory = data.load_sft_data, {}                                                 # the same in every launch

def measured(*args, **kwargs):  # the peak resident memory around the data loading alone
    memory["before"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    examples = load(*args, **kwargs)
    memory["after"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return examples
data.load_sft_data = measured
if __name__ == "__main__":  # the tokenizing workers import this file too (multiprocessing's forkserver)
    sft.main(sys.argv[3:])
    open(f"{sys.argv[2]}.rank{os.environ['RANK']}", "w").write(json.dumps(memory))
'''


def test_sft_data_is_tokenized_once_per_machine_and_mapped(tmp_path):
    """20,000 long OpenThoughts-schema rows, torchrun x 2: the first launch tokenizes (local rank 0, two worker
    processes) while rank 1 waits; the second launch maps the cache and reaches its first step (timed from
    sft.main's start; library imports excluded in both) in under 10% of the first's time; loading the set grows
    neither rank's resident memory by more than a quarter of the cache file (Python lists of the same tokens would
    be ~3x it; measured 9.4%: the index's per-row lists, ~3 MB, and a few MB of allocator arenas whatever the size,
    which put a tenth within 0.6 MB of failing by chance)."""
    import random
    rng = random.Random(0)
    words = "the of and to in is that for it as with on be by this are or from at which not have but all".split()

    def row(i):
        value = (f"<|begin_of_thought|>\n\n{' '.join(rng.choice(words) for _ in range(700))}\n\n<|end_of_thought|>"
                 f"\n\n<|begin_of_solution|>\n\n{2 * i + 1}\n\n<|end_of_solution|>")
        return {"system": "sys", "conversations": [{"from": "user", "value": f"Question {i}: {i} + {i + 1}?"},
                                                   {"from": "assistant", "value": value}]}
    rows = (json.dumps(row(i)) + "\n" for i in range(20000))
    source = tmp_path / "openthoughts.jsonl"
    source.write_text("".join(rows))
    (tmp_path / "run.py").write_text(RUN_SCRIPT)
    cache = data.sft_cache(str(source), data.load_processor("tiny"), 4096)

    def launch(name):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "run.py"), str(ROOT), str(tmp_path / name), "--model", "tiny", "--data", str(source),
               "--global-batch", "4", "--micro-batch", "2", "--max-steps", "1", "--out", str(tmp_path / name)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        first = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        return first["startup_s"], [json.loads((tmp_path / f"{name}.rank{k}").read_text()) for k in range(2)]
    try:
        cold, _ = launch("first")
        assert (cache / "meta.json").exists() and json.loads((cache / "meta.json").read_text())["examples"] == 20000
        warm, memory = launch("second")
        size = (cache / "tokens.bin").stat().st_size
        assert size > 50e6  # long rows: ~1,500 tokens each
        print(f"startup cold {cold:.2f} s, warm {warm:.2f} s, cache {size / 1e6:.0f} MB")
        assert warm < 0.1 * cold, (warm, cold)
        print("data RSS growth per rank (MB):", [(r["after"] - r["before"]) / 1e6 for r in memory])
        for rank in memory:
            assert rank["after"] - rank["before"] < 0.25 * size, (rank["after"] - rank["before"]) / size
    finally:
        import shutil
        shutil.rmtree(cache, ignore_errors=True)


def test_two_nodes_give_the_same_step_as_one_process(tmp_path):
    """Two 'nodes' on one machine (torchrun --nnodes 2, one process each, started separately, meeting at a c10d
    rendezvous): LOCAL_RANK is 0 on both, data and writes follow the global rank, and the result is the one
    process's."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = [*ARGS, "--micro-batch", "4", "--max-steps", "2"]
    one = run([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(k),
                               "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
                               "--rdzv-id", "two-nodes", "sft.py", *args, "--out", str(tmp_path / "two")],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for k in range(2)]
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), errors[0][-2000:] + errors[1][-2000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_curves_svg_is_well_formed_and_plots_the_metrics(sft_tiny):
    """curves.svg beside metrics.jsonl: valid XML; each line carries the logged values and is drawn where they
    are (a larger value is higher on the page); ticks are labelled."""
    import xml.etree.ElementTree as ET
    path, metrics = sft_tiny
    svg = ET.parse(str(Path(path).parent / "curves.svg")).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    lines = {p.get("data-label"): p for p in svg.iter(ns + "polyline")}
    assert set(lines) == {"loss", "lr", "tokens_per_s", "grad_norm"}
    loss = lines["loss"]
    assert [float(v) for v in loss.get("data-y").split(",")] == [m["loss"] for m in metrics]
    assert [int(v) for v in loss.get("data-x").split(",")] == [m["step"] for m in metrics]
    ys = [float(p.split(",")[1]) for p in loss.get("points").split()]
    xs = [float(p.split(",")[0]) for p in loss.get("points").split()]
    values = [m["loss"] for m in metrics]
    assert xs == sorted(xs) and len(ys) == len(values)
    for a, b in [(0, len(values) - 1), (0, len(values) // 2)]:  # page y grows downwards
        assert (ys[a] < ys[b]) == (values[a] > values[b])
    texts = [t.text for t in svg.iter(ns + "text")]
    assert "loss" in texts and "step" in texts and any(t == "0" for t in texts)


def test_nice_ticks_by_hand():
    assert charts.nice_ticks(0, 7) == [0, 2, 4, 6, 8]
    assert charts.nice_ticks(0.001, 0.0049) == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.005])
    assert charts.nice_ticks(3, 3) == [1, 2, 3, 4, 5]  # a flat series still gets an axis


# ----------------------------------------------------------------------------------------------------
# Rows with images: chat rows ({"messages", "images"}), loss on the reply, the same step on any number of ranks

def image_rows(tmp_path):
    """Two chat rows with an image each and two text rows, lengths chosen so that with a global batch of 4 and
    micro-batch 1 on 2 ranks, rank 0 gets both image rows and rank 1 none (checked below, not assumed)."""
    from PIL import Image, ImageDraw
    rows = []
    for k in range(2):
        picture = Image.new("RGB", (56 + 28 * k, 28), "white")
        ImageDraw.Draw(picture).text((2, 8), "12+3"[:2 * k + 1], fill="black")
        picture.save(tmp_path / f"{k}.png")
        rows.append({"messages": [{"role": "user", "content": "Read <image 1>."},
                                  {"role": "assistant", "content": "12+3"[:2 * k + 1]}], "images": [f"{k}.png"]})
        rows.append({"messages": [{"role": "user", "content": "What is " + "1" * (12 * k + 9) + "?"},
                                  {"role": "assistant", "content": "x" * (k + 1)}]})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_image_rows_train_the_same_on_two_ranks_as_on_one(tmp_path, processor):
    """A rank whose micro-batches hold no image still runs the vision tower (a blank, label-free row), so FSDP's
    collectives line up; the step equals one process's, vision weights included, and --train-vision moves them."""
    path = image_rows(tmp_path)
    examples = data.load_sft_data(str(path), processor)
    batch = sft.epoch_batches(examples.lengths, 4, 1, 0, 0)[0]
    shares = [[i for mb in sft.micro_batches(batch, examples.lengths, 1, r, 2) for i in mb] for r in (0, 1)]
    assert sorted(examples.images) == sorted(shares[0]) and not set(examples.images) & set(shares[1])
    common = ["--model", "tiny", "--data", str(path), "--global-batch", "4", "--micro-batch", "1", "--epochs", "3",
              "--lr", "1e-3", "--train-vision"]
    for name, nproc in (("one", 1), ("two", 2)):
        r = run([*common, "--out", str(tmp_path / name)], nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one, two, before = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final"), weights(
        data.resolve_model("tiny"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert max((one[k] - before[k]).abs().max().item() for k in one if ".visual." in k) > 1e-4


def test_freeze_text_trains_the_vision_tower_alone(tmp_path):
    """--freeze-text with --train-vision (LLaVA's alignment stage): every language-model weight, embeddings and head
    included, is bit-for-bit the one loaded, the vision tower's moved; alone it is refused before anything runs."""
    path = image_rows(tmp_path)
    common = ["--model", "tiny", "--data", str(path), "--global-batch", "4", "--micro-batch", "4", "--epochs", "2",
              "--lr", "1e-3", "--freeze-text"]
    r = run([*common, "--out", str(tmp_path / "refused")])
    assert r.returncode == 1 and "leaves nothing to train" in r.stderr and not (tmp_path / "refused").exists()
    r = run([*common, "--train-vision", "--out", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr[-3000:]
    after, before = weights(tmp_path / "out" / "final"), weights(data.resolve_model("tiny"))
    assert all(torch.equal(after[k], before[k]) for k in after if ".visual." not in k)
    assert max((after[k] - before[k]).abs().max().item() for k in after if ".visual." in k) > 1e-4


def test_freeze_embeddings_and_layers_keep_their_weights_on_two_ranks(tmp_path):
    """--freeze-embeddings --freeze-layers 1 under FSDP (2 ranks, gloo): the input embedding table and decoder layer 0
    are bit-for-bit the ones loaded, while layer 1 and the LM head, sharded in the same groups, still learn; a
    --freeze-layers beyond the model's 2 layers is refused in one line before anything is written."""
    r = run([*ARGS, "--micro-batch", "4", "--max-steps", "3", "--freeze-embeddings", "--freeze-layers", "1",
             "--out", str(tmp_path / "out")], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    after, before = weights(tmp_path / "out" / "final"), weights(data.resolve_model("tiny"))
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert not any(k.endswith("embed_tokens.weight") or ".layers.0." in k for k in moved)
    assert {"lm_head.weight", "layers.1.self_attn.q_proj.weight"} <= {k.split("language_model.")[-1] for k in moved}
    with pytest.raises(data.DataError, match="--freeze-layers 3: the model has 2 decoder layers"):
        sft.main([*ARGS, "--micro-batch", "8", "--freeze-layers", "3", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()


def test_an_image_rows_labels_cover_the_reply_and_its_image_tokens_match_the_processor(tmp_path, processor):
    path = image_rows(tmp_path)
    row = json.loads(path.read_text().splitlines()[2])
    ex = data.sft_example(*data.parse_sft_row(row), processor, 4096, row["images"], data.sft_template(row), tmp_path)
    from PIL import Image
    prompt = processor.apply_chat_template([data.user_message("Read <image 1>.", [Image.open(tmp_path / "1.png")])],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)
    n = len(prompt["input_ids"][0])  # the processor's own expansion of the image into patch tokens
    assert ex["input_ids"][:n] == list(prompt["input_ids"][0]) and all(l == -100 for l in ex["labels"][:n])
    assert processor.tokenizer.decode(ex["labels"][n:]) == "12+<|im_end|>"  # the second image row: "12+3"[:3]
    assert ex["images"] == [str(tmp_path / "1.png")]
    with pytest.raises(ValueError, match="exactly one user turn"):
        data.parse_sft_row({"messages": [{"role": "assistant", "content": "x"}]})


def test_a_non_finite_step_is_refused_and_nothing_saved(tmp_path, monkeypatch, capsys):
    from conftest import cli_error
    real = sft.token_loss_sum
    monkeypatch.setattr(sft, "token_loss_sum", lambda *a, **k: real(*a, **k) * float("inf"))
    status, lines = cli_error(sft.main, [*ARGS, "--micro-batch", "8", "--max-steps", "2", "--out", str(tmp_path)],
                              capsys)
    assert status == 1 and lines[-1].startswith("error: the gradient norm is nan: the update is refused")
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("step_*"))


def test_two_runs_started_into_one_out_leave_one_run(tmp_path):
    """Started together, one run writes --out and the other is refused in one line, whichever comes second (the
    lock, or the finished run it then finds): metrics.jsonl holds one run's steps, once."""
    argv = [sys.executable, "sft.py", *ARGS, "--micro-batch", "8", "--max-steps", "3", "--out", str(tmp_path / "o")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], [err[-500:] for _, err in results]
    refusal = next(err for code, err in results if code == 1).strip().splitlines()[-1]
    assert refusal.startswith(f"error: --out {tmp_path / 'o'} ")
    assert [m["step"] for m in losses_rows(tmp_path / "o")] == [1, 2, 3]


def losses_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ctrl_c_saves_a_resumable_checkpoint_like_sigterm(tmp_path):
    import signal
    code, err = stopped_after_two_steps(tmp_path, signal.SIGINT)  # Ctrl-C
    assert code == 0 and "Traceback" not in err, err[-2000:]
    last = max(tmp_path.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    assert f"saved {last}; continue with --resume {last}" in err
    assert json.loads((last / "train_state.json").read_text())["step"] == len(losses(tmp_path))


# ----------------------------------------------------------------------------------------------------
# A newcomer's inputs: bad images, a finished run resumed, another world size, SIGTERM under torchrun

def test_a_bad_image_costs_its_row_not_the_run(tmp_path):
    """Two image rows whose images are missing and truncated among four good rows: the run trains on the four,
    and the line the user reads names the first bad file (it used to stop with FileNotFoundError or PIL's
    "image file is truncated", naming no file)."""
    from PIL import Image
    path = image_rows(tmp_path)
    Image.effect_noise((64, 64), 60).convert("RGB").save(tmp_path / "noise.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "noise.png").read_bytes()[:3000])
    bad = [{"messages": [{"role": "user", "content": "Read <image 1>."}, {"role": "assistant", "content": "1"}],
            "images": [name]} for name in ("gone.png", "cut.png")]
    path.write_text(path.read_text() + "".join(json.dumps(r) + "\n" for r in bad))
    r = run(["--model", "tiny", "--data", str(path), "--global-batch", "2", "--micro-batch", "1", "--max-steps", "2",
             "--train-vision", "--out", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"sft data: skipped 2 of 6 malformed rows (first: ValueError: image {tmp_path / 'gone.png'} is missing)"
            in r.stderr.splitlines())
    assert (tmp_path / "o" / "final" / "config.json").exists()


def test_a_finished_run_is_not_trained_again_by_a_resume(tmp_path, capsys):
    """--resume out/step_2 of a run whose final/ exists would train steps 3-4 again and replace final/: refused,
    nothing written, unless --overwrite. Resuming from final/ itself (to train longer) stays allowed."""
    out = tmp_path / "run"
    common = [*ARGS, "--micro-batch", "4", "--save-every", "2", "--max-steps", "4", "--keep", "0", "--out", str(out)]
    sft.main(common)
    before, _ = snapshot(out), capsys.readouterr()
    status, lines = cli_error(sft.main, [*common, "--resume", str(out / "step_2")], capsys)
    assert (status, lines[-1]) == (1, f"error: --out {out} holds a finished run (final/): resuming it from "
                                      f"{out / 'step_2'} would train again and replace final/; pass --overwrite to do "
                                      f"so, or give another --out")
    assert not [line for line in lines if line.startswith(("sft:", "Loading"))]  # refused before anything loads
    assert snapshot(out) == before
    sft.main([*common, "--resume", str(out / "step_2"), "--overwrite"])
    assert json.loads((out / "final" / "train_state.json").read_text())["step"] == 4
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]


def test_a_resume_on_another_number_of_ranks_says_what_it_changes(tmp_path):
    """A 2-rank run's step 2 resumed in one process to step 3, whose checkpoint (world 1: no generator state for
    rank 1) is resumed on 2 ranks to step 4. Each resume says so, and the chain ends within float rounding of the
    uninterrupted run: the data order does not depend on the number of ranks (the global batches are dealt out
    after they are drawn), only the order of sums does."""
    common = [*ARGS, "--micro-batch", "2", "--save-every", "1", "--keep", "0"]
    straight, one, two = tmp_path / "straight", tmp_path / "one", tmp_path / "two"
    for out, nproc, extra in ((straight, 2, ["--max-steps", "4"]),
                              (one, 1, ["--max-steps", "3", "--final-state", "--resume", str(straight / "step_2")]),
                              (two, 2, ["--max-steps", "4", "--resume", str(one / "final")])):
        r = run([*common, *extra, "--out", str(out)], nproc)
        assert r.returncode == 0, r.stderr[-2000:]
        if out != straight:
            saved, now = (2, 1) if out == one else (1, 2)
            assert (f"resuming a run of {saved} rank(s) on {now}: the data order and the rollout seeds do not "
                    f"depend on the number of ranks" in r.stderr)
    assert losses(one) + losses(two) == pytest.approx(losses(straight)[2:], rel=1e-5)  # steps 3 and 4
    a, b = weights(straight / "final"), weights(two / "final")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def children(pid):
    """The processes torchrun started (its ranks)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_sigterm_under_torchrun_saves_and_tells_a_wrapper_by_exit_status(tmp_path):
    """SIGTERM to the ranks alone: each saves at the end of the step and exits 0, so torchrun exits 0. SIGTERM to
    torchrun (what a scheduler sends every process of a preempted job): torchrun passes it to the ranks, which
    save in the same way, and then exits 1 with its own SignalException, whatever its ranks did (its agent
    re-raises the signal it got). Either way step_N is whole and the resume command is printed."""
    import signal
    import time
    for target, status in (("ranks", 0), ("torchrun", 1)):
        out = tmp_path / target
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "sft.py", *ARGS, "--micro-batch", "2", "--max-steps", "400", "--out", str(out)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        for pid in (children(proc.pid) if target == "ranks" else [proc.pid]):
            os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == status, err[-2000:]
        assert ("SignalException: Process" in err and "got signal: 15" in err) == (target == "torchrun")
        last = runs_of(out)[-1]
        assert f"saved {last}; continue with --resume {last}" in err
        assert json.loads((last / "train_state.json").read_text())["step"] == len(losses(out)) < 400
        assert {p.name for p in last.iterdir()} >= {"config.json", "train_state", "rng_0.pt", "rng_1.pt"}
        assert not list(out.glob(".*tmp"))


def runs_of(out):
    return sorted(out.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
