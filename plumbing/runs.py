"""Run directories: flags, checks, the lock, args.json, preemption, metrics.jsonl, timing and MFU.

A run directory is never overwritten by accident and a resume continues the same run: its settings are recorded
(args.json, and in every checkpoint: plumbing/checkpoints.py) and compared on --resume.
"""
import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import transformers

from plumbing.charts import svg_lines
from plumbing.cli import DataError, Refused, passed_flags
from plumbing.distributed import any_rank, barrier

# The run-directory flags themselves may differ on --resume; each stage adds its own (those that change nothing
# the run computes, e.g. --micro-batch) when it calls check_run_dir.
RUN_FLAGS = {"resume", "out", "overwrite", "allow_changes", "final_state"}


def parse(ap, argv):
    """Add the run-directory flags (the same for every training stage), then parse; `passed` records which flags
    were given, so a preset fills in only the others."""
    ap.add_argument("--final-state", action="store_true", help="final also keeps the optimizer state (to continue)")
    # run directory
    ap.add_argument("--resume", default=None, help="continue from this checkpoint (a step_N directory)")
    ap.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    ap.add_argument("--allow-changes", action="store_true", help="--resume even if settings differ from the run's")
    args = ap.parse_args(argv)
    args.passed = passed_flags(ap, argv)
    return args


