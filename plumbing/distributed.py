"""Processes, collectives and sharded tensors; parking device memory in host memory (grpo.py --offload)."""
import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict


def setup_distributed():
    """(rank, world, device). torchrun sets WORLD_SIZE; plain `python` starts a process group of one, so one device
    runs exactly the code that N devices run (FSDP2, its bf16 mixed precision, the checkpoints)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:  # an in-process store: a world of one needs no address or port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def shard(items, rank, world):
    """This rank's share of a list: every world-th item, starting at its rank (each item on exactly one rank)."""
    return items[rank::world]


def finish():
    """The end of a run under torchrun (plumbing.cli.cli calls it however main() ends). A world of one started in
    this process stays up: what the run returns (an FSDP model) still computes, and the next run in the same
    process reuses the group."""
    if dist.is_initialized() and "WORLD_SIZE" in os.environ:
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x):
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def any_rank(flag, device):
    """True on every rank if `flag` is true on any of them (collective)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item())


def all_reduce_dict(values, device, op="sum"):
    """Named numbers summed (or maxed) over ranks in one collective; the names come back with them."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def full_tensor(t):
    """The whole of a tensor: all-gathered if FSDP sharded it (a DTensor), as is otherwise (collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local_tensor(t):
    """This rank's part of a tensor: its shard if FSDP sharded it, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def clip_grad_norm(params, max_norm):
    """The global gradient norm, clipped to max_norm (0: measured only), as a float on every rank."""
    return float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))))


def full_state_dict(model):
    """The unsharded weights, on CPU, on every rank (collective: all ranks must call it)."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------------------------------
# Device memory parked in host memory: storages resized to 0 and refilled in place, so the tensor objects (and
# FSDP's and the optimizer's references to them) stay valid

def offload(tensors, host="cpu", keep=True):
    """Copy the bytes behind `tensors` to host memory and free them on the device (resize the storage to 0).
    keep=False: free them without a copy (their contents are about to be overwritten)."""
    saved, seen = [], set()
    for t in tensors:
        local = local_tensor(t)
        storage = local.untyped_storage()
        if storage._cdata in seen or storage.nbytes() == 0 or not storage.resizable():
            continue  # not resizable: e.g. CPU weights still mapped from the checkpoint file (nothing to gain)
        seen.add(storage._cdata)
        as_bytes = torch.empty(0, dtype=torch.uint8, device=local.device).set_(storage)
        saved.append((storage, storage.nbytes(), as_bytes.to(host, copy=True) if keep else None))
        storage.resize_(0)
    return saved


def reload(saved):
    """Inverse of offload(): the storages their size again, and (if they were kept) their bytes."""
    for storage, nbytes, host in saved:
        storage.resize_(nbytes)
        if host is not None:
            torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).copy_(host)


@contextlib.contextmanager
def parked(tensors, enabled=True, host="cpu", keep=True):
    """`with parked(tensors):` the tensors' device memory waits in host memory for the block's duration; with
    keep=False it is freed and given back unfilled (for weights the block's end overwrites anyway)."""
    saved = offload(tensors, host, keep) if enabled else []
    try:
        yield
    finally:
        reload(saved)


def optimizer_state(optimizer):
    """The optimizer's state tensors (AdamW's moments), which are as large as the trained weights."""
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim()]
