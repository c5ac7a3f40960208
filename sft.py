"""Stage 1 of X-Reasoner: long chain-of-thought SFT of Qwen2.5-VL on text only, with FSDP2.

    torchrun --nproc_per_node 8 sft.py                             # the paper's run (appendix B.1)
    python sft.py --model tiny --data toy --out runs/sft           # the toy task on a CPU (a preset), ~20 s

The paper fine-tunes all language-model weights of Qwen2.5-VL-7B-Instruct on OpenThoughts-114k rewritten to
<think>...</think><answer>...</answer>, 4 epochs, AdamW lr 1e-5 decayed x0.8 per epoch, 128 sequences per
step. Reading order: distributed setup -> FSDP2 sharding -> data order -> the loss -> the training loop ->
checkpoints. `grpo.py` imports the plumbing from here (setup, sharding, checkpoints, metrics).

Memory (bench/bench_memory.py, 7B, 8 ranks, micro-batch 4 x 4,096): 27.5 GiB per GPU, so A100-40GB fits: rank 0
alone reads the checkpoint and scatters it into shards, the LM head runs in chunks of positions (never the
B x T x vocab logits), activation checkpointing is on for GPU, and every micro-batch's gradients are
reduce-scattered at once. The data is tokenized once per machine into a file every rank maps (data.SFTSet).

Deliberate simplifications: sequences are padded, not packed (length-grouped batches keep the padding small,
and the fraction is reported); the vision tower is frozen by default since text-only data gives it no
gradient; one optimizer, no ZeRO offload.
"""
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data


def parse_args(argv=None):
    ap = data.cli_parser(__doc__)
    # model and data
    ap.add_argument("--model", default=data.BASE_MODEL, help="hub id, local directory or `tiny` (default: the paper's)")
    ap.add_argument("--data", default=data.OPENTHOUGHTS, help="hub id, .json/.jsonl/.parquet, or `toy` (a CPU preset)")
    ap.add_argument("--out", default="runs/sft", help="run directory: checkpoints, metrics.jsonl, curves.svg")
    ap.add_argument("--max-len", type=int, default=4096, help="longer conversations are cut (counted) (B.1: 4,096)")
    # optimization (appendix B.1)
    ap.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (B.1: 1e-5)")
    ap.add_argument("--lr-decay", type=float, default=0.8, help="lr multiplied by this after each epoch (B.1: 0.8)")
    ap.add_argument("--warmup", type=float, default=0.0, help="fraction of steps of linear warm-up (B.1: none)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (B.1: 0.0)")
    ap.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas (B.1: 0.9, 0.999)")
    ap.add_argument("--epochs", type=int, default=4, help="passes over the data (B.1: 4)")
    ap.add_argument("--global-batch", type=int, default=128, help="sequences per step, all ranks (B.1: 4 x 32 GPUs)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward on one GPU (B.1: 4)")
    ap.add_argument("--grad-clip", type=float, default=0.0, help="gradient-norm clip; 0: off (B.1 lists none)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    ap.add_argument("--seed", type=int, default=0, help="data order (ours)")
    ap.add_argument("--window", type=int, default=16, help="length grouping: sort within this many batches (ours)")
    # systems (ours)
    ap.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto", help="activation checkpointing "
                    "(ours: on GPU)")
    ap.add_argument("--train-vision", action="store_true",
                    help="train the vision tower (ours: frozen; text gives it no signal)")
    ap.add_argument("--freeze-text", action="store_true", help="freeze the language model (embeddings, decoder, "
                    "head): with --train-vision only the vision tower learns, Qwen2-VL's first stage (ours)")
    ap.add_argument("--freeze-embeddings", action="store_true", help="freeze the input token embeddings "
                    "(ours: off; toy/miniature.py's small model keeps its images readable with it)")
    ap.add_argument("--save-every", type=int, default=0, help="save every N steps; 0: at each epoch's end (ours)")
    ap.add_argument("--keep", type=int, default=2, help="step/epoch checkpoints kept beside final; 0: all (ours)")
    return parse_run_flags(ap, argv)


