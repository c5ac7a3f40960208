"""Peak GPU memory per rank of the paper's runs, simulated on a CPU: the project's own SFT and GRPO steps run under
FakeTensorMode with a fake process group of --world ranks. No memory is allocated and no GPU is needed.

    python bench/bench_memory.py --stage sft --shape 7b --world 8                 # B.1: micro-batch 4 x 4,096
    python bench/bench_memory.py --stage grpo --shape 7b --world 8 [--offload]    # B.2: 16 prompts x 8 per rank
    python bench/bench_memory.py --stage sft --shape 7b --world 8 --json          # last line: one JSON object

What runs is the training code itself: the model is the real transformers class at Qwen2.5-VL's published
shape, sharded by sft.shard_model (bf16 compute, fp32 master weights and reduction, activation checkpointing),
the loss is sft.token_loss_sum / grpo.token_logprobs + grpo.policy_loss, AdamW steps, the GRPO inference copy
is filled by grpo.refresh_inference_copy and the rollout KV cache is generate.py's slot cache of prompt + new
tokens (a prompt prefill, then one decode step written in place). --offload calls
plumbing.distributed.offload/reload as grpo.py does.

Counting: a TorchDispatchMode sees each tensor an op creates and follows its storage until it is freed, or resized
(FSDP frees and refills its all-gather buffers that way); the peak of live bytes is split into the policy's
parameter shards, gradient shards, optimizer state and the rest (activations, logits chunks, all-gathered
parameters, KV cache, inference copy, reference). Simplifications, all ours: the first step is not measured
(DTensor works out sharding rules on fake full-size tensors the first time it meets an op, which would count as
memory; the measured step is also the first with optimizer state); a measured step runs two micro-batches,
since later ones repeat the second's allocations; positions are text-only (no image tokens), computed without
data-dependent ops; allocator fragmentation and CUDA/NCCL workspaces are not modelled (leave ~2-4 GiB).
Fake tensors cannot show transformers that an attention mask is all ones, so it builds the B x 1 x L x L boolean
mask a real run skips (64 MiB at 4 x 4,096): the only difference from a real run, checked in the tests.
"""
import argparse
import json
import sys
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate  # noqa: E402
import grpo  # noqa: E402
import sft  # noqa: E402
from plumbing import distributed  # noqa: E402

