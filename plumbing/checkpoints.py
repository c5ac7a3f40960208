"""Checkpoints: a Hugging Face model directory that from_pretrained loads, plus the sharded training state to resume
from; written aside and renamed into place, so a crash never leaves half of one under its final name."""
import contextlib
import json
import os
import random
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm import tqdm
from transformers.utils import logging

from plumbing.distributed import barrier, full_state_dict
from plumbing.runs import settings, step_dirs


def atomic_dir(final):
    """A temporary sibling directory; `commit(tmp, final)` renames it into place, so readers never see half."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return final.parent / f".{final.name}.tmp"


def commit(tmp, final):
    final = Path(final)
    old = final.parent / f".{final.name}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def quiet_dcp():
    """torch.distributed.checkpoint warns when it runs without a process group; a world of one is a fine user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(model, optimizer, processor, path, state, rank, resumable=True):
    """An HF directory (config, sharded safetensors, processor) that from_pretrained loads, plus, if `resumable`,
    the training state in `train_state/` (torch.distributed.checkpoint). Written aside, then renamed."""
    tmp = atomic_dir(path)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    weights = full_state_dict(model)
    if rank == 0:
        logging.disable_progress_bar()  # no "saving shards" bar for every checkpoint a run writes
        model.save_pretrained(tmp, state_dict=weights, max_shard_size="2GB")
        processor.save_pretrained(tmp)
        (tmp / "train_state.json").write_text(json.dumps(state, indent=1))
    if resumable:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with quiet_dcp():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "train_state"))
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / f"rng_{rank}.pt")
    barrier()
    if rank == 0:
        commit(tmp, path)
    barrier()


def load_checkpoint(model, optimizer, path, rank, world):
    """Restore model, optimizer and RNG from save_checkpoint(); returns the saved `state` dict. The sharded state
    loads on any number of ranks (torch.distributed.checkpoint reshards it)."""
    path = Path(path)
    state = json.loads((path / "train_state.json").read_text())
    saved = state.get("world", world)
    if saved != world and rank == 0:
        print(f"resuming a run of {saved} rank(s) on {world}: the data order and the rollout seeds do not depend on "
              f"the number of ranks, so the run goes on as it would have; only sums over ranks are taken in another "
              f"order, so the weights follow an uninterrupted run to float rounding, not bit for bit", file=sys.stderr)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    bundle = {"model": model_sd, "optim": optim_sd}
    with quiet_dcp():
        dcp.load(bundle, checkpoint_id=str(path / "train_state"))
    set_state_dict(model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optim"])
    # a rank the saved run did not have takes rank 0's generators: every sampler in the method is seeded on its
    # own (data order, rollouts), so the global ones carry nothing a rank needs for itself
    rng = torch.load(path / f"rng_{rank if rank < saved else 0}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state


def prune_checkpoints(out, keep):
    """Keep the newest `keep` step_N checkpoints (0: all); called once a newer one is safely in place, so the
    checkpoint a run resumed from survives until `keep` newer ones exist. `final` is never pruned."""
    for old in step_dirs(out)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)


def save_if_due(preempt, model, optimizer, processor, args, step, total, rank, due=False):
    """Save at the last step, when `due` (epoch end, --save-every) or on SIGTERM; True means stop now. A preempted
    run exits 0 after its save (torchrun counts anything else as a crash): it is finished when --out/final
    exists, and otherwise continues with the --resume printed here."""
    stop = preempt.check()
    if stop or due or step == total:
        final = step == total and not stop
        path = Path(args.out) / ("final" if final else f"step_{step}")
        # final holds the weights alone (the optimizer state is twice their size) unless --final-state
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        save_checkpoint(model, optimizer, processor, path, {"step": step, "world": world, "args": settings(args)},
                        rank, resumable=not final or args.final_state)
        if rank == 0:
            prune_checkpoints(Path(args.out), args.keep)
            tqdm.write(f"saved {path}" + (f"; continue with --resume {path}" if stop else ""), file=sys.stderr)
    return stop