def parse_run_flags(ap, argv):
    """The flags of the run directory, the same for both training stages (grpo.py ends its parser here), then
    the parse; `passed` records which flags were given, to tell a changed setting on --resume."""
    ap.add_argument("--final-state", action="store_true", help="final also keeps the optimizer state (to continue)")
    # run directory
    ap.add_argument("--resume", default=None, help="continue from this checkpoint (a step_N directory)")
    ap.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    ap.add_argument("--allow-changes", action="store_true", help="--resume even if settings differ from the run's")
    args = ap.parse_args(argv)
    args.passed = data.passed_flags(ap, argv)
    return args


# ====================================================================================================
# The method: data order, batches, the loss

def epoch_batches(lengths, global_batch, window, seed, epoch):
    """Global batches (lists of example indices) for one epoch: a seeded shuffle, then sorting inside windows
    of `window` global batches so each batch holds similar lengths, then the batch order shuffled again."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = global_batch * window
    batches = []
    for start in range(0, len(order) - global_batch + 1, span):
        chunk = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [chunk[i:i + global_batch] for i in range(0, len(chunk) - global_batch + 1, global_batch)]
    rng.shuffle(batches)
    return batches  # the tail that does not fill a global batch is left out of this epoch


def micro_batches(batch, lengths, micro, rank, world):
    """This rank's micro-batches of one global batch: sorted by length, dealt round-robin across ranks."""
    ordered = sorted(batch, key=lambda i: lengths[i])
    chunks = [ordered[i:i + micro] for i in range(0, len(ordered), micro)]
    return chunks[rank::world]


def collate(examples, pad_id, device):
    """input_ids, labels (-100 where no loss) and attention mask, each (B, L), right-padded to the longest."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)                  # (B, L)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)                 # (B, L)
    mask = torch.zeros(len(examples), width, dtype=torch.long)                          # (B, L)
    for i, e in enumerate(examples):  # right padding: training needs no generation column alignment
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.as_tensor(e["input_ids"]), torch.as_tensor(e["labels"]), 1
    return ids.to(device), labels.to(device), mask.to(device)


def image_inputs(model, processor, examples, ids, mask, device):
    """The vision half of a batch whose rows name images (data.sft_example recorded their paths): pixel values,
    patch grids, and the 3-D M-RoPE positions of the whole batch, computed here (never from the model's state)."""
    if not any(e["images"] for e in examples):
        return {}
    import generate
    pictures = [data.load_image(p) for e in examples for p in e["images"]]
    vision = processor.image_processor(images=pictures, return_tensors="pt")
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    batch = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == image_token).long(),
             "image_grid_thw": vision["image_grid_thw"].to(device)}
    positions, _ = generate.rope_positions(model, batch)                                   # (3, B, L)
    return {"pixel_values": vision["pixel_values"].to(device), "image_grid_thw": batch["image_grid_thw"],
            "position_ids": positions}


def blank_image_row(processor):
    """A row that is one small blank image and no label. Under FSDP every rank must run the vision tower as
    often as the others (its all-gathers and gradient reduce-scatters are collective): a micro-batch without
    images gets this row when others in the step have some. It adds nothing to the loss and zero gradients."""
    from PIL import Image
    blank = Image.new("RGB", (28, 28))
    grid = processor.image_processor(images=[blank], return_tensors="pt")["image_grid_thw"][0]  # after min_pixels
    pads = int(grid.prod()) // processor.image_processor.merge_size ** 2
    ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(
        ["<|vision_start|>", *["<|image_pad|>"] * pads, "<|vision_end|>"]))
    return {"input_ids": ids, "labels": torch.full_like(ids, -100), "images": [blank]}


def last_hidden(model, **inputs):
    """The final (normed) hidden states, (B, T, H), without the model's own B x T x vocab logits."""
    return model(**inputs, logits_to_keep=1, output_hidden_states=True, use_cache=False).hidden_states[-1]


