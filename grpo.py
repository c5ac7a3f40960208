"""Stage 2 of X-Reasoner: GRPO with verifiable 1/0 rewards on text-only math (paper §2.2, appendices A, B.2).

    torchrun --nproc_per_node 8 grpo.py --model runs/sft/final --group-size 8       # the paper's run
    python grpo.py --model runs/sft/final --data toy --out runs/grpo   # the toy sums on a CPU (a preset)

One step, in reading order (each a function below, then main() runs them):
    1. rollouts                    every rank samples `group_size` answers for its share of the prompts
                                   (generate.py), from an unsharded inference copy of the policy
    2. score_rollouts              rewards.py: 1 if the answer in <answer> tags is right (or the option), else 0
    3. group_advantages            A = (r - mean(r)) / (std(r) + eps) within each prompt's group (eq. 1)
    4. training_passes             the step's responses dealt over ranks and micro-batches by length (same loss,
                                   less padding), then reference_and_old_logprobs: log-probs of the sampled
                                   tokens under the frozen reference, and under the policy before the update
                                   when there are several PPO mini-batches
    5. policy_loss                 eq. 2: clipped surrogate with clip-higher (eps_low 0.2 from B.2; eps_high
                                   0.28, DAPO's value: the paper gives none) and verl's dual-clip, + beta * k3
                                   KL, summed over sampled tokens and divided by their number on all ranks
    6. update                      AdamW over `ppo_mini_batches` mini-batches of micro-batches; measures the gap
                                   between each token's sampling log-prob and the policy's (and can correct it)
    7. refresh_inference_copy      the trained weights into the inference copy
grpo_step() runs them in that order, with the memory schedule in view; main() loops over steps, and with
--eval-every scores held-out prompts (validate).

Memory (bench/bench_memory.py, 7B, 8 ranks, B.2's settings): rollouts come from an unsharded bf16 inference copy
(15.4 GiB, filled from the policy's shards after every update) with a KV cache of up to 64 x 4,608 tokens
(15.8 GiB); the policy is FSDP-sharded fp32 with activation checkpointing, the frozen reference sharded in bf16, and
log-probs go through the LM head in chunks. Peak 48 GiB per GPU (80 GB cards). For 40 GB cards, --offload parks the
training state (policy shards, AdamW state, reference) in host memory while the copy generates, and the copy while
the policy trains, so the two phases never share the GPU: peak 33 GiB, at the cost of ~30 GB of host<->device
copies per step.

Deliberate simplifications: rollouts and training alternate on the same GPUs (no separate inference engine, no
tensor parallelism); rollouts run in plain PyTorch, not an optimized serving engine.
"""
import math
import random
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import generate
import rewards
import sft
from plumbing import checkpoints, runs
from plumbing.cli import (COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, DataError, accepting, cli,
                           cli_parser, int_at_least, toy_preset)
from plumbing.distributed import (all_reduce_dict, all_reduce_sum, clip_grad_norm, full_tensor, optimizer_state,
                                  parked, setup_distributed, shard)
from plumbing.runs import refuse_non_finite

# A negative advantage costs at most this many times |A|: dual-clip PPO needs c > 1 (Ye et al. 2020)
DUAL_CLIP = accepting(float, "0 (off) or a number > 1", lambda v: v == 0 or (v > 1 and math.isfinite(v)))
# Flags that may differ on --resume: they change nothing the run computes (ours)
MAY_CHANGE_ON_RESUME = {"max_steps", "micro_batch", "save_every", "keep", "reward_processes", "gen_batch", "offload",
                        "balance"}


