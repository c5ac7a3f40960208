"""Stage 1 of X-Reasoner: long chain-of-thought SFT of Qwen2.5-VL on text only, with FSDP2.

    torchrun --nproc_per_node 8 sft.py                             # the paper's run (appendix B.1)
    python sft.py --model tiny --data toy --out runs/sft           # the toy task on a CPU (a preset)

The paper fine-tunes all language-model weights of Qwen2.5-VL-7B-Instruct on OpenThoughts-114k rewritten to
<think>...</think><answer>...</answer>, 4 epochs, AdamW lr 1e-5 decayed x0.8 per epoch, 128 sequences per
step. Reading order: data order -> batches -> the loss -> one step -> the loop -> FSDP2 sharding, which grpo.py
reuses with the chunked LM head. One device runs the same code as N: a process group of one, the same FSDP2
mixed precision (bf16 compute, fp32 master weights and gradient reduction on GPU).

Memory (bench/bench_memory.py, 7B, 8 ranks, micro-batch 4 x 4,096): 27.5 GiB per GPU, so A100-40GB fits: rank 0
alone reads the checkpoint and scatters it into shards, the LM head runs in chunks of positions (never the
B x T x vocab logits), activation checkpointing is on for GPU, and every micro-batch's gradients are
reduce-scattered at once. The data is tokenized once per machine into a file every rank maps (data.load_sft_data).

Deliberate simplifications: sequences are padded, not packed (length-grouped batches keep the padding small,
and the fraction is reported); the vision tower is frozen by default since text-only data gives it no
gradient; one optimizer, no ZeRO offload.
"""
import os
import random
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import data
import generate
from plumbing import checkpoints, runs
from plumbing.cli import (COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, DataError, cli, cli_parser,
                           toy_preset)
from plumbing.distributed import all_reduce_dict, any_rank, clip_grad_norm, setup_distributed

# Flags that may differ on --resume: they change nothing the run computes (ours)
MAY_CHANGE_ON_RESUME = {"max_steps", "micro_batch", "save_every", "keep", "checkpointing"}


def parse_args(argv=None):
    ap = cli_parser(__doc__)
    # model and data
    ap.add_argument("--model", default=data.BASE_MODEL, help="hub id, local directory or `tiny` (default: the paper's)")
    ap.add_argument("--data", default=data.OPENTHOUGHTS, help="hub id, .json/.jsonl/.parquet, or `toy` (a CPU preset)")
    ap.add_argument("--out", default="runs/sft", help="run directory: checkpoints, metrics.jsonl, curves.svg")
    ap.add_argument("--max-len", type=POSITIVE_INT, default=4096, help="longer conversations are cut (counted) (B.1: 4,096)")
    # optimization (appendix B.1)
    ap.add_argument("--lr", type=POSITIVE, default=1e-5, help="AdamW learning rate (B.1: 1e-5)")
    ap.add_argument("--lr-decay", type=POSITIVE, default=0.8, help="lr multiplied by this after each epoch (B.1: 0.8)")
    ap.add_argument("--warmup", type=FRACTION, default=0.0, help="fraction of steps of linear warm-up (B.1: none)")
    ap.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0, help="AdamW weight decay (B.1: 0.0)")
    ap.add_argument("--betas", type=FRACTION, nargs=2, default=(0.9, 0.999), help="AdamW betas (B.1: 0.9, 0.999)")
    ap.add_argument("--epochs", type=POSITIVE_INT, default=4, help="passes over the data (B.1: 4)")
    ap.add_argument("--global-batch", type=POSITIVE_INT, default=128, help="sequences per step, all ranks (B.1: 4 x 32 GPUs)")
    ap.add_argument("--micro-batch", type=POSITIVE_INT, default=4, help="sequences per forward on one GPU (B.1: 4)")
    ap.add_argument("--grad-clip", type=NON_NEGATIVE, default=0.0, help="gradient-norm clip; 0: off (B.1 lists none)")
    ap.add_argument("--max-steps", type=POSITIVE_INT, default=None, help="stop after this many steps (smoke runs)")
    ap.add_argument("--seed", type=COUNT, default=0, help="data order (ours)")
    ap.add_argument("--window", type=POSITIVE_INT, default=16, help="length grouping: sort within this many batches (ours)")
    # systems (ours)
    ap.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto", help="activation checkpointing "
                    "(ours: on GPU)")
    ap.add_argument("--train-vision", action="store_true",
                    help="train the vision tower (ours: frozen; text gives it no signal)")
    ap.add_argument("--freeze-text", action="store_true", help="freeze the language model (embeddings, decoder, "
                    "head): with --train-vision only the vision tower learns, Qwen2-VL's first stage (ours)")
    ap.add_argument("--freeze-embeddings", action="store_true", help="freeze the input token embeddings "
                    "(ours: off; toy/miniature.py's small model keeps its images readable with it)")
    ap.add_argument("--freeze-layers", type=COUNT, default=0, help="freeze the lowest N decoder layers (ours: 0; "
                    "toy/miniature.py --study)")
    ap.add_argument("--save-every", type=COUNT, default=0, help="save every N steps; 0: at each epoch's end (ours)")
    ap.add_argument("--keep", type=COUNT, default=2, help="step/epoch checkpoints kept beside final; 0: all (ours)")
    return runs.parse(ap, argv)