def head_chunks(model, hidden, fn, chunk=1024):
    """fn(float32 logits of `chunk` rows of hidden (N, H), chunk index) for every chunk, each under activation
    checkpointing: neither forward nor backward ever holds more than one chunk's logits (all of them would be
    4 x 4,096 x 152,064 floats = 10 GB for a 7B micro-batch, and as much again for their gradient)."""
    from torch.utils.checkpoint import checkpoint
    return [checkpoint(lambda h, s: fn(model.lm_head(h).float(), s), hidden[s:s + chunk], slice(s, s + chunk),
                       use_reentrant=False) for s in range(0, hidden.shape[0], chunk)]


def token_loss_sum(model, ids, labels, mask, chunk=1024, **vision):
    """Sum (not mean) of next-token cross-entropy over assistant tokens; the caller divides by the global count.
    `vision`: image_inputs() for a batch with images."""
    hidden = last_hidden(model, input_ids=ids, attention_mask=mask, **vision)           # (B, L, H)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])                                    # (B*(L-1), H)
    y = labels[:, 1:].reshape(-1)                     # (B*(L-1),): position t predicts token t+1; -100: no loss
    cross_entropy = lambda logits, s: F.cross_entropy(logits, y[s], ignore_index=-100, reduction="sum")  # noqa: E731
    return sum(head_chunks(model, h, cross_entropy, chunk), hidden.new_zeros((), dtype=torch.float32))


# ====================================================================================================
# The loop

