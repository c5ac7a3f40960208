"""Shared fixtures: the tiny Qwen2.5-VL checkpoint (built once per machine, read through from_pretrained)."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_path():
    import data
    return data.resolve_model("tiny")


@pytest.fixture(scope="session")
def processor(tiny_path):
    import data
    return data.load_processor(tiny_path)


@pytest.fixture()
def model(tiny_path):
    import data
    return data.load_model(tiny_path).eval()


@pytest.fixture(scope="session")
def sft_tiny(tmp_path_factory):
    """The tiny model SFT'd on the toy task: in ~20 s of CPU it learns the <think>/<answer> format and gets the
    sum right about 1 time in 4 when sampled at temperature 1, which leaves GRPO something to learn."""
    import json
    import sft
    out = tmp_path_factory.mktemp("sft_tiny")
    sft.main(["--model", "tiny", "--data", "toy", "--out", str(out)])  # the toy preset: the README's demo
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return str(out / "final"), metrics


@pytest.fixture()
def broken(tmp_path, tiny_path):
    """Inputs a user gets wrong: a model directory whose weight file was cut short, one whose config.json is not
    JSON, a path that does not exist, and a file where a directory belongs."""
    import shutil
    from types import SimpleNamespace
    truncated, bad_config = tmp_path / "truncated", tmp_path / "bad_config"
    shutil.copytree(tiny_path, truncated)
    shutil.copytree(tiny_path, bad_config)
    weights = truncated / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    (bad_config / "config.json").write_text('{"model_type": "qwen2_5_vl",')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return SimpleNamespace(truncated=truncated, size=size, bad_config=bad_config, missing=tmp_path / "nope",
                           file=a_file)


def snapshot(path):
    """Every file under `path` with its size and modification time (None if there is no such path)."""
    path = Path(path)
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def cli_error(main, argv, capsys):
    """Run a script's main as its command line does (plumbing.cli.cli): (exit status, stderr lines). sys.exit(message)
    prints the message to stderr and exits with status 1, so it is appended after what was printed before."""
    from plumbing.cli import cli
    with pytest.raises(SystemExit) as exc:
        cli(lambda: main(argv))
    code = exc.value.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return (1, lines + [code]) if isinstance(code, str) else (code, lines)


# A script run as its command line runs it, each process recording at interpreter exit whether its process group
# is still alive. One left alive aborts the teardown about one exit in eight (gloo, SIGABRT after the results are
# written: plumbing.cli.cli), so an exit status alone passes by luck; this record does not.
EXIT_PROBE = """
import atexit, os, runpy, sys
if __name__ == "__main__":  # worker processes (forkserver) import this file again: they must not rerun it
    script, record = sys.argv[1], sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    sys.path.insert(0, os.getcwd())

    def at_exit():
        import torch.distributed as dist
        with open(f"{record}.rank{os.environ.get('RANK', '0')}", "w") as f:
            f.write("alive" if dist.is_available() and dist.is_initialized() else "destroyed")
    atexit.register(at_exit)
    runpy.run_path(script, run_name="__main__")
"""


def torchrun(script, args, nproc=2, timeout=300, env=None):
    """`torchrun --standalone --nproc_per_node nproc script args` (plain `python` for 1), from the repository root:
    (the CompletedProcess, {rank: "alive" or "destroyed"}: each rank's process group at interpreter exit). One thread
    a process, as torchrun gives its ranks, so one process and two ranks sum alike; `env` may say otherwise."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    with tempfile.TemporaryDirectory(prefix="exit-probe-") as probe_dir:  # gone afterwards, whatever happened
        probe_dir = Path(probe_dir)
        (probe_dir / "probe.py").write_text(EXIT_PROBE)
        r = subprocess.run([*launcher, str(probe_dir / "probe.py"), script, str(probe_dir / "pg"), *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        at_exit = {int(f.suffix[5:]): f.read_text() for f in probe_dir.glob("pg.rank*")}
    return r, at_exit
