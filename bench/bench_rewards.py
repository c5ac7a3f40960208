"""Verifier throughput: answers/second on a mixed set, one thread vs batch_rewards with helper processes, and
side by side with the sympy-based `math-verify` (optional: `pip install math-verify`), its agreement with us.

    python bench/bench_rewards.py [--processes 4]

A GRPO step scores 128 prompts x 8 responses = 1,024 answers; this prints how long that takes. The set mixes right
and wrong answers in the shapes rollouts write: fractions, roots, units, tuples, sets, equations, several boxed
answers, named answers, relations and intervals, chains, percentages.
"""
import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rewards  # noqa: E402

# (response answer, gold): right and wrong answers in the shapes GRPO rollouts produce.
PAIRS = [("\\dfrac{3}{4}", "0.75"), ("0.7", "\\frac34"), ("42", "42"), ("x = 11", "11"), ("125 miles", "125"),
         ("\\sqrt{12}", "2\\sqrt3"), ("4\\sqrt2", "4"), ("(1, 2)", "(1,2)"), ("\\{3,1,2\\}", "\\{1,2,3\\}"),
         ("[0,9)", "(0,9)"), ("x^2+2x+1", "(x+1)^2"), ("\\sin^2 x+\\cos^2 x", "1"), ("7,425,000", "7425000"),
         ("2x+4y-3=0", "y=-\\frac12 x+\\frac34"), ("\\frac{\\pi}{3}", "60"), ("1\\pm\\sqrt2", "1+\\sqrt2,1-\\sqrt2"),
         ("red", "blue"), ("50\\%", "50"), ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
         ("q-p", "p-q"),
         # the forms of issue #34: several answers, names, relations, chains, percent, spellings
         ("\\boxed{2}, \\boxed{5}", "2, 5"), ("\\boxed{2}, \\boxed{5}", "5"), ("k = 45, n = 2", "n = 2, k = 45"),
         ("(3, 2), (2, 3)", "(2,3),(3,2)"), ("(3, 2)", "(2, 3)"), ("|AB| = 5", "5"), ("x \\geq 5", "[5, \\infty)"),
         ("-3 < y < 4", "(-3, 4)"), ("x > 5", "x \\geq 5"), ("y = 3+4 = 7", "7"), ("28\\%", "28 pct"), ("004", "4"),
         ("1 000", "1000"), ("\\cfrac{1}{3}", "\\frac13")]


def main(processes=4, n=1024):
    rng = random.Random(0)
    sample = [rng.choice(PAIRS) for _ in range(n)]
    responses = [f"<think>work</think><answer>{p}</answer>" for p, _ in sample]
    golds = [g for _, g in sample]
    rewards.math_equal("1", "2")  # start the helper outside the timing
    t = time.perf_counter()
    serial = rewards.batch_rewards(responses, golds, processes=1)
    t_serial = time.perf_counter() - t
    rewards.batch_rewards(responses[:processes * 4], golds[:processes * 4], processes=processes)  # warm helpers
    t = time.perf_counter()
    pooled = rewards.batch_rewards(responses, golds, processes=processes)
    t_pool = time.perf_counter() - t
    assert pooled == serial
    print(f"{n} answers ({sum(serial):.0f} correct)")
    print(f"  1 thread:              {n / t_serial:8.0f} answers/s  ({t_serial:.2f} s per GRPO step)")
    print(f"  batch_rewards x{processes}:      {n / t_pool:8.0f} answers/s  ({t_pool:.2f} s)  ratio {t_serial / t_pool:.2f}x")
    try:
        from math_verify import parse, verify
    except ImportError:
        print("  math-verify not installed: no side-by-side comparison")
        return
    t = time.perf_counter()
    theirs = [float(verify(parse(f"${g}$"), parse(f"${p}$"))) for p, g in sample]
    t_mv = time.perf_counter() - t
    agree = sum(a == b for a, b in zip(theirs, serial)) / n
    print(f"  math-verify, 1 thread: {n / t_mv:8.0f} answers/s  ({t_mv:.2f} s)  ours is {t_mv / t_serial:.1f}x faster")
    print(f"  agreement with math-verify: {agree:.1%} of answers, {sum(theirs):.0f} right by its verdict")
    for (p, g), ours, mv in zip(sample, serial, theirs):
        if ours != mv:
            print(f"    differ: {p!r} vs {g!r}: ours {ours:.0f}, math-verify {mv:.0f}")
            break


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=4, help="verifier helper processes (grpo.py's default)")
    main(ap.parse_args().processes)