def main(argv=None):
    launched = time.perf_counter()
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    preset = ""
    if args.data == "toy":  # the toy task on a CPU in ~20 s: what the README demo and the tests use
        micro = max(1, 10 // world)
        preset = data.toy_preset(args, {"global_batch": micro * world, "micro_batch": micro, "epochs": 36,
                                        "lr": 3e-3, "lr_decay": 1.0, "save_every": 120})
    check_run_dir(args)
    data.check_model(args.model)
    if preset and rank == 0:
        print(preset, file=sys.stderr)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.freeze_text and not args.train_vision:
        raise data.DataError("--freeze-text without --train-vision leaves nothing to train")
    if args.global_batch % (args.micro_batch * world):
        raise data.DataError(f"--global-batch {args.global_batch} is not a multiple of --micro-batch "
                             f"{args.micro_batch} x {world} ranks")

    processor = data.load_processor(args.model)
    # Tokenized once per machine (local rank 0; the others wait), then mapped from disk by every rank.
    examples = data.load_sft_data(args.data, processor, args.max_len, build=int(os.environ.get("LOCAL_RANK", 0)) == 0,
                                  wait=lambda failed: any_rank(failed, device), report=rank == 0)
    if len(examples) < args.global_batch:
        raise data.DataError(f"{len(examples)} examples cannot fill one global batch of {args.global_batch}")
    checkpointing = args.checkpointing == "on" or (args.checkpointing == "auto" and device.type == "cuda")
    # fp32 master weights, read by rank 0 and scattered as shards; FSDP casts to bf16 for compute on GPU
    model = load_sharded(args.model, device, args.train_vision, checkpointing)
    if args.freeze_text:  # images are taught to speak the language model's input, which stays as it was
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    if args.freeze_embeddings:  # the vectors the vision tower learnt to imitate stay where they were
        model.get_input_embeddings().requires_grad_(False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)

    steps_per_epoch = len(epoch_batches(examples.lengths, args.global_batch, args.window, args.seed, 0))
    total = min(args.max_steps or steps_per_epoch * args.epochs, steps_per_epoch * args.epochs)
    state = load_checkpoint(model, optimizer, args.resume, rank) if args.resume else {"step": 0}
    start_run(args, "sft", rank, world, state["step"] if args.resume else None)
    metrics = Metrics(args.out, rank, [("loss", ["loss"]), ("learning rate", ["lr"]), ("tokens/s", ["tokens_per_s"]),
                                       ("gradient norm", ["grad_norm"])], f"sft.py --out {args.out}")
    preempt = Preemption(device)
    from tqdm import tqdm
    bar = tqdm(total=total, initial=state["step"], disable=rank != 0, desc="sft")
    step = state["step"]
    while step < total:
        epoch, index = divmod(step, steps_per_epoch)
        batch = epoch_batches(examples.lengths, args.global_batch, args.window, args.seed, epoch)[index]
        lr = args.lr * args.lr_decay ** epoch * min(1.0, (step + 1) / max(1, args.warmup * total))  # B.1: x0.8/epoch
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The loss is the mean over every assistant token of the global batch, whatever its split over ranks and
        # micro-batches. Every rank knows the whole batch, so the token count needs no communication.
        n_target = sum(examples.n_target[i] for i in batch)
        with_images = world > 1 and any(i in examples.images for i in batch)  # every rank knows the whole batch
        start, loss_sum, tokens, padded = time.perf_counter(), 0.0, 0, 0
        for mb in micro_batches(batch, examples.lengths, args.micro_batch, rank, world):
            rows = [examples[i] for i in mb]
            if with_images and not any(r["images"] for r in rows):
                rows.append(blank_image_row(processor))  # the vision tower runs on every rank alike
            ids, labels, mask = collate(rows, processor.tokenizer.pad_token_id, device)  # (B, L) each
            loss = token_loss_sum(model, ids, labels, mask, **image_inputs(model, processor, rows, ids, mask, device))
            # FSDP averages gradients over ranks, hence x world; each micro-batch's gradients are reduce-scattered
            # into the fp32 shards at once (deferring it would keep a full unsharded gradient: 30 GB for the 7B).
            (loss * world / n_target).backward()
            real = mask[:len(mb)]  # not the blank image row
            loss_sum, tokens, padded = loss_sum + loss.item(), tokens + int(real.sum()), padded + real.numel()
        grad_norm = clip_grad_norm(trainable, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        summed = all_reduce_dict({"loss": loss_sum, "tokens": tokens, "padded": padded}, device)
        seconds = time.perf_counter() - start
        row = {"step": step, "epoch": epoch, "loss": summed["loss"] / n_target, "lr": lr, "grad_norm": grad_norm,
               "tokens": int(summed["tokens"]), "tokens_per_s": summed["tokens"] / seconds,
               "padding": 1 - summed["tokens"] / summed["padded"]}
        # a sharded DTensor reports its full size, so this counts the whole model's trainable parameters
        row["mfu"] = mfu(row["tokens_per_s"] / world, sum(p.numel() for p in trainable), device)
        if launched:  # the first step of this launch: how long data and model took to get here
            row["startup_s"], launched = start - launched, None
        metrics.log(**row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.1e}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        due = step % (args.save_every or steps_per_epoch) == 0
        if save_if_due(preempt, model, optimizer, processor, args, step, total, rank, due):
            break
    bar.close()
    metrics.draw()
    finish()
    return model


# ====================================================================================================
# Plumbing, shared with grpo.py: processes and sharding, checkpoints, run directories, metrics and charts

def setup_distributed():
    """(rank, world, device). torchrun sets WORLD_SIZE; plain `python` runs as a world of one."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def all_reduce_sum(x):
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def any_rank(flag, device):
    """True on every rank if `flag` is true on any of them (collective)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item())


def barrier():
    if dist.is_initialized():
        dist.barrier()


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


class Stopwatch:
    """Seconds per phase of a step, as metrics: laps["sec_generate"] and so on."""

    def __init__(self):
        self.laps, self.t = {}, time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        self.laps[f"sec_{name}"], self.t = now - self.t, now


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model, device, train_vision=False, checkpointing=False, bf16=None, mesh=None):
    """FSDP2: one unit per decoder layer and per vision block, then the root; bf16 compute (default: on GPU)
    with fp32 gradient reduction. Parameters keep their dtype (fp32: the optimizer's master copy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    model.model.visual.requires_grad_(train_vision)
    if checkpointing:  # recompute each layer in backward: keep only its input
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not dist.is_initialized():
        return model.to(device)
    import warnings  # the root returns hidden_states views; nothing here writes to them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    bf16 = device.type == "cuda" if bf16 is None else bf16
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in [*model.model.visual.blocks, *model.model.language_model.layers]:
        fully_shard(block, mp_policy=policy, mesh=mesh)
    fully_shard(model, mp_policy=policy, mesh=mesh)
    return model


def load_sharded(name, device, train_vision=False, checkpointing=False, dtype=torch.float32, bf16=None):
    """The model, FSDP-sharded, read from disk by rank 0 alone: the other ranks build it on the meta device (no
    memory), then every tensor is scattered from rank 0 straight into its shards, one tensor at a time, so host
    memory holds one full copy (rank 0's), not one per rank."""
    if not dist.is_initialized():
        return shard_model(data.load_model(name, dtype, progress=True), device, train_vision, checkpointing, bf16)
    from torch.distributed.tensor import DTensor, distribute_tensor
    full = None
    if dist.get_rank() == 0:
        loaded = data.load_model(name, dtype, progress=True)
        full = {**loaded.state_dict(), **dict(loaded.named_buffers())}
        del loaded
    with torch.device("meta"):
        model = data.model_from_config(name, dtype)
    shard_model(model, device, train_vision, checkpointing, bf16)
    model.to_empty(device=device)
    with torch.no_grad():
        for key, target in [*model.state_dict().items(), *model.named_buffers()]:  # buffers: rotary inv_freq
            source = full[key].to(device) if full is not None else \
                torch.empty(target.shape, dtype=target.dtype, device=device)
            if isinstance(target, DTensor):  # rank 0's tensor, cut into the shards FSDP placed
                target.to_local().copy_(distribute_tensor(source, target.device_mesh, target.placements,
                                                          src_data_rank=0).to_local())
            else:
                dist.broadcast(source, src=0)
                target.copy_(source)
            del source
    if full is not None:
        full.clear()
    return model


def full_state_dict(model):
    """The unsharded weights, on CPU, on every rank (collective: all ranks must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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


def save_checkpoint(model, optimizer, processor, path, state, rank, resumable=True):
    """An HF directory (config, sharded safetensors, processor) that from_pretrained loads, plus, if `resumable`,
    the training state in `train_state/` (torch.distributed.checkpoint). Written aside, then renamed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp = atomic_dir(path)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    weights = full_state_dict(model)
    if rank == 0:
        data.transformers_progress(False)
        model.save_pretrained(tmp, state_dict=weights, max_shard_size="2GB")
        processor.save_pretrained(tmp)
        (tmp / "train_state.json").write_text(json.dumps(state, indent=1))
    if resumable:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        import warnings
        with warnings.catch_warnings():  # a world of one is a fine DCP user; no need to warn about it
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "train_state"))
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / f"rng_{rank}.pt")
    barrier()
    if rank == 0:
        commit(tmp, path)
    barrier()