def parse_args(argv=None):
    ap = cli_parser(__doc__)
    # model and data
    ap.add_argument("--model", required=True, help="stage 1's checkpoint (runs/sft/final), a hub id, or `tiny`")
    ap.add_argument("--data", default=data.ORZ_MATH_URL, help="Orz-math JSON (URL/path), MedQA rows, or toy (B.2)")
    ap.add_argument("--out", default="runs/grpo", help="run directory: checkpoints, metrics.jsonl, curves.svg")
    # rollouts (appendix B.2)
    ap.add_argument("--prompts-per-step", type=POSITIVE_INT, default=128, help="prompts per step, all ranks (B.2: 128)")
    ap.add_argument("--group-size", type=int_at_least(2), default=8, help="samples per prompt (B.2: 8)")
    ap.add_argument("--temperature", type=POSITIVE, default=1.0, help="sampling temperature (B.2: 1.0)")
    ap.add_argument("--max-new-tokens", type=POSITIVE_INT, default=4096, help="response length cap (B.2: 4,096)")
    ap.add_argument("--truncated", choices=["zero", "score", "mask"], default="zero", help="a response cut at the cap: "
                    "zero, it never finished its answer (ours; B.2 says nothing); score, as written (verl's); mask, "
                    "left out of the loss (DAPO's overlong filtering)")
    ap.add_argument("--think-budget", type=POSITIVE_INT, default=None, help="forced exit (§2.1) in rollouts (B.2: none)")
    ap.add_argument("--answer-budget", type=POSITIVE_INT, default=512, help="answer tokens after a forced exit (ours)")
    # the objective (§2.2, appendix A)
    ap.add_argument("--beta", type=NON_NEGATIVE, default=0.01, help="k3 KL coefficient; 0 drops the reference (B.2: 0.01)")
    ap.add_argument("--eps-low", type=FRACTION, default=0.2, help="PPO clip range below 1 (B.2: 0.2)")
    ap.add_argument("--eps-high", type=NON_NEGATIVE, default=0.28, help="clip-higher above 1 (§2.2, no value given; DAPO's)")
    ap.add_argument("--dual-clip", type=DUAL_CLIP, default=3.0, help="A < 0 costs at most this x |A|; 0: off (verl's)")
    ap.add_argument("--no-std", action="store_true", help="advantages r - mean(r), unscaled (Dr. GRPO; ours: off)")
    ap.add_argument("--ppo-mini-batches", type=POSITIVE_INT, default=1, help="optimizer steps per rollout batch (verl's: 1)")
    ap.add_argument("--rollout-correction", choices=["none", "token", "sequence"], default="none", help="the gap "
                    "between the rollouts' sampler and the policy trained: token, truncated importance weights; "
                    "sequence, responses whose ratio leaves [1/cap, cap] left out (verl's rollout correction; "
                    "the paper: none)")
    ap.add_argument("--rollout-cap", type=accepting(float, "a number > 1", lambda v: 1 < v < math.inf), default=2.0,
                    help="the cap C of --rollout-correction (verl's rollout_is_threshold default)")
    # optimization (appendix B.2)
    ap.add_argument("--lr", type=POSITIVE, default=3e-6, help="AdamW learning rate (B.2: 3e-6)")
    ap.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.01, help="AdamW weight decay (B.2: 0.01)")
    ap.add_argument("--warmup", type=FRACTION, default=0.1, help="fraction of steps of linear warm-up (B.2: 10%%)")
    ap.add_argument("--grad-clip", type=NON_NEGATIVE, default=1.0, help="gradient-norm clip (B.2: 1.0)")
    ap.add_argument("--epochs", type=POSITIVE_INT, default=3, help="passes over the prompts (B.2: 3)")
    ap.add_argument("--max-steps", type=POSITIVE_INT, default=None, help="stop after this many steps (smoke runs)")
    ap.add_argument("--freeze-layers", type=COUNT, default=0, help="freeze the lowest N decoder layers (ours: 0; "
                    "toy/miniature.py --study)")
    ap.add_argument("--seed", type=COUNT, default=0, help="prompt order and rollout seeds (ours)")
    # validation while training (ours; verl's test_freq, nanochat's --eval-every)
    ap.add_argument("--eval-every", type=COUNT, default=0, help="score held-out prompts greedily every N steps; 0: off")
    ap.add_argument("--eval-data", help="the held-out prompts (RL schema); default: --eval-size prompts held out of "
                    "--data, never trained on")
    ap.add_argument("--eval-size", type=POSITIVE_INT, default=128, help="prompts held out of --data for validation")
    # systems (ours)
    ap.add_argument("--micro-batch", type=POSITIVE_INT, default=4, help="sequences per training forward (ours)")
    ap.add_argument("--balance", choices=["length", "off"], default="length", help="deal the step's responses to "
                    "ranks and micro-batches by length (same loss, less padding and waiting); off: each rank its own, "
                    "in rollout order (ours)")
    ap.add_argument("--gen-batch", type=POSITIVE_INT, default=64, help="KV-cache slots decoded together, "
                    "each refilled as its row ends (ours)")
    ap.add_argument("--reward-processes", type=POSITIVE_INT, default=4, help="verifier helper processes (ours)")
    ap.add_argument("--offload", action="store_true", help="training state to host memory in rollouts (40 GB GPUs)")
    ap.add_argument("--save-every", type=COUNT, default=50, help="save every N steps (ours)")
    ap.add_argument("--keep", type=COUNT, default=2, help="step checkpoints kept beside final; 0: all (ours)")
    return runs.parse(ap, argv)


# ====================================================================================================
# The method: one GRPO step, in the order it runs

@dataclass
class Rollout:
    """One sampled response, and what the step attaches to it, field by field in the order it is filled."""
    # rollouts(): the prompt and what the inference copy sampled
    messages: list           # the chat: appendix C's training prompt around the question
    answer: str              # the verified answer (an option letter when there are options)
    options: list            # the options' texts, or None for a math question
    token_ids: list          # the response, T tokens
    sampled: list            # per token: 1 if the policy sampled it, 0 if the forced exit wrote it
    sample_logp: list        # per token: its log-prob under the distribution the inference copy drew it from
    text: str
    finish_reason: str       # "stop", "length" (cut at --max-new-tokens) or "forced_exit"
    # score_rollouts(): whether it takes part in the loss (--truncated mask); grpo_step(): its advantage (eq. 1)
    advantage: float = 0.0
    in_loss: bool = True
    # reference_and_old_logprobs(): per-token log-probs, (T,), or None when not needed
    ref_logp: torch.Tensor = None
    old_logp: torch.Tensor = None
    # sequence_batch(): the prompt's encoding, kept for the next pass over this row
    encoding: dict = None

    def sampled_mask(self):
        """Per token: 1 if the policy sampled it (it takes the loss), 0 if the forced exit wrote it or in_loss is off."""
        return (self.sampled or [1] * len(self.token_ids)) if self.in_loss else [0] * len(self.token_ids)


