"""GRPO's training passes at the paper's scale: padding and the slowest rank, rows in rollout order against rows
dealt by length (grpo.balanced_passes, the function grpo.py runs), on a stated length distribution.

    python bench/bench_grpo.py            # a table for 8 and 32 ranks
    python bench/bench_grpo.py --json     # and one JSON line at the end

The step (B.2): 128 prompts x 8 samples, micro-batches of 4 rows (grpo.py's default), one PPO mini-batch.
Assumed lengths (ours, not measured): prompt tokens lognormal with median 120 and sigma 0.5, capped at 1,024, shared
by a prompt's 8 samples; response tokens lognormal with median 2,000 and sigma 0.6, capped at 4,096 (B.2's cap; ~12%
of responses reach it). A micro-batch costs its rows x (widest prompt + longest response) tokens: prompts are
left-padded to end at one column and responses right-padded after it (grpo.sequence_batch).

    padding            the share of a pass's tokens that are padding
    slowest_over_mean  the slowest rank's tokens over the mean rank's
    lockstep_over_mean  sum over micro-batch indices k of the largest rank's k-th micro-batch, over the mean rank's
                       tokens: FSDP runs every rank's k-th micro-batch together (its all-gathers pair them up), so
                       this, not the slowest rank's total, is what a pass waits for
Each figure is the mean over --seeds draws of the lengths.
"""
import argparse
import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402


def step_lengths(rng, prompts=128, group=8):
    """(prompt, response) tokens of one step's rows, prompt by prompt (rank by rank, as rollouts() makes them)."""
    rows = []
    for _ in range(prompts):
        prompt = min(int(rng.lognormvariate(math.log(120), 0.5)), 1024)
        rows += [(prompt, min(int(rng.lognormvariate(math.log(2000), 0.6)), 4096)) for _ in range(group)]
    return rows


def costs(lengths, plan):
    """padding, slowest_over_mean and lockstep_over_mean of a plan (grpo.balanced_passes' passes[m][r])."""
    padded = lambda micro: len(micro) * (max(lengths[i][0] for i in micro) + max(lengths[i][1] for i in micro))  # noqa
    world = len(plan[0])
    per_rank, lockstep, real = [0] * world, 0, sum(p + r for p, r in lengths)
    for mini in plan:
        for k in range(len(mini[0])):
            here = [padded(mini[r][k]) for r in range(world)]
            lockstep += max(here)
            per_rank = [a + b for a, b in zip(per_rank, here)]
    mean = sum(per_rank) / world
    return {"padding": 1 - real / sum(per_rank), "slowest_over_mean": max(per_rank) / mean,
            "lockstep_over_mean": lockstep / mean}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="8,32", help="world sizes, comma-separated")
    ap.add_argument("--micro-batch", type=int, default=4, help="rows per training forward (grpo.py's default)")
    ap.add_argument("--seeds", type=int, default=5, help="draws of the lengths, averaged")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    args = ap.parse_args(argv)
    result = {"micro_batch": args.micro_batch, "seeds": args.seeds}
    print(f"{'ranks':>5}  {'':>9}  {'padding':>8}  {'slowest/mean':>12}  {'lockstep/mean':>13}")
    for world in map(int, args.ranks.split(",")):
        for balance, name in ((False, "before"), (True, "after")):
            runs = [costs(lengths, grpo.balanced_passes(lengths, world, args.micro_batch, 1, balance))
                    for lengths in (step_lengths(random.Random(seed)) for seed in range(args.seeds))]
            mean = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
            for key, value in mean.items():
                result[f"{key}_{name}_{world}"] = round(value, 4)
            print(f"{world:>5}  {'rollout' if not balance else 'balanced':>9}  {mean['padding']:>8.1%}  "
                  f"{mean['slowest_over_mean']:>12.3f}  {mean['lockstep_over_mean']:>13.3f}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