def load_checkpoint(model, optimizer, path, rank):
    """Restore model, optimizer and RNG from save_checkpoint(); returns the saved `state` dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    bundle = {"model": model_sd, "optim": optim_sd}
    import warnings
    with warnings.catch_warnings():  # a world of one is a fine DCP user; no need to warn about it
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(bundle, checkpoint_id=str(path / "train_state"))
    set_state_dict(model, optimizer, model_state_dict=bundle["model"], optim_state_dict=bundle["optim"])
    rng = torch.load(path / f"rng_{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return json.loads((path / "train_state.json").read_text())


class Preemption:
    """SIGTERM (cluster preemption) sets a flag; the loop saves at the end of the step and exits cleanly."""

    def __init__(self, device):
        self.requested, self.device = False, device
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))

    def check(self):
        return any_rank(self.requested, self.device)  # every rank must agree to stop at the same step


def save_if_due(preempt, model, optimizer, processor, args, step, total, rank, due=False):
    """Save at the last step, when `due` (epoch end, --save-every) or on SIGTERM; True means stop now. A preempted
    run exits 0 after its save (torchrun counts anything else as a crash): it is finished when --out/final
    exists, and otherwise continues with the --resume printed here."""
    stop = preempt.check()
    if stop or due or step == total:
        final = step == total and not stop
        path = Path(args.out) / ("final" if final else f"step_{step}")
        # final holds the weights alone (the optimizer state is twice their size) unless --final-state
        save_checkpoint(model, optimizer, processor, path, {"step": step, "args": settings(args)}, rank,
                        resumable=not final or args.final_state)
        if rank == 0:
            prune_checkpoints(Path(args.out), args.keep)
            from tqdm import tqdm
            tqdm.write(f"saved {path}" + (f"; continue with --resume {path}" if stop else ""), file=sys.stderr)
    return stop


def prune_checkpoints(out, keep):
    """Keep the newest `keep` step_N checkpoints (0: all); called once a newer one is safely in place, so the
    checkpoint a run resumed from survives until `keep` newer ones exist. `final` is never pruned."""
    saved = sorted(out.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    for old in saved[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Run directories (shared with grpo.py): never overwritten by accident; a resume continues the same run

# Flags that may differ on --resume without changing what the run computes (ours)
RESUME_MAY_CHANGE = {"resume", "out", "overwrite", "allow_changes", "max_steps", "micro_batch", "save_every", "keep",
                     "final_state", "checkpointing", "reward_processes", "gen_batch", "offload"}


def settings(args):
    """The run's settings as JSON has them (tuples become lists), without the bookkeeping of which were passed."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k != "passed"}))