def rollouts(infer, processor, prompts, keys, *, group_size, temperature, max_new_tokens, think_budget,
             answer_budget, gen_batch, progress=False, stats=None):
    """`group_size` responses to each prompt, consecutive, so a group is rows [g * group_size, (g+1) * group_size).
    `keys`: per prompt, what names it in the run, (run seed, step, prompt index); each response samples from
    generate.row_seed(*key, sample), so the rollouts are the same on 1 GPU or 64. All of them in one call:
    `gen_batch` slots, each refilled as soon as its row ends."""
    chats = [p["messages"] for p in prompts for _ in range(group_size)]
    seeds = [generate.row_seed(*key, k) for key in keys for k in range(group_size)]
    completions = generate.generate(infer, processor, chats, max_new_tokens=max_new_tokens, temperature=temperature,
                                    think_budget=think_budget, answer_budget=answer_budget, batch_size=gen_batch,
                                    seed=seeds, progress=progress, stats=stats)
    return [Rollout(p["messages"], p["answer"], p["options"], c.token_ids, c.sampled, c.logprobs, c.text,
                    c.finish_reason) for p, c in zip([p for p in prompts for _ in range(group_size)], completions)]


def score_rollouts(rows, processes, truncated="zero"):
    """The 1/0 rewards (§2.2), (N,). The training prompt (appendix C) asks for the answer inside <answer> tags, so
    a response without them earns 0, however right its last number (evaluation stays lenient). A response cut at
    the cap has not finished: `truncated` "zero" scores it 0 (else a policy learns to answer, then ramble to the
    cap); "mask" scores it but leaves it out of the loss (DAPO's overlong filtering)."""
    reward = torch.tensor(rewards.batch_rewards([r.text for r in rows], [r.answer for r in rows],
                                                [r.options for r in rows], processes=processes, require_tags=True))
    cut = torch.tensor([r.finish_reason == "length" for r in rows])
    for r in rows:
        r.in_loss = not (truncated == "mask" and r.finish_reason == "length")
    return torch.where(cut, 0.0, reward) if truncated == "zero" else reward


def group_advantages(group_rewards, eps=1e-6, scale=True):
    """Eq. (1): each response's reward relative to its group. group_rewards: (prompts, group_size)."""
    centered = group_rewards - group_rewards.mean(dim=1, keepdim=True)                      # (G, group_size)
    return centered / (group_rewards.std(dim=1, keepdim=True) + eps) if scale else centered