GIB = 2 ** 30
# Qwen2.5-VL's published config.json values (Qwen/Qwen2.5-VL-{7B,3B}-Instruct on the hub)
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
SHAPES = {
    "7b": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
               vision=VISION | dict(out_hidden_size=3584)),
    "3b": dict(text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
               vision=VISION | dict(out_hidden_size=2048)),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--stage", choices=["sft", "grpo"], default="sft", help="which training step to size")
    ap.add_argument("--shape", default="7b", help="7b or 3b (published configs), or a model path/`tiny`")
    ap.add_argument("--world", type=int, default=8, help="ranks the model is sharded over")
    # SFT (B.1): micro-batch 4 per device, 4,096 tokens
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward (SFT and the GRPO update)")
    ap.add_argument("--seq", type=int, default=4096, help="SFT sequence length")
    # GRPO (B.2): 128 prompts x 8 samples per step over all ranks, responses up to 4,096 tokens
    ap.add_argument("--prompts-per-step", type=int, default=128, help="all ranks together (B.2)")
    ap.add_argument("--group-size", type=int, default=8, help="samples per prompt (B.2)")
    ap.add_argument("--gen-batch", type=int, default=64,
                    help="sequences per generation batch (grpo.py's default), at most a rank's rollouts")
    ap.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (ours: Orz prompts are shorter)")
    ap.add_argument("--new-tokens", type=int, default=4096, help="rollout response length (B.2: 4,096)")
    ap.add_argument("--beta", type=float, default=0.01, help="KL coefficient; 0: no reference model (B.2: 0.01)")
    ap.add_argument("--offload", action="store_true", help="grpo.py --offload")
    ap.add_argument("--real", action="store_true", help="real CPU tensors instead of fake ones (small shapes only)")
    ap.add_argument("--top", type=int, default=0, help="list the K largest tensors alive at the peak")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    args = ap.parse_args(argv)
    args.gen_batch = min(args.gen_batch, max(1, args.prompts_per_step * args.group_size // args.world))
    return args


# ----------------------------------------------------------------------------------------------------
# Live storage bytes

class LiveStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of tensor storage alive on this rank, and their peak. Each storage's size history is kept, so the
    bytes of any group of storages can be read at the moment of the peak afterwards."""

    def __init__(self, fake_mode=None, ignore=("meta",)):
        super().__init__()
        self.fake_mode, self.ignore = fake_mode, set(ignore)
        self.records, self.history, self.clock, self.live, self.peak, self.t_peak = {}, [], 0, 0, 0, 0
        self.op = "init"
        self._resize = torch.UntypedStorage.resize_

    def storages(self, t):
        """The plain storages under a tensor, through wrapper subclasses such as DTensor."""
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass
        if is_traceable_wrapper_subclass(t):
            inner = [getattr(t, attr) for attr in t.__tensor_flatten__()[0]]
            return [s for x in inner if isinstance(x, torch.Tensor) for s in self.storages(x)]
        return [] if t.device.type in self.ignore else [t.untyped_storage()]

    def _set(self, record, nbytes):
        self.clock += 1
        self.live += nbytes - record["sizes"][-1][1]
        record["sizes"].append((self.clock, nbytes))
        if self.live > self.peak:
            self.peak, self.t_peak = self.live, self.clock

    def track(self, t):
        for st in self.storages(t):
            record = self.records.get(st._cdata)
            if record is not None and record["ref"]() is st:
                continue
            record = {"sizes": [(self.clock, 0)], "op": self.op, "shape": tuple(t.shape), "dtype": t.dtype}
            record["ref"] = weakref.ref(st, lambda _, r=record: self._set(r, 0))
            self.records[st._cdata] = record
            self.history.append(record)
            self._set(record, st.nbytes())

    def bytes_at(self, tensors, t):
        """Bytes the storages of `tensors` held at clock time t."""
        total, seen = 0, set()
        for tensor in tensors:
            for st in self.storages(tensor):
                record = self.records.get(st._cdata)
                if record is None or st._cdata in seen:
                    continue
                seen.add(st._cdata)
                total += next(n for clock, n in reversed(record["sizes"]) if clock <= t) if record["sizes"][0][0] <= t else 0
        return total

    def largest_at(self, t, k):
        """The k largest storages alive at clock time t: (bytes, creating op, shape, dtype)."""
        alive = [(next(n for c, n in reversed(r["sizes"]) if c <= t), r["op"], r["shape"], r["dtype"])
                 for r in self.history if r["sizes"][0][0] <= t]
        return sorted(alive, key=lambda x: -x[0])[:k]

    def reset_peak(self):
        self.peak, self.t_peak = self.live, self.clock

    def __enter__(self):
        tracker, resize = self, self._resize

        def resize_(st, size):  # not an op the dispatcher sees: FSDP frees/refills all-gather buffers this way
            resize(st, size)
            record = tracker.records.get(st._cdata)
            if record is not None and record["ref"]() is st:
                tracker._set(record, st.nbytes())
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._guards import active_fake_mode
        from torch.distributed.tensor import DTensor
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor turn into local ops first; we count those
        if func is torch.ops._c10d_functional.wait_tensor.default and active_fake_mode() is not None:
            out = args[0]  # the fake implementation copies; the real one waits in place
        else:
            out = func(*args, **(kwargs or {}))
        self.op = func.__name__
        if active_fake_mode() is self.fake_mode:  # not DTensor's own shape propagation on fake global tensors
            for x in torch.utils._pytree.tree_leaves(out):
                if isinstance(x, torch.Tensor):
                    self.track(x)
        return out


# ----------------------------------------------------------------------------------------------------
# The model and the steps

def build(shape, dtype):
    """The model at `shape`, built on the current device under the current (fake) mode."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    if shape in SHAPES:
        spec = SHAPES[shape]
        config = Qwen2_5_VLConfig(text_config=spec["text"] | dict(max_position_embeddings=128000, rms_norm_eps=1e-6),
                                  vision_config=spec["vision"])
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    import data
    return data.model_from_config(shape, dtype)


def text_positions(model, batch):
    """generate.rope_positions for a text-only, unpadded batch: all three M-RoPE axes count 0, 1, 2, ..."""
    B, L = batch["input_ids"].shape
    positions = torch.arange(L).view(1, 1, L).expand(3, B, L)
    return positions, torch.full((B,), L)


def tokens(batch, length, vocab):
    return torch.randint(0, vocab, (batch, length))


def split_at(tracker, t, model, trainable, optimizer):
    """The bytes of the policy's parameter shards, gradient shards and optimizer state at clock time t."""
    groups = {"params": list(model.parameters()), "grads": [p.grad for p in trainable if p.grad is not None],
              "optimizer": distributed.optimizer_state(optimizer)}
    return {k: tracker.bytes_at(v, t) for k, v in groups.items()}


def sft_steps(args, model, vocab, tracker):
    """sft.py's step: micro-batches of token_loss_sum + backward, then AdamW. Returns (peak, split, detail)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    for step, micro_batches in enumerate([1, 2]):  # a warm-up step, then the measured one
        tracker.reset_peak()
        for _ in range(micro_batches):
            ids = tokens(args.micro_batch, args.seq, vocab)
            sft.token_loss_sum(model, ids, ids, torch.ones_like(ids)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, float("inf"))
        optimizer.step()
        peak, t_peak = tracker.peak, tracker.t_peak
        split = split_at(tracker, t_peak, model, trainable, optimizer)
        optimizer.zero_grad(set_to_none=True)
    return peak, split, {"phase": "update", "t_peak": t_peak}


def rollout_phase(args, infer, vocab):
    """Generation's memory high point: generate.py's slot cache for gen_batch rows of prompt + new tokens
    (preallocated whole), the prompts prefilled into it, and one decode step over the full length, written in
    place. Returns the cache's bytes."""
    n, P, T = args.gen_batch, args.prompt_len, args.new_tokens
    dtype = next(infer.parameters()).dtype
    with torch.no_grad():
        cache = generate.SlotCache(infer.config, n, P + T, dtype, "cpu")
        slots = generate.Slots(torch.zeros(n, dtype=torch.long), torch.zeros(n, P + T, dtype=dtype))
        for first in range(0, n, generate.PREFILL_ROWS):  # admitted and prefilled as generate.py does
            rows = min(generate.PREFILL_ROWS, n - first)
            batch = {"input_ids": tokens(rows, P, vocab)}
            positions, next_pos = text_positions(infer, batch)
            cache.write_prompts(slice(first, first + rows))
            infer(input_ids=batch["input_ids"], position_ids=positions, past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
        slots.position.fill_(P + T - 1)  # the last step: every row at the end of its budget
        generate.decode_one_token(infer, tokens(n, 1, vocab)[:, 0], [P + T - 1] * n, cache, slots, 3)
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def grpo_steps(args, policy, reference, infer, vocab, tracker):
    """grpo.py's step: rollouts from the inference copy, then reference log-probs, the policy loss, backward and
    AdamW over micro-batches, then the refresh of the copy. Returns (peak, split, detail)."""
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-6, weight_decay=0.01)
    B, P, T = args.micro_batch, args.prompt_len, args.new_tokens
    for step in range(2):  # a warm-up step, then the measured one
        tracker.reset_peak()
        parked = distributed.offload([*policy.parameters(), *distributed.optimizer_state(optimizer),
                               *(reference.parameters() if reference is not None else [])], host="meta") \
            if args.offload else []
        kv_cache = rollout_phase(args, infer, vocab)
        rollout = (tracker.peak, tracker.t_peak)
        distributed.reload(parked)
        trained = {name for name, p in policy.named_parameters() if p.requires_grad}  # as grpo.grpo_step parks them:
        parked = [*distributed.offload([p for n, p in infer.named_parameters() if n not in trained], host="meta"),
                  *distributed.offload([p for n, p in infer.named_parameters() if n in trained], keep=False)] \
            if args.offload else []  # the frozen weights kept, those the refresh overwrites dropped
        tracker.reset_peak()
        response = tokens(B, T, vocab)
        batch = {"input_ids": torch.cat([tokens(B, P, vocab), response], 1),
                 "attention_mask": torch.ones(B, P + T, dtype=torch.long),
                 "mm_token_type_ids": torch.zeros(B, P + T, dtype=torch.long)}
        mask, advantages = torch.ones(B, T), torch.ones(B)
        for _ in range(step + 1):
            with torch.no_grad():
                ref = grpo.token_logprobs(reference, batch, response)[0] if reference is not None else None
            logp, _ = grpo.token_logprobs(policy, batch, response)
            old = logp.detach()  # one PPO mini-batch: the update's own log-probs are the old ones
            loss, _ = grpo.policy_loss(logp, old, ref if ref is not None else old, advantages, mask, mask.sum(),
                                       beta=args.beta)
            loss.backward()
            del logp, old, ref, loss
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        update = (tracker.peak, tracker.t_peak)
        peak, t_peak = max(rollout, update)
        split = split_at(tracker, t_peak, policy, trainable, optimizer)
        optimizer.zero_grad(set_to_none=True)
        distributed.reload(parked)
        gathered = grpo.refresh_inference_copy(policy, infer)
    detail = {"refresh_gathered_gib": gathered / GIB,  # before: every weight and buffer all-gathered in fp32
              "refresh_all_fp32_gib": sum(t.numel() * 4 for t in [*policy.parameters(), *policy.buffers()]) / GIB,"phase": "rollout" if rollout >= update else "update", "t_peak": t_peak, "rollout_peak_gib": rollout[0] / GIB,
              "update_peak_gib": update[0] / GIB, "kv_cache_gib": kv_cache / GIB,
              "inference_copy_gib": sum(p.numel() * p.element_size() for p in infer.parameters()) / GIB}
    return peak, split, detail


def estimate(args):
    """Peak bytes on one rank, their split and details; the same code with fake or real tensors."""
    import contextlib
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():  # a group of one an in-process run left up (plumbing.distributed.finish): the fake
        dist.destroy_process_group()  # world replaces it; the next run starts a new one
    dist.init_process_group("fake", rank=0, world_size=args.world, store=FakeStore())
    mesh = init_device_mesh("cpu", (args.world,))  # before the fake mode: the mesh itself is real
    fake = None if args.real else FakeTensorMode()
    tracker, cpu = LiveStorages(fake), torch.device("cpu")
    real_positions, generate.rope_positions = generate.rope_positions, text_positions
    try:
        with fake or contextlib.nullcontext(), tracker:
            policy = sft.shard_model(build(args.shape, torch.float32), cpu, checkpointing=True, bf16=True, mesh=mesh)
            vocab = policy.config.text_config.vocab_size
            if args.stage == "sft":
                return (*sft_steps(args, policy, vocab, tracker), tracker)
            reference = None
            if args.beta:  # frozen: its shards are held in the compute dtype, as grpo.py does
                reference = sft.shard_model(build(args.shape, torch.bfloat16), cpu, bf16=True, mesh=mesh)
                reference.eval().requires_grad_(False)
            infer = build(args.shape, torch.bfloat16).eval()
            grpo.refresh_inference_copy(policy, infer, everything=True)
            return (*grpo_steps(args, policy, reference, infer, vocab, tracker), tracker)
    finally:
        generate.rope_positions = real_positions
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    peak, split, detail, tracker = estimate(args)
    t_peak = detail.pop("t_peak")
    row = {"stage": args.stage, "shape": args.shape, "world": args.world, "micro_batch": args.micro_batch,
           "offload": args.offload, "peak_gib": peak / GIB, "params_gib": split["params"] / GIB,
           "grads_gib": split["grads"] / GIB, "optimizer_gib": split["optimizer"] / GIB,
           "other_gib": (peak - sum(split.values())) / GIB, **detail, "seconds": time.perf_counter() - start}
    seq = f"{args.micro_batch} x {args.seq}" if args.stage == "sft" else \
        f"gen-batch {args.gen_batch} x {args.prompt_len}+{args.new_tokens}, update {args.micro_batch} x " \
        f"{args.prompt_len + args.new_tokens}{', --offload' if args.offload else ''}"
    print(f"{args.stage} {args.shape} on {args.world} ranks ({seq}): peak {row['peak_gib']:.1f} GiB per rank = "
          f"params {row['params_gib']:.1f} + grads {row['grads_gib']:.1f} + optimizer {row['optimizer_gib']:.1f} "
          f"+ other {row['other_gib']:.1f}" + (f" (peak during {detail['phase']}; rollout peak "
                                                f"{detail['rollout_peak_gib']:.1f}, KV cache "
                                                f"{detail['kv_cache_gib']:.1f}, inference copy "
                                                f"{detail['inference_copy_gib']:.1f}; a refresh gathers "
                                                f"{detail['refresh_gathered_gib']:.1f} GiB, the trained weights in "
                                                f"bf16, against {detail['refresh_all_fp32_gib']:.1f} for every "
                                                f"weight in fp32)" if args.stage == "grpo" else ""))
    if args.top:
        print("largest tensors alive at the peak:")
        for nbytes, op, shape, dtype in tracker.largest_at(t_peak, args.top):
            print(f"  {nbytes / GIB:7.3f} GiB  {op:<28} {str(dtype).replace('torch.', ''):<9} {list(shape)}")
    if args.json:
        print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