def check_run_dir(args):
    """Before anything loads: a new run needs --out empty or absent (or --overwrite) and writable; --resume needs
    a checkpoint of this script whose recorded settings match (or --allow-changes, which lists the changes)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise data.DataError(f"--out {out} is a file, not a directory")
    if args.resume:
        state = Path(args.resume) / "train_state.json"
        if not state.exists():
            raise data.DataError(f"--resume {args.resume}: not a checkpoint of this script (no train_state.json)")
        if not (Path(args.resume) / "train_state").is_dir():
            raise data.DataError(f"--resume {args.resume}: holds the weights alone, no optimizer state (a final "
                                 f"checkpoint keeps it with --final-state)")
        recorded, now = json.loads(state.read_text()).get("args", {}), settings(args)
        changed = [f"--{k.replace('_', '-')} {recorded[k]} -> {v}" for k, v in now.items()
                   if k in recorded and k not in RESUME_MAY_CHANGE and recorded[k] != v]
        if changed and not args.allow_changes:
            raise data.DataError(f"--resume with other settings than the run's: {', '.join(changed)}; "
                                 f"pass --allow-changes to continue anyway")
        if changed:
            print(f"resuming with changed settings: {', '.join(changed)}", file=sys.stderr)
    elif out.is_dir() and any(out.iterdir()) and not args.overwrite:
        saved = sorted(out.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) + sorted(out.glob("final"))
        hint = f"continue it with --resume {saved[-1]}, or " if saved and not (out / "final").exists() else ""
        raise data.DataError(f"--out {out} already holds a run; {hint}pass --overwrite to replace it, or choose "
                             f"another --out")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise data.DataError(f"cannot write to --out {out}: {existing} is not a writable directory")


def start_run(args, stage, rank, world, resumed_step=None):
    """Once model and data have loaded: create --out (emptied first with --overwrite), record the run's settings
    and library versions in args.json, and after a resume drop the metrics of steps past the checkpoint."""
    import transformers
    out = Path(args.out)
    try:
        if rank == 0:
            if args.overwrite and not args.resume and out.exists():
                shutil.rmtree(out)
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
        raise data.DataError(f"cannot write to --out {out}: {e.strerror}") from e


def write_atomic(path, text):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


# Dependency-free SVG charts (curves.svg of sft.py and grpo.py, evaluate.py's sampling bars)
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]


def nice_ticks(lo, hi, n=5):
    """About n round-numbered ticks covering [lo, hi]."""
    if hi - lo < 1e-12 * max(abs(lo), abs(hi), 1):
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    raw = (hi - lo) / n
    step = next(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 2.5, 5, 10)
                if m * 10 ** math.floor(math.log10(raw)) >= raw)
    first = math.floor(lo / step) * step
    return [first + k * step for k in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def svg_panel(x0, y0, w, h, title, xs, series, xlabel=None, bars=False):
    """One chart at (x0, y0): axes with ticks and labels, then `series` [(label, ys)] as lines, or as grouped
    bars over categorical xs. Each line/bar carries its raw values in data- attributes."""
    values = [v for _, ys in series for v in ys if v is not None and math.isfinite(v)] or [0.0]
    yt = nice_ticks(0.0 if bars else min(values), max(values))
    xt = list(range(len(xs) + 1)) if bars else nice_ticks(min(xs), max(xs), 4)  # bars: category i spans [i, i+1]
    px = lambda x: x0 + 52 + (x - xt[0]) / ((xt[-1] - xt[0]) or 1) * (w - 64)  # noqa: E731
    py = lambda y: y0 + h - 34 - (y - yt[0]) / ((yt[-1] - yt[0]) or 1) * (h - 58)  # noqa: E731
    from xml.sax.saxutils import escape
    out = [f'<text x="{x0 + 52}" y="{y0 + 16}" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{x0 + 52}" y="{y0 + 24}" width="{w - 64}" height="{h - 58}" fill="none" stroke="#999"/>']
    for t in yt:
        out.append(f'<line x1="{x0 + 48}" x2="{x0 + w - 12}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                   f'<text x="{x0 + 46}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    for i, t in enumerate(xt[:len(xs)] if bars else xt):
        label = escape(str(xs[i])) if bars else f"{t:.4g}"
        out.append(f'<text x="{px(t + (0.5 if bars else 0)):.1f}" y="{y0 + h - 18}" text-anchor="middle">{label}</text>')
    if xlabel:
        out.append(f'<text x="{x0 + w / 2 + 20}" y="{y0 + h - 2}" text-anchor="middle">{xlabel}</text>')
    for k, (label, ys) in enumerate(series):
        color, data_ = COLORS[k % len(COLORS)], f'data-label="{label}" data-y="{",".join(repr(v) for v in ys)}"'
        if bars:
            width = 0.8 / len(series)
            out += [f'<rect x="{px(i + 0.1 + k * width):.1f}" y="{py(v):.1f}" width="{px(width) - px(0):.1f}" '
                    f'height="{py(yt[0]) - py(v):.1f}" fill="{color}" data-label="{label}" data-value="{v!r}"/>'
                    for i, v in enumerate(ys)]
        else:
            points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys) if y is not None and math.isfinite(y))
            out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.5" {data_} '
                       f'data-x="{",".join(repr(x) for x in xs)}"/>')
        if len(series) > 1:  # the legend: one line per series, right of the title row, out of the plot
            out.append(f'<text x="{x0 + w - 12}" y="{y0 + 8 + 8 * k}" text-anchor="end" font-size="8" '
                       f'fill="{color}">{escape(label)}</text>')
    return out


def svg_page(panels, title, w, h, cols):
    from xml.sax.saxutils import escape
    rows = math.ceil(len(panels) / cols)
    body = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * cols}" height="{h * rows + 30}" '
            f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>',
            f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, panel in enumerate(panels):
        body += svg_panel(w * (i % cols), 30 + h * (i // cols), w, h, *panel)
    return "\n".join(body + ["</svg>"]) + "\n"


def svg_lines(rows, panels, title):
    """Line charts of metric rows against their step: one panel per (title, [keys])."""
    xs = [r["step"] for r in rows]
    charts = [(name, xs, [(k, [r.get(k) for r in rows]) for k in keys], "step") for name, keys in panels]
    return svg_page(charts, title, 320, 210, 4 if len(charts) > 6 else 3)


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per GPU


def mfu(tokens_per_s_per_gpu, n_params, device):
    """Model FLOPs utilization: 6 * params FLOPs per trained token (forward + backward) over the GPU's peak."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return 6 * n_params * tokens_per_s_per_gpu / peak if peak else None


if __name__ == "__main__":
    data.cli(main)