def balanced_passes(lengths, world, micro_batch, mini_batches, balance=True):
    """Which rows each rank trains on, micro-batch by micro-batch: passes[m][r] is rank r's micro-batches (lists of
    row indices) in PPO mini-batch m. `lengths`: (prompt, response) tokens of every row of the step, rank by rank
    (rank r's i-th row is r * n + i). A mini-batch holds the same rows as in rollout order (each rank's m-th slice),
    and every rank the same number of micro-batches (FSDP's collectives pair them up). `balance` off: each rank its
    own rows in rollout order. On: the mini-batch's rows sorted by response (then prompt) length are cut into
    equal-count bins, so a micro-batch holds similar lengths (padding: its widest prompt plus its longest response);
    the bins, ordered by padded size, are dealt to the ranks a group at a time in snake order, so every rank gets a
    similar token count and the ranks' k-th micro-batches, run side by side, are alike (bench/bench_grpo.py)."""
    n = len(lengths) // world
    size = -(-n // mini_batches)
    passes = []
    for m in range(0, n, size):
        mine = [[r * n + i for i in range(m, min(m + size, n))] for r in range(world)]  # rollout order
        per_rank = -(-len(mine[0]) // micro_batch)
        if not balance:
            passes.append([[rows[k:k + micro_batch] for k in range(0, len(rows), micro_batch)] for rows in mine])
            continue
        order = sorted((i for rows in mine for i in rows), key=lambda i: (-lengths[i][1], -lengths[i][0]))
        bins = [order[b * len(order) // (world * per_rank):(b + 1) * len(order) // (world * per_rank)]
                for b in range(world * per_rank)]
        bins.sort(key=lambda b: -len(b) * (max(lengths[i][0] for i in b) + max(lengths[i][1] for i in b)))
        ranks = [[] for _ in range(world)]
        for b, rows in enumerate(bins):  # snake: 0..W-1, then W-1..0, ...
            group, place = divmod(b, world)
            ranks[place if group % 2 == 0 else world - 1 - place].append(rows)
        passes.append(ranks)
    return passes


def training_passes(rows, processor, *, micro_batch, mini_batches, balance, rank, world):
    """This rank's part of steps 4-6: its mini-batches of micro-batches of Rollouts (balanced_passes). Balanced
    dealing moves rows between ranks: every rank receives every row of the step (their tokens: a few MB)."""
    todo = [r for r in rows if r.encoding is None]  # a group's rows share one messages object: encoded once
    for r, encoding in zip(todo, generate.encode_all(processor, [r.messages for r in todo], math.inf)[0]):
        r.encoding = encoding
    if world > 1 and balance:
        everyone = [None] * world
        dist.all_gather_object(everyone, rows)
        rows = [r for part in everyone for r in part]
    lengths = [(r.encoding["input_ids"].shape[1], len(r.token_ids)) for r in rows]
    plan = balanced_passes(lengths, world if balance else 1, micro_batch, mini_batches, balance)
    return [[[rows[i] for i in micro] for micro in mini[rank if balance else 0]] for mini in plan]


def prompt_of(processor, row):
    """The row's prompt, encoded once: it passes through sequence_batch twice a step (log-probs, update)."""
    row.encoding = row.encoding or generate.encode(processor, row.messages)
    return row.encoding


def sequence_batch(processor, rows, device):
    """Prompt + response laid out as in generation: prompts left-padded to end at one column P, responses
    right-padded after it. Returns the model inputs, the responses (B, T) and the loss mask (B, T): 1 for the
    tokens the policy sampled, 0 for padding and for the '</think>' a forced exit wrote."""
    pad = processor.tokenizer.pad_token_id
    batch = generate.collate([prompt_of(processor, r) for r in rows], pad)                # (B, P) each
    T = max(len(r.token_ids) for r in rows)
    response = torch.full((len(rows), T), pad, dtype=torch.long)                          # (B, T)
    present, sampled = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        response[i, :len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
        present[i, :len(r.token_ids)] = 1
        sampled[i, :len(r.token_ids)] = torch.tensor(r.sampled_mask(), dtype=torch.float)
    batch["input_ids"] = torch.cat([batch["input_ids"], response], dim=1)                  # (B, P + T)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], present], dim=1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(response)], dim=1)
    return {k: v.to(device) for k, v in batch.items()}, response.to(device), sampled.to(device)


def token_logprobs(model, batch, response, temperature=1.0, chunk=1024):
    """log p(response token | everything before it), (B, T), and the per-token entropy (no grad), under the
    sampling distribution softmax(logits / temperature), so the PPO ratio compares what was actually sampled.

    Only the response positions meet the LM head, `chunk` of them at a time (sft.head_chunks): B x T x vocab
    logits never exist at once, in the forward or the backward.
    """
    positions, _ = generate.rope_positions(model, batch)  # explicit: never the model's cached rope_deltas
    B, T = response.shape
    hidden = sft.last_hidden(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=positions, **generate.vision_inputs(batch))      # (B, P + T, H)
    # Prompts are left-padded to end at one column, so the last T + 1 columns are [last prompt token, response]:
    # column P - 1 + t predicts response token t, for every row alike.
    h = hidden[:, -T - 1:-1].reshape(B * T, -1)                                             # (B*T, H)
    y = response.reshape(-1)                                                                # (B*T,)

    def logp_and_entropy(logits, s):                                                        # (chunk, vocab)
        lp = torch.log_softmax(logits / temperature, dim=-1)
        return lp.gather(-1, y[s, None])[:, 0], -(lp.exp() * lp).sum(-1).detach()          # (chunk,) each
    parts = sft.head_chunks(model, h, logp_and_entropy, chunk)
    return torch.cat([p[0] for p in parts]).view(B, T), torch.cat([p[1] for p in parts]).view(B, T)


def pad_rows(values, width, device):
    """Ragged per-row tensors into one (B, width) tensor, zero-padded."""
    out = torch.zeros(len(values), width, device=device)
    for i, v in enumerate(values):
        out[i, :len(v)] = v.to(device)
    return out


@torch.no_grad()
def reference_and_old_logprobs(policy, reference, processor, passes, *, temperature, need_old, device):
    """Each row's log-probs under the frozen reference (for the KL) and, with several PPO mini-batches, under the
    policy before any update (the 'old' of the ratio), micro-batch by micro-batch of `passes` (training_passes).
    With one mini-batch the update's own first forward is on-policy, so update() takes its log-probs, detached, as
    the old ones and this pass spends nothing on them."""
    if not need_old and reference is None:
        return
    for mb in (micro for mini in passes for micro in mini):
        batch, response, _ = sequence_batch(processor, mb, device)
        old = token_logprobs(policy, batch, response, temperature)[0] if need_old else None            # (B, T)
        ref = token_logprobs(reference, batch, response, temperature)[0] if reference is not None else None
        for i, r in enumerate(mb):
            n = len(r.token_ids)
            r.old_logp = old[i, :n].cpu() if old is not None else None
            r.ref_logp = ref[i, :n].cpu() if ref is not None else None


def policy_loss(logp, old_logp, ref_logp, advantages, mask, n_tokens, eps_low=0.2, eps_high=0.28, beta=0.01,
                dual_clip=3.0, weights=None):
    """The GRPO objective (eq. 2), negated for gradient descent, aggregated over tokens (not sequences).

    logp/old_logp/ref_logp/mask: (B, T) per response token (mask: 1 for tokens the policy sampled); advantages:
    (B,); n_tokens: masked tokens in the whole mini-batch on all ranks, so every token weighs the same whatever
    its sequence's length; weights: (B, T) of the rollout correction (rollout_weights), or None. The clamps are
    verl's numerical guards; they bind only far off-policy.
    """
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))                            # (B, T)
    adv = advantages[:, None]                                                               # (B, 1)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)  # clip-higher (§2.2)
    per_token = -surrogate                                                                  # (B, T)
    if dual_clip:  # dual-clip PPO (Ye et al. 2020): a negative advantage cannot push a token's loss above c|A|
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * dual_clip), per_token)
    if weights is not None:  # the rollout correction weighs the policy-gradient term, not the KL (as verl does)
        per_token = per_token * weights
    kl = torch.zeros_like(logp)
    if beta:  # k3, Schulman's unbiased low-variance estimator of KL(policy || reference): r - log r - 1 >= 0
        log_r = torch.clamp(ref_logp - logp, -20.0, 20.0)
        kl = torch.clamp(torch.exp(log_r) - log_r - 1, max=10.0)                            # (B, T)
        per_token = per_token + beta * kl
    loss = (per_token * mask).sum() / n_tokens                                              # scalar
    with torch.no_grad():  # 0-d tensors: summing them needs no device sync per micro-batch
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"kl": (kl * mask).sum(), "clipped": (clipped.float() * mask).sum(),
                 "ratio_dev": ((ratio - 1).abs() * mask).amax()}
    return loss, stats