# ====================================================================================================
# The method: data order, batches, the loss, one step

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
    try:
        pictures = [data.load_image(p) for e in examples for p in e["images"]]
    except ValueError as e:  # read when the set was tokenized (unreadable rows were skipped then): changed since
        raise DataError(f"{e} now, though it was read when the set was tokenized; restore it, or change the data "
                        f"file so that it is tokenized again", every_rank=False) from None
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

def lr_at(step, epoch, args, total):
    """B.1: AdamW's lr times 0.8 after each epoch; an optional linear warm-up over a share of all steps (ours)."""
    return args.lr * args.lr_decay ** epoch * min(1.0, (step + 1) / max(1, args.warmup * total))


def sft_step(model, optimizer, trainable, examples, batch, processor, args, rank, world, device):
    """One optimizer step on one global batch; returns the summed loss, tokens and padded size over all ranks.

    The loss is the mean over every assistant token of the global batch, whatever its split over ranks and
    micro-batches. Every rank knows the whole batch, so the token count needs no communication."""
    n_target = sum(examples.n_target[i] for i in batch)
    with_images = world > 1 and any(i in examples.images for i in batch)
    loss_sum, tokens, padded = 0.0, 0, 0
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
    runs.refuse_non_finite(grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    summed = all_reduce_dict({"loss": loss_sum, "tokens": tokens, "padded": padded}, device)
    return {"loss": summed["loss"] / n_target, "grad_norm": grad_norm, "tokens": int(summed["tokens"]),
            "padding": 1 - summed["tokens"] / summed["padded"]}


# ====================================================================================================
# The loop

CURVES = [("loss", ["loss"]), ("learning rate", ["lr"]), ("tokens/s", ["tokens_per_s"]), ("gradient norm", ["grad_norm"])]


def main(argv=None):
    launched = time.perf_counter()
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    model, optimizer, trainable, processor, examples = setup(args, rank, world, device)
    steps_per_epoch = len(epoch_batches(examples.lengths, args.global_batch, args.window, args.seed, 0))
    total = min(args.max_steps or steps_per_epoch * args.epochs, steps_per_epoch * args.epochs)
    # the run owns --out from here: a second run into it is refused
    with runs.locked(args.out, rank, device, lambda: runs.check_run_dir(args, MAY_CHANGE_ON_RESUME)):
        state = checkpoints.load_checkpoint(model, optimizer, args.resume, rank, world) if args.resume else {"step": 0}
        runs.start_run(args, "sft", rank, world, state["step"] if args.resume else None)
        metrics = runs.Metrics(args.out, rank, CURVES, f"sft.py --out {args.out}")
        preempt, step = runs.Preemption(device), state["step"]
        bar = tqdm(total=total, initial=step, disable=rank != 0, desc="sft")
        while step < total:
            epoch, index = divmod(step, steps_per_epoch)
            batch = epoch_batches(examples.lengths, args.global_batch, args.window, args.seed, epoch)[index]
            lr = lr_at(step, epoch, args, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            start = time.perf_counter()
            row = sft_step(model, optimizer, trainable, examples, batch, processor, args, rank, world, device)
            step, seconds = step + 1, time.perf_counter() - start
            row = {"step": step, "epoch": epoch, "lr": lr, **row, "tokens_per_s": row["tokens"] / seconds}
            # a sharded DTensor reports its full size, so this counts the whole model's trainable parameters
            row["mfu"] = runs.mfu(row["tokens_per_s"] / world, sum(p.numel() for p in trainable), device)
            if launched:  # the first step of this launch: how long data and model took to get here
                row["startup_s"], launched = start - launched, None
            metrics.log(**row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.1e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            due = step % (args.save_every or steps_per_epoch) == 0
            if checkpoints.save_if_due(preempt, model, optimizer, processor, args, step, total, rank, due):
                break
        bar.close()
        metrics.draw()
        preempt.close()
    return model


def setup(args, rank, world, device):
    """Inputs checked before anything loads or is written, then the data, the sharded model and AdamW."""
    micro = max(1, 10 // world)  # the toy task on a CPU: what the README demo and the tests use
    preset = toy_preset(args, {"global_batch": micro * world, "micro_batch": micro, "epochs": 36, "lr": 3e-3,
                               "lr_decay": 1.0, "save_every": 120}) if args.data == "toy" else ""
    args.model = data.check_model(args.model)  # first: a run directory becomes its final/, as the run records it
    runs.check_run_dir(args, MAY_CHANGE_ON_RESUME)
    if preset and rank == 0:
        print(preset, file=sys.stderr)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.freeze_text and not args.train_vision:
        raise DataError("--freeze-text without --train-vision leaves nothing to train")
    if args.global_batch % (args.micro_batch * world):
        raise DataError(f"--global-batch {args.global_batch} is not a multiple of --micro-batch "
                        f"{args.micro_batch} x {world} ranks")
    processor = data.load_processor(args.model)
    # Tokenized once per machine (local rank 0; the others wait), then mapped from disk by every rank.
    examples = data.load_sft_data(args.data, processor, args.max_len, build=int(os.environ.get("LOCAL_RANK", 0)) == 0,
                                  wait=lambda failed: any_rank(failed, device), report=rank == 0)
    if len(examples) < args.global_batch:
        raise DataError(f"{len(examples)} examples cannot fill one global batch of {args.global_batch}")
    checkpointing = args.checkpointing == "on" or (args.checkpointing == "auto" and device.type == "cuda")
    # fp32 master weights, read by rank 0 and scattered as shards; FSDP casts to bf16 for compute on GPU
    model = load_sharded(args.model, device, args.train_vision, checkpointing)
    if args.freeze_text:  # images are taught to speak the language model's input, which stays as it was
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    if args.freeze_embeddings:  # the vectors the vision tower learnt to imitate stay where they were
        model.get_input_embeddings().requires_grad_(False)
    freeze_lowest(model, args.freeze_layers)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    return model, optimizer, trainable, processor, examples


def freeze_lowest(model, n):
    """--freeze-layers: the lowest `n` decoder layers keep the weights they start with (grpo.py uses it too)."""
    layers = model.model.language_model.layers
    if n > len(layers):
        raise DataError(f"--freeze-layers {n}: the model has {len(layers)} decoder layers")
    layers[:n].requires_grad_(False)


# ====================================================================================================
# FSDP2: sharding, and reading a checkpoint into shards (grpo.py uses both)

def shard_model(model, device, train_vision=False, checkpointing=False, bf16=None, mesh=None):
    """FSDP2: one unit per decoder layer and per vision block, then the root; bf16 compute (default: on GPU)
    with fp32 gradient reduction. Parameters keep their dtype (fp32: the optimizer's master copy)."""
    model.model.visual.requires_grad_(train_vision)
    if checkpointing:  # recompute each layer in backward: keep only its input
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the root returns hidden_states views; nothing here writes to them in place
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


if __name__ == "__main__":
    cli(main)