def settings(args):
    """The run's settings as JSON has them (tuples become lists), without the bookkeeping of which were passed."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k != "passed"}))


def step_dirs(out):
    """The step_N checkpoints in `out`, oldest first."""
    return sorted(Path(out).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))


def check_run_dir(args, may_change=()):
    """Before anything loads: a new run needs --out empty or absent (or --overwrite) and writable; --resume needs
    a checkpoint of this script whose recorded settings match, but for `may_change` (or --allow-changes)."""
    out = Path(args.out)
    check_writable(out, "--out")
    if args.resume:
        state = Path(args.resume) / "train_state.json"
        if not state.exists():
            raise DataError(f"--resume {args.resume}: not a checkpoint of this script (no train_state.json)")
        if not (Path(args.resume) / "train_state").is_dir():
            raise DataError(f"--resume {args.resume}: holds the weights alone, no optimizer state (a final "
                            f"checkpoint keeps it with --final-state)")
        recorded, now = json.loads(state.read_text()).get("args", {}), settings(args)
        changed = [f"--{k.replace('_', '-')} {recorded[k]} -> {v}" for k, v in now.items()
                   if k in recorded and k not in RUN_FLAGS | set(may_change) and recorded[k] != v]
        if changed and not args.allow_changes:
            raise DataError(f"--resume with other settings than the run's: {', '.join(changed)}; "
                            f"pass --allow-changes to continue anyway")
        if changed:
            print(f"resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
        final = out / "final"
        if final.exists() and final.resolve() != Path(args.resume).resolve() and not args.overwrite:
            raise DataError(f"--out {out} holds a finished run (final/): resuming it from {args.resume} would train "
                            f"again and replace final/; pass --overwrite to do so, or give another --out")
    elif out.is_dir() and any(out.iterdir()) and not args.overwrite:
        saved = step_dirs(out) + sorted(out.glob("final"))
        hint = f"continue it with --resume {saved[-1]}, or " if saved and not (out / "final").exists() else ""
        raise DataError(f"--out {out} already holds a run; {hint}pass --overwrite to replace it, or choose "
                        f"another --out")


@contextlib.contextmanager
def locked(out, rank, device, recheck=None):
    """`with locked(out, ...)`: the run owns --out. Rank 0 takes an exclusive lock on the directory (created if
    need be) for the block's duration, so a second run into it is refused; the kernel drops the lock when the
    process ends, however it ends, so a killed run never blocks a --resume. `recheck()` runs once the lock is held:
    a run that started in between may have written to --out since the first look."""
    fd, error = None, None
    if rank == 0:
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
            fd = os.open(out, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if recheck:
                recheck()
        except BlockingIOError:
            error = DataError(f"--out {out} is in use by another run (it holds the directory's lock)")
        except DataError as e:
            error = e
        except OSError as e:
            error = DataError(f"cannot write to --out {out}: {e.strerror}")
    if any_rank(error is not None, device):  # every rank stops, none waits alone
        if fd is not None:
            os.close(fd)
        raise error or DataError(f"--out {out}: rank 0 could not lock it")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def check_writable(out, flag):
    """A directory that is there and writable, or can be made below one that is."""
    if Path(out).exists() and not Path(out).is_dir():
        raise DataError(f"{flag} {out} is a file, not a directory")
    existing = next(p for p in [Path(out), *Path(out).parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"cannot write to {flag} {out}: {existing} is not a writable directory")


def start_run(args, stage, rank, world, resumed_step=None):
    """Once model and data have loaded: create --out (emptied first with --overwrite), record the run's settings
    and library versions in args.json, and after a resume drop the metrics of steps past the checkpoint."""
    out = Path(args.out)
    try:
        if rank == 0:
            if args.overwrite and not args.resume and out.exists():  # its contents: the directory holds the lock
                for child in out.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            out.mkdir(parents=True, exist_ok=True)
            record = {"stage": stage, "args": settings(args), "world": world,
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                   "transformers": transformers.__version__}}
            if resumed_step is not None and (out / "args.json").exists():
                record = json.loads((out / "args.json").read_text())
                record.setdefault("resumes", []).append({"from": args.resume, "step": resumed_step,
                                                         "args": settings(args)})
            write_atomic(out / "args.json", json.dumps(record, indent=1))
            metrics = out / "metrics.jsonl"
            if resumed_step is not None and metrics.exists():  # steps after the checkpoint will be run again
                rows = [line for line in metrics.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
                write_atomic(metrics, "".join(row + "\n" for row in rows))
        barrier()
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write to --out {out}: {e.strerror}") from e


def write_atomic(path, text):
    """Write aside, then rename: a reader never sees half a file."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Preemption:
    """SIGTERM (cluster preemption) or Ctrl-C sets a flag; the loop saves at the end of the step and exits cleanly.
    A second Ctrl-C stops at once, without saving."""

    def __init__(self, device):
        self.requested, self.device = False, device
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGTERM, signal.SIGINT)}

    def request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
            print("\nCtrl-C: saving at the end of this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def check(self):
        return any_rank(self.requested, self.device)  # every rank must agree to stop at the same step

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

def refuse_non_finite(grad_norm):
    """Stop before an update that would write NaN or inf into the weights: a non-finite loss makes a non-finite
    gradient, and the norm is the same number on every rank, so all stop together and nothing is saved."""
    if not math.isfinite(grad_norm):
        raise Refused(f"the gradient norm is {grad_norm}: the update is refused and nothing is saved (a loss or "
                      f"gradient that is not finite; try a lower --lr)")


# ----------------------------------------------------------------------------------------------------
# What a run reports

class Metrics:
    """metrics.jsonl on rank 0, one JSON object per step, and curves.svg beside it: one line chart per panel,
    (title, [metric keys]), redrawn at most every 20 s and when the run ends."""

    def __init__(self, out, rank, panels, title):
        self.path, self.panels, self.title, self.drawn = Path(out), panels, title, 0.0
        self.rows = [json.loads(line) for line in (self.path / "metrics.jsonl").read_text().splitlines()] \
            if rank == 0 and (self.path / "metrics.jsonl").exists() else []  # a resumed run's earlier steps
        self.file = open(self.path / "metrics.jsonl", "a") if rank == 0 else None

    def log(self, **row):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            self.rows.append(row)
            if time.monotonic() - self.drawn > 20:
                self.draw()

    def draw(self):
        if self.file and self.rows:
            write_atomic(self.path / "curves.svg", svg_lines(self.rows, self.panels, self.title))
            self.drawn = time.monotonic()


class Stopwatch:
    """Seconds per phase of a step, as metrics: laps["sec_generate"] and so on."""

    def __init__(self):
        self.laps, self.t = {}, time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        self.laps[f"sec_{name}"], self.t = now - self.t, now


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per GPU (NVIDIA's data sheets)


def mfu(tokens_per_s_per_gpu, n_params, device):
    """Model FLOPs utilization: 6 * params FLOPs per trained token (forward + backward) over the GPU's peak."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return 6 * n_params * tokens_per_s_per_gpu / peak if peak else None