def rollout_weights(old_logp, sample_logp, mask, mode="none", cap=2.0):
    """The correction for the gap between the distribution a token was sampled from (the inference copy's, in its
    dtype) and the policy trained on it ('old'), as verl's rollout correction in its decoupled mode (Liu et al.
    2025, "When Speed Kills Stability"): token, truncated importance sampling, w = min(pi_old / pi_sample, cap) per
    token; sequence, a response whose ratio prod(pi_old / pi_sample) leaves [1/cap, cap] weighs 0 (verl's
    rollout_rs "seq_sum_k1"); none: None. (B, T), no gradient; exp(±20) bounds the ratio, as in verl."""
    if mode == "none":
        return None
    log_ratio = torch.clamp(old_logp - sample_logp, -20.0, 20.0) * mask                    # (B, T)
    if mode == "token":
        return torch.clamp(torch.exp(log_ratio), max=cap).detach()
    inside = log_ratio.sum(-1, keepdim=True).abs() <= math.log(cap)                        # (B, 1)
    return inside.float().expand_as(log_ratio).detach()


def update(policy, optimizer, processor, passes, *, temperature, eps_low, eps_high, beta, dual_clip, grad_clip,
           correction, cap, world, device):
    """Steps 5-6: policy_loss over the mini-batches of `passes` (training_passes; each one AdamW step), micro-batch
    by micro-batch (each one forward and backward, gradients reduce-scattered at once). Returns the sums the
    metrics are made of, the rollout-policy gap among them: |log pi_old - log pi_sample| per sampled token."""
    sums = ["loss", "kl", "clipped", "entropy", "tokens", "gap", "gap_outside"]  # added up over micro-batches
    stats = dict.fromkeys([*sums, "grad_norm", "ratio_dev", "gap_max"], 0.0)
    for mini in passes:
        # sampled tokens in the mini-batch, all ranks
        n_tokens = all_reduce_sum(torch.tensor(float(sum(sum(r.sampled_mask()) for mb in mini for r in mb)),
                                               device=device))
        parts = []  # each micro-batch's statistics as tensors, read once at the mini-batch's end (one device sync)
        for mb in mini:
            batch, response, mask = sequence_batch(processor, mb, device)
            logp, entropy = token_logprobs(policy, batch, response, temperature)                     # (B, T)
            T = response.shape[1]
            old = logp.detach() if mb[0].old_logp is None else pad_rows([r.old_logp for r in mb], T, device)
            ref = pad_rows([r.ref_logp for r in mb], T, device) if beta else logp.detach()
            sample = pad_rows([torch.tensor(r.sample_logp) for r in mb], T, device)                  # (B, T)
            gap = (old - sample).abs() * mask
            loss, part = policy_loss(logp, old, ref, torch.tensor([r.advantage for r in mb], device=device), mask,
                                     n_tokens, eps_low, eps_high, beta, dual_clip,
                                     rollout_weights(old, sample, mask, correction, cap))
            (loss * world).backward()  # FSDP averages gradients over ranks; the loss is already a global mean
            parts.append(torch.stack([loss.detach(), part["kl"], part["clipped"], (entropy * mask).sum(), mask.sum(),
                                      gap.sum(), ((gap > math.log(2)) * mask).sum(),  # pi_old/pi_sample outside [.5, 2]
                                      part["ratio_dev"], gap.max()]))
        read = torch.stack(parts)                                                      # (micro-batches, 9)
        totals, largest = read[:, :len(sums)].sum(0).tolist(), read[:, len(sums):].amax(0).tolist()
        stats.update({k: stats[k] + v for k, v in zip(sums, totals)})
        stats["ratio_dev"], stats["gap_max"] = max(stats["ratio_dev"], largest[0]), max(stats["gap_max"], largest[1])
        stats["grad_norm"] = clip_grad_norm([p for p in policy.parameters() if p.requires_grad], grad_clip)
        refuse_non_finite(stats["grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stats


@torch.no_grad()
def refresh_inference_copy(policy, copy, everything=False):
    """Step 7: the trained (FSDP-sharded) weights into the unsharded model that generates rollouts. Only what trains
    moves: frozen weights (the vision tower, --freeze-layers) were filled once, with `everything` (and buffers, the
    rotary inv_freq); each shard is cast to the copy's dtype before the all-gather (a bf16 copy: half the bytes of
    fp32). One tensor at a time, so no more than one full tensor is ever gathered. Collective: every rank calls it.
    Returns the bytes gathered."""
    copies = dict(copy.named_parameters()) | dict(copy.named_buffers())
    gathered = 0
    for name, p in [*policy.named_parameters(), *(policy.named_buffers() if everything else [])]:
        if everything or p.requires_grad:
            whole = full_tensor(p.to(copies[name].dtype))
            copies[name].copy_(whole)
            gathered += whole.numel() * whole.element_size()
    return gathered


def step_metrics(rows, reward, advantages, stats, decoding, group_size, device):
    """One step's numbers for metrics.jsonl, each formula beside its name, every sum taken over all ranks.

    Figure 5 of the paper plots: reward ("training reward"), loss ("policy gradient loss"), advantage ("mean
    advantage"), response_len ("mean training response length") and truncated ("training response clip ratio":
    the share of responses cut at --max-new-tokens). Also here: response_len_max; flat_groups, the share of groups
    whose rewards are all equal (no gradient); forced_exit, the share the forced exit ended (§2.1); tagged, the
    share with an <answer>...</answer>; kl (k3) and entropy per sampled token; ppo_clipped, PPO's clip fraction,
    the share of tokens whose ratio was clipped; ratio_dev, the largest |ratio - 1| (0 on-policy); grad_norm;
    decode_forwards, the rollouts' decode steps on the slowest rank, and occupancy, live rows per step over slots;
    the rollout-policy gap per sampled token: rollout_gap_mean and _max of |log pi_old - log pi_sample|, and
    rollout_gap_outside, the share whose ratio pi_old / pi_sample leaves [0.5, 2] (verl's rollout_probs_diff_*).
    """
    lengths = [len(r.token_ids) for r in rows]
    total = all_reduce_dict({
        "responses": len(rows), "reward": reward.sum().item(), "advantage": advantages.sum().item(),
        "groups": len(rows) // group_size, "flat_groups": (reward.view(-1, group_size).std(1) == 0).sum().item(),
        "response_tokens": sum(lengths), "truncated": sum(r.finish_reason == "length" for r in rows),
        "forced_exit": sum(r.finish_reason == "forced_exit" for r in rows),
        "tagged": sum(rewards.tagged(r.text) for r in rows),
        "kl": stats["kl"], "ppo_clipped": stats["clipped"], "entropy": stats["entropy"], "gap": stats["gap"],
        "gap_outside": stats["gap_outside"],
        "loss_tokens": stats["tokens"], "loss": stats["loss"], "occupancy": decoding["occupancy"], "ranks": 1}, device)
    largest = all_reduce_dict({"response_len_max": max(lengths), "ratio_dev": stats["ratio_dev"],
                               "decode_forwards": decoding["decode_forwards"], "gap_max": stats["gap_max"]}, device,
                              "max")
    per_response, per_token = total["responses"], max(total["loss_tokens"], 1)
    return {"reward": total["reward"] / per_response, "advantage": total["advantage"] / per_response,
            "loss": total["loss"], "response_len": total["response_tokens"] / per_response,
            "response_len_max": largest["response_len_max"], "truncated": total["truncated"] / per_response,
            "forced_exit": total["forced_exit"] / per_response, "tagged": total["tagged"] / per_response,
            "flat_groups": total["flat_groups"] / total["groups"], "kl": total["kl"] / per_token,
            "ppo_clipped": total["ppo_clipped"] / per_token, "entropy": total["entropy"] / per_token,
            "ratio_dev": largest["ratio_dev"], "grad_norm": stats["grad_norm"],
            "decode_forwards": largest["decode_forwards"], "occupancy": total["occupancy"] / total["ranks"],
            "rollout_gap_mean": total["gap"] / per_token, "rollout_gap_max": largest["gap_max"],
            "rollout_gap_outside": total["gap_outside"] / per_token}

def training_state(policy, optimizer, reference):
    """What --offload parks in host memory while the inference copy generates: policy shards, AdamW, reference."""
    return [*policy.parameters(), *optimizer_state(optimizer),
            *(reference.parameters() if reference is not None else [])]


def grpo_step(policy, reference, infer, optimizer, processor, prompts, keys, args, rank, world, device, progress):
    """Steps 1-7 on this rank's prompts (the training passes: the step's rows dealt over all ranks). With --offload,
    the training state waits in host memory while the inference copy generates, and the copy waits while the
    policy trains; the weights the refresh will overwrite are dropped, not copied out and back."""
    clock = runs.Stopwatch()
    trained = {name for name, p in policy.named_parameters() if p.requires_grad}
    frozen = [p for name, p in infer.named_parameters() if name not in trained]
    refreshed = [p for name, p in infer.named_parameters() if name in trained]
    with parked(training_state(policy, optimizer, reference), args.offload):
        # 1. rollouts; seeds follow (step, prompt), not the rank
        decoding = {}  # this rank's decode forwards and slot occupancy
        rows = rollouts(infer, processor, prompts, keys, group_size=args.group_size,
                        temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                        think_budget=args.think_budget, answer_budget=args.answer_budget, gen_batch=args.gen_batch,
                        progress=progress, stats=decoding)
    clock.lap("generate")
    with parked(frozen, args.offload), parked(refreshed, args.offload, keep=False):
        # 2-3. rewards, and each response's advantage within its group
        reward = score_rollouts(rows, args.reward_processes, args.truncated)                 # (N,)
        clock.lap("reward")
        advantages = group_advantages(reward.view(-1, args.group_size), scale=not args.no_std).view(-1)  # (N,)
        for row, a in zip(rows, advantages.tolist()):
            row.advantage = a
        # 4. the step's rows dealt to ranks and micro-batches; log-probs under the reference (and the old policy,
        # with several PPO mini-batches)
        passes = training_passes(rows, processor, micro_batch=args.micro_batch, mini_batches=args.ppo_mini_batches,
                                 balance=args.balance == "length", rank=rank, world=world)
        reference_and_old_logprobs(policy, reference, processor, passes, temperature=args.temperature,
                                   need_old=args.ppo_mini_batches > 1, device=device)
        clock.lap("logprob")
        # 5-6. the loss and the update
        policy.train()
        stats = update(policy, optimizer, processor, passes, temperature=args.temperature, eps_low=args.eps_low,
                       eps_high=args.eps_high, beta=args.beta, dual_clip=args.dual_clip, grad_clip=args.grad_clip,
                       correction=args.rollout_correction, cap=args.rollout_cap, world=world, device=device)
    # 7. the new weights into the inference copy
    refresh_inference_copy(policy, infer)
    clock.lap("update")
    return {**step_metrics(rows, reward, advantages, stats, decoding, args.group_size, device), **clock.laps}


def validate(infer, processor, prompts, args, rank, world, device):
    """--eval-every: the held-out prompts answered greedily by the inference copy and scored as training scores them
    (tags required, a response cut at the cap earns 0): val_reward, the share right, and val_tagged, the share that
    answered inside <answer> tags. Each rank answers every world-th prompt."""
    mine = shard(prompts, rank, world)
    completions = generate.generate(infer, processor, [p["messages"] for p in mine], max_new_tokens=args.max_new_tokens,
                                    think_budget=args.think_budget, answer_budget=args.answer_budget,
                                    batch_size=args.gen_batch) if mine else []
    right = rewards.batch_rewards([c.text for c in completions], [p["answer"] for p in mine],
                                  [p["options"] for p in mine], processes=args.reward_processes, require_tags=True)
    total = all_reduce_dict({
        "right": sum(r for r, c in zip(right, completions) if c.finish_reason != "length"), "n": len(mine),
        "tagged": sum(rewards.tagged(c.text) for c in completions)}, device)
    return {"val_reward": total["right"] / total["n"], "val_tagged": total["tagged"] / total["n"]}


def lr_at(step, args, total):
    """B.2: linear warm-up over the first 10% of steps, then constant."""
    return args.lr * min(1.0, (step + 1) / max(1, int(args.warmup * total)))


# ====================================================================================================
# The loop

CURVES = [("reward", ["reward"]), ("response length (tokens)", ["response_len", "response_len_max"]), ("KL", ["kl"]),
          ("entropy", ["entropy"]), ("truncated share", ["truncated"]), ("forced-exit share", ["forced_exit"]),
          ("PPO clip fraction", ["ppo_clipped"]), ("tagged answers", ["tagged"]),
          ("rollout-policy gap |log pi_old - log pi_sample|", ["rollout_gap_mean", "rollout_gap_max"]),
          ("validation (held out, greedy)", ["val_reward", "val_tagged"])]


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    policy, reference, infer, optimizer, processor, prompts, held_out = setup(args, rank, world, device)
    steps_per_epoch = max(1, len(prompts) // args.prompts_per_step)  # an epoch: one pass over the prompts
    total = steps_per_epoch * args.epochs if args.max_steps is None else args.max_steps
    # the run owns --out from here: a second run into it is refused
    with runs.locked(args.out, rank, device, lambda: runs.check_run_dir(args, MAY_CHANGE_ON_RESUME)):
        state = checkpoints.load_checkpoint(policy, optimizer, args.resume, rank, world) if args.resume else {"step": 0}
        if args.resume:
            refresh_inference_copy(policy, infer, everything=True)
        runs.start_run(args, "grpo", rank, world, state["step"] if args.resume else None)
        metrics, preempt = runs.Metrics(args.out, rank, CURVES, f"grpo.py --out {args.out}"), runs.Preemption(device)
        bar = tqdm(total=total, initial=state["step"], disable=rank != 0, desc="grpo")
        step = state["step"]

        def validation(step):  # --eval-every: at step 0 and every N steps (a resumed run keeps the schedule)
            if not (args.eval_every and step % args.eval_every == 0):
                return {}
            with parked(training_state(policy, optimizer, reference), args.offload):
                return validate(infer, processor, held_out, args, rank, world, device)
        if step == 0 and (first_row := validation(0)):
            metrics.log(step=0, **first_row)
        while step < total:
            epoch, index = divmod(step, steps_per_epoch)
            order = list(range(len(prompts)))
            random.Random(args.seed * 1000 + epoch).shuffle(order)
            first = index * args.prompts_per_step
            mine = shard(order[first:first + args.prompts_per_step], rank, world)
            lr = lr_at(step, args, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            keys = [(args.seed, step, i) for i in mine]  # the rollouts' seeds: (step, prompt), not the rank
            row = grpo_step(policy, reference, infer, optimizer, processor, [prompts[i] for i in mine], keys, args,
                            rank, world, device, progress=rank == 0)
            step += 1
            row = {"step": step, "epoch": epoch, **row, "lr": lr, **validation(step)}
            metrics.log(**row)
            bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.4f}", len=f"{row['response_len']:.0f}")
            bar.update(1)
            due = bool(args.save_every and step % args.save_every == 0)
            if checkpoints.save_if_due(preempt, policy, optimizer, processor, args, step, total, rank, due):
                break
        bar.close()
        metrics.draw()
        preempt.close()
    return policy


def setup(args, rank, world, device):
    """Inputs checked before anything loads or is written; then the prompts, the sharded policy, the frozen
    reference, the unsharded inference copy and AdamW."""
    preset = toy_preset(args, {"prompts_per_step": 16, "group_size": 8, "max_new_tokens": 48, "max_steps": 80,
                               "lr": 3e-4, "beta": 0.0, "micro_batch": 32, "warmup": 0.0, "save_every": 0,
                               "eval_every": 10, "eval_size": 16}) \
        if args.data == "toy" else ""  # the toy sums on a CPU: reward rises, the format stays
    args.model = data.check_model(args.model)  # first: a run directory becomes its final/, as the run records it
    runs.check_run_dir(args, MAY_CHANGE_ON_RESUME)
    if args.prompts_per_step % world:
        raise DataError(f"--prompts-per-step {args.prompts_per_step} is not a multiple of {world} ranks")
    torch.manual_seed(args.seed)
    prompts, held_out = held_out_prompts(data.load_rl_data(args.data), args)
    if len(prompts) < args.prompts_per_step:
        raise DataError(f"{len(prompts)} prompts" + (f" (with {len(held_out)} held out for --eval-every)" if held_out
                        and not args.eval_data else "") + f" cannot fill one step of --prompts-per-step "
                        f"{args.prompts_per_step}")
    if preset and rank == 0:
        print(preset, file=sys.stderr)
    processor = data.load_processor(args.model)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    # fp32 master weights, sharded, with activation checkpointing on GPU (4,096-token responses)
    policy = sft.load_sharded(args.model, device, checkpointing=device.type == "cuda")
    sft.freeze_lowest(policy, args.freeze_layers)
    reference = None
    if args.beta:  # frozen, so its shards need no fp32 master copy
        reference = sft.load_sharded(args.model, device, dtype=compute).eval().requires_grad_(False)
    infer = inference_copy(policy, args.model, compute, device)  # unsharded, for rollouts
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    return policy, reference, infer, optimizer, processor, prompts, held_out


def held_out_prompts(prompts, args):
    """(the prompts to train on, the prompts --eval-every scores): --eval-data, or --eval-size prompts held out of
    --data by a fixed draw (the same whatever --seed), never trained on. Without --eval-every, all of --data trains."""
    if not args.eval_every:
        return prompts, []
    if args.eval_data:
        return prompts, data.load_rl_data(args.eval_data)
    if args.eval_size >= len(prompts):
        raise DataError(f"--eval-size {args.eval_size} would hold out all {len(prompts)} prompts of --data")
    held = set(random.Random(0).sample(range(len(prompts)), args.eval_size))
    return [p for i, p in enumerate(prompts) if i not in held], [prompts[i] for i in sorted(held)]


# ====================================================================================================
# The inference copy, and ragged rows into one tensor

def inference_copy(policy, name, dtype, device):
    """An unsharded copy of the policy for rollouts, built empty and filled from the policy's shards (no second
    read of the checkpoint from disk)."""
    with torch.device("meta"):
        copy = data.model_from_config(name, dtype)
    copy.to_empty(device=device)
    refresh_inference_copy(policy, copy, everything=True)
    return copy.eval()


if __name__ == "__main__":
    cli(main)
