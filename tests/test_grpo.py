import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import torchrun

import data
import generate
import grpo
import sft
from plumbing import distributed



def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    a = grpo.group_advantages(r)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.8660
    assert a[0].tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)
    # group 2: mean 0.75, std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5 -> 0.5, 0.5, 0.5, -1.5
    assert a[1].tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5], abs=1e-5)
    assert a[2].tolist() == [0.0] * 4 and not torch.isnan(a).any()  # identical rewards: no signal, no NaN
    assert grpo.group_advantages(r, scale=False)[1].tolist() == pytest.approx([0.25, 0.25, 0.25, -0.75])


def naive_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, dual_clip=3.0):
    """The objective written token by token in plain Python, independently of policy_loss: the clipped surrogate
    with clip-higher, dual-clip (a token with A < 0 costs at most dual_clip * |A|), and beta times k3."""
    total, count = 0.0, 0
    for i in range(len(logp)):
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            loss = -min(ratio * adv[i], clipped * adv[i])
            if dual_clip and adv[i] < 0:
                loss = min(loss, -adv[i] * dual_clip)
            d = ref[i][t] - logp[i][t]
            total += loss + beta * (math.exp(d) - d - 1)
            count += 1
    return total / count


def test_policy_loss_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.4  # ratios from ~0.3 to ~3: all three clip regions
    logp[1, :2] = old[1, :2] + math.log(5.0)  # and far off-policy where A < 0: the dual-clip region
    ref = old + torch.randn(B, T, generator=g) * 0.2
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5, 0.9, -0.2])
    lengths = [9, 3, 5, 1, 7, 9]  # responses of different lengths
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths], dtype=torch.float)
    ratio = torch.exp(logp - old)
    assert ((ratio < 0.8) * mask).sum() > 0 and ((ratio > 1.28) * mask).sum() > 0
    assert (((ratio > 0.8) & (ratio < 1.28)) * mask).sum() > 0
    assert (((ratio > 3.0) & (adv[:, None] < 0)) * mask).sum() > 0
    loss, stats = grpo.policy_loss(logp, old, ref, adv, mask, mask.sum(), 0.2, 0.28, 0.05)  # dual-clip 3: default
    expected = naive_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 0.05)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # a per-sequence mean (then a mean over sequences) weighs short responses more: a different number
    per_token = (loss * mask.sum()).item()
    per_seq = sum(naive_loss([logp[i].tolist()], [old[i].tolist()], [ref[i].tolist()], [adv[i].item()],
                             [mask[i].tolist()], 0.2, 0.28, 0.05) for i in range(B)) / B
    assert abs(per_seq - per_token / mask.sum().item()) > 1e-3
    assert stats["clipped"] > 0


def test_kl_term_is_nonnegative_and_zero_at_the_reference():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(4, 5, generator=g)
    mask = torch.ones(4, 5)
    zero_adv = torch.zeros(4)
    _, same = grpo.policy_loss(logp, logp, logp, zero_adv, mask, 20, beta=1.0)
    assert same["kl"] == 0.0
    ref = logp + torch.randn(4, 5, generator=g)
    loss, other = grpo.policy_loss(logp, logp, ref, zero_adv, mask, 20, beta=1.0)
    assert other["kl"] > 0 and loss.item() > 0


def rows_for(model, processor, n_tokens=6):
    """Two fixed responses to the same prompt, one rewarded, one not."""
    prompt = data.load_rl_data("toy")[0]
    rows = []
    for k, adv in enumerate([1.0, -1.0]):
        ids = [processor.tokenizer.convert_tokens_to_ids(c) for c in "abcdef"[k:k + n_tokens // 2]] * 2
        rows.append(grpo.Rollout(prompt["messages"], prompt["answer"], prompt["options"], ids, None, [0.0] * len(ids),
                                 "", "length", advantage=adv))
    return rows


def sequence_logprob(model, processor, rows):
    batch, response, mask = grpo.sequence_batch(processor, rows, torch.device("cpu"))
    with torch.no_grad():
        logp, _ = grpo.token_logprobs(model, batch, response)
    return (logp * mask).sum(1)


def args_for(*extra):
    return grpo.parse_args(["--model", "tiny", "--micro-batch", "1", "--lr", "1e-3", *extra])


def passes(processor, rows, args):
    return grpo.training_passes(rows, processor, micro_batch=args.micro_batch, mini_batches=args.ppo_mini_batches,
                                balance=args.balance == "length", rank=0, world=1)


def logprobs(policy, reference, processor, rows, args):
    grpo.reference_and_old_logprobs(policy, reference, processor, passes(processor, rows, args),
                                    temperature=args.temperature, need_old=args.ppo_mini_batches > 1,
                                    device=torch.device("cpu"))


def update(policy, optimizer, processor, rows, args):
    return grpo.update(policy, optimizer, processor, passes(processor, rows, args), temperature=args.temperature,
                       eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta, dual_clip=args.dual_clip,
                       grad_clip=args.grad_clip, correction=args.rollout_correction, cap=args.rollout_cap, world=1,
                       device=torch.device("cpu"))


def rollouts(model, processor, prompts, args, seeds):
    return grpo.rollouts(model, processor, prompts, [(s,) for s in seeds], group_size=args.group_size,
                         temperature=args.temperature,
                         max_new_tokens=args.max_new_tokens, think_budget=args.think_budget,
                         answer_budget=args.answer_budget, gen_batch=args.gen_batch)


def test_a_prompt_is_encoded_once_for_its_group_in_generation_and_once_in_training(model, processor, monkeypatch):
    """A step's 8 samples of a prompt share its messages: the chat template runs once per prompt for generation and
    once for the training passes (it was 2 x 8 times; a third of a toy step's CPU time), and every row's prompt
    tokens are still the ones its own encoding gives."""
    calls = []
    encode = generate.encode
    monkeypatch.setattr(generate, "encode", lambda proc, chat: calls.append(chat) or encode(proc, chat))
    prompts = data.load_rl_data("toy")[:2]
    rows = rollouts(model, processor, prompts, args_for("--group-size", "4", "--max-new-tokens", "4"), seeds=[1, 2])
    assert len(rows) == 8 and len(calls) == 2
    passes(processor, rows, args_for("--micro-batch", "4"))
    assert len(calls) == 4
    for r in rows:
        assert torch.equal(r.encoding["input_ids"], encode(processor, r.messages)["input_ids"])


def test_one_update_moves_probability_towards_rewarded_responses(model, processor):
    rows = rows_for(model, processor)
    args = args_for("--beta", "0")
    logprobs(model, None, processor, rows, args)
    before = sequence_logprob(model, processor, rows)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    stats = update(model, opt, processor, rows, args)
    after = sequence_logprob(model, processor, rows)
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3
    # first step, one mini-batch: the ratio is exactly 1, the surrogate is -mean(A) = 0 for equal lengths,
    # yet the gradient is not zero; that is why the metrics report reward and grad norm, not only the loss
    assert abs(stats["loss"]) < 1e-6 and stats["grad_norm"] > 1e-3 and stats["clipped"] == 0


def test_kl_alone_pulls_the_policy_towards_the_reference(model, processor):
    reference = data.load_model("tiny").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)  # the policy has drifted from the reference
    rows = rows_for(model, processor)
    for r in rows:
        r.advantage = 0.0  # no reward signal: only the KL penalty acts
    args = args_for("--beta", "1.0")
    logprobs(model, reference, processor, rows, args)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01)

    def kl():
        batch, response, mask = grpo.sequence_batch(processor, rows, torch.device("cpu"))
        with torch.no_grad():
            logp, _ = grpo.token_logprobs(model, batch, response)
        ref = grpo.pad_rows([r.ref_logp for r in rows], response.shape[1], torch.device("cpu"))
        return grpo.policy_loss(logp, logp, ref, torch.zeros(2), mask, mask.sum(), beta=1.0)[1]["kl"]
    kls = [kl()]
    for _ in range(4):
        update(model, opt, processor, rows, args)
        kls.append(kl())
    assert kls[0] > 0 and all(b < a for a, b in zip(kls, kls[1:])) and kls[-1] < 0.3 * kls[0], kls


def test_refresh_makes_the_inference_copy_equal_the_trained_weights(model):
    copy = data.load_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))
    grpo.refresh_inference_copy(model, copy)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))


def test_logprobs_after_generation_ignore_cached_rotary_state(model, processor):
    from PIL import Image
    fresh = data.load_model("tiny").eval()
    image_chat = [data.user_message("Describe", [Image.new("RGB", (84, 84), (5, 90, 200))])]
    inputs = processor.apply_chat_template(image_chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    model.generate(**inputs, max_new_tokens=3, do_sample=False)  # transformers caches rope_deltas here
    assert model.model.rope_deltas is not None
    rows = rows_for(model, processor) * 2  # a text batch of another shape
    assert torch.allclose(sequence_logprob(model, processor, rows), sequence_logprob(fresh, processor, rows))


def run(args, nproc, threads=1):
    """grpo.py as its command line runs it; under torchrun no rank may leave its process group alive at exit."""
    r, at_exit = torchrun("grpo.py", args, nproc, env={"OMP_NUM_THREADS": str(threads)})
    if nproc > 1 and r.returncode == 0:
        assert at_exit == {k: "destroyed" for k in range(nproc)}, at_exit
    return r


def steps(out):
    """metrics.jsonl's training steps (a validation-only row, step 0 of --eval-every, left out)."""
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in row]


def validations(out):
    return [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_reward" in row]


def test_two_ranks_match_one_process(sft_tiny, tmp_path):
    """One process; two ranks with the step's rows dealt by length (and --offload); two ranks each training its own
    rows in rollout order (--balance off): the same loss, metrics and weights, so dealing moves rows and not the
    gradient. The validation at step 0 (the toy preset's --eval-every) is the same on one rank and two."""
    path, _ = sft_tiny
    common = ["--model", path, "--data", "toy", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens",
              "24", "--max-steps", "1", "--lr", "1e-3", "--micro-batch", "2", "--reward-processes", "1"]
    for name, nproc, extra in (("one", 1, []), ("two", 2, ["--offload"]), ("off", 2, ["--balance", "off"])):
        r = run([*common, "--out", str(tmp_path / name), *extra], nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two, off = (steps(tmp_path / n)[0] for n in ("one", "two", "off"))
    for key in ("reward", "response_len", "loss", "kl", "entropy", "rollout_gap_mean"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key
        assert off[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key
    assert validations(tmp_path / "two") == validations(tmp_path / "one") != []
    a, b, c = (data.load_model(str(tmp_path / n / "final")) for n in ("one", "two", "off"))
    assert max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters())) < 1e-5
    assert max((x - y).abs().max().item() for x, y in zip(b.parameters(), c.parameters())) < 1e-5


def test_metrics_cover_the_papers_curves(sft_tiny, tmp_path):
    path, _ = sft_tiny
    r = run(["--model", path, "--data", "toy", "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens",
             "16", "--max-steps", "2", "--think-budget", "8", "--answer-budget", "4", "--freeze-layers", "1",
             "--out", str(tmp_path)], 1)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = steps(tmp_path)
    before, after = data.load_model(path).state_dict(), data.load_model(str(tmp_path / "final")).state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}  # --freeze-layers 1: layer 0 stays as loaded
    assert moved and not any(".layers.0." in k for k in moved) and any(".layers.1." in k for k in moved)
    keys = {"reward", "flat_groups", "response_len", "response_len_max", "truncated", "forced_exit", "kl",
            "ppo_clipped", "entropy", "grad_norm", "lr", "loss", "sec_generate", "sec_reward", "sec_logprob",
            "sec_update", "rollout_gap_mean", "rollout_gap_max", "rollout_gap_outside"}
    assert keys <= rows[0].keys()
    assert rows[0]["forced_exit"] > 0  # budget 8 < the SFT'd model's ~20-token thought
    assert (tmp_path / "final" / "config.json").exists()
    import xml.etree.ElementTree as ET  # the paper's curves, drawn: one line per metric, its values attached
    lines = {p.get("data-label"): p for p in ET.parse(str(tmp_path / "curves.svg")).getroot().iter(
        "{http://www.w3.org/2000/svg}polyline")}
    assert set(lines) == {"reward", "response_len", "response_len_max", "kl", "entropy", "truncated", "forced_exit",
                          "ppo_clipped", "tagged", "rollout_gap_mean", "rollout_gap_max", "val_reward", "val_tagged"}
    plotted = [float(v) for v in lines["reward"].get("data-y").split(",") if v != "None"]  # step 0: validation only
    assert plotted == [r["reward"] for r in rows]


def test_grpo_raises_the_reward_of_an_sft_model(sft_tiny, tmp_path):
    """The learning check: from the tiny model SFT'd on the toy sums (right ~1 time in 4 when sampled), 80 GRPO
    steps (about a minute of CPU, fixed seeds) must raise the mean reward clearly while keeping the format: the
    reward reads only tagged answers, so dropping <think>/<answer> cannot pay (observed: 0.26 -> 0.42)."""
    path, _ = sft_tiny
    # the README's command, in a process of its own (as users run it): inside the test process, after the sft_tiny
    # fixture's training, the same 80 steps take 1.6x as long (the allocator's state; a bare matmul slows alike)
    r = run(["--model", path, "--data", "toy", "--reward-processes", "1", "--out", str(tmp_path)], 1,
            threads=os.cpu_count())  # the preset
    assert r.returncode == 0, r.stderr[-3000:]
    rows = steps(tmp_path)
    # validation while training (the preset's --eval-every 10): 16 held-out sums, greedy, at step 0 and every 10
    assert [v["step"] for v in validations(tmp_path)] == list(range(0, 81, 10))
    assert all(0 <= v["val_reward"] <= v["val_tagged"] <= 1 for v in validations(tmp_path))
    mean = lambda key, part: sum(r[key] for r in part) / len(part)  # noqa: E731
    first, last = mean("reward", rows[:15]), mean("reward", rows[-15:])
    assert last > first + 0.08, (first, last)
    assert mean("tagged", rows[-15:]) > 0.9 and mean("response_len", rows[-15:]) > 30  # the format is kept


# ----------------------------------------------------------------------------------------------------
# verl's objective, the sampling temperature, forced tokens, the saved forward

def test_dual_clip_by_hand():
    """verl's dual-clip (clip_ratio_c = 3): for A < 0 a token's loss is min(c|A|, max(-rA, -clip(r)A))."""
    logp = torch.log(torch.tensor([[5.0, 2.0, 0.5, 5.0]]))  # ratios 5, 2, 0.5, 5 against old log-probs of 0
    old, mask = torch.zeros(1, 4), torch.ones(1, 4)
    neg = torch.tensor([-1.0])
    # A = -1: -rA = 5, 2, 0.5, 5; -clip(r)A = 1.28, 1.28, 0.8, 1.28 -> max: 5, 2, 0.8, 5 -> capped at 3: 3, 2, 0.8, 3
    loss, _ = grpo.policy_loss(logp, old, old, neg, mask, 4, 0.2, 0.28, beta=0, dual_clip=3.0)
    assert loss.item() == pytest.approx((3 + 2 + 0.8 + 3) / 4)
    loss, _ = grpo.policy_loss(logp, old, old, neg, mask, 4, 0.2, 0.28, beta=0, dual_clip=0)
    assert loss.item() == pytest.approx((5 + 2 + 0.8 + 5) / 4)  # off: the ordinary clipped loss
    # A > 0: -min(rA, clip(r)A) = -1.28, -1.28, -0.5, -1.28, whatever dual-clip says
    loss, _ = grpo.policy_loss(logp, old, old, -neg, mask, 4, 0.2, 0.28, beta=0, dual_clip=3.0)
    assert loss.item() == pytest.approx((-1.28 - 1.28 - 0.5 - 1.28) / 4)
    # far off-policy: the log-ratio and the k3 value are clamped (verl's guards), so nothing overflows
    huge = torch.full((1, 4), 200.0)
    loss, stats = grpo.policy_loss(huge, old, old, -neg, mask, 4, beta=1.0)
    assert torch.isfinite(loss) and stats["kl"] == pytest.approx(4 * 10.0)


def test_logprobs_are_those_of_the_sampling_distribution(sft_tiny):
    """At temperature 0.7, token_logprobs equals log softmax(logits / 0.7) of a plain step-by-step forward, and
    the first update's ratio is exactly 1 (one mini-batch: old = the update's own log-probs, detached)."""
    path, _ = sft_tiny
    model, processor = data.load_model(path).eval(), data.load_processor(path)
    prompts = data.load_rl_data("toy")[:2]
    rows = rollouts(model, processor, prompts, args_for("--group-size", "2", "--temperature", "0.7",
                                                        "--max-new-tokens", "12"), seeds=[1, 2])
    batch, response, mask = grpo.sequence_batch(processor, rows, torch.device("cpu"))
    with torch.no_grad():
        logp, _ = grpo.token_logprobs(model, batch, response, temperature=0.7)
        prompt = generate.encode(processor, rows[0].messages)["input_ids"][0].tolist()
        ids = rows[0].token_ids
        for t in range(len(ids)):
            logits = model(input_ids=torch.tensor([prompt + ids[:t]])).logits[0, -1]
            assert logp[0, t].item() == pytest.approx(torch.log_softmax(logits / 0.7, -1)[ids[t]].item(), abs=1e-4)
    for r, a in zip(rows, [1.0, -1.0, 0.5, -0.5]):
        r.advantage = a
    args = args_for("--temperature", "0.7", "--beta", "0", "--micro-batch", "4")
    logprobs(model, None, processor, rows, args)
    params = [p for p in model.parameters() if p.requires_grad]
    stats = update(model, torch.optim.AdamW(params, lr=1e-3), processor, rows, args)
    assert stats["ratio_dev"] == 0.0 and stats["clipped"] == 0


def test_one_ppo_mini_batch_saves_the_old_logprob_forward(model, processor):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    rows = rows_for(model, processor)
    logprobs(model, None, processor, rows, args_for("--beta", "0"))
    assert calls == [] and all(r.old_logp is None for r in rows)  # no pass at all: nothing to compute
    logprobs(model, None, processor, rows, args_for("--beta", "0", "--ppo-mini-batches", "2"))
    assert len(calls) == 2 and all(r.old_logp is not None for r in rows)  # micro-batch 1: one forward a row


def test_forced_exit_tokens_carry_no_gradient(sft_tiny):
    """Rollouts with a think budget: the '</think>' the forced exit wrote is masked out of the loss."""
    path, _ = sft_tiny
    model, processor = data.load_model(path).eval(), data.load_processor(path)
    args = args_for("--group-size", "2", "--max-new-tokens", "20", "--think-budget", "6", "--answer-budget", "4")
    args.temperature = 0  # greedy rollouts, to know the forced tokens (grpo.py refuses 0: log-probs divide by it)
    rows = rollouts(model, processor, data.load_rl_data("toy")[:2], args, seeds=[0, 1])
    tok = processor.tokenizer
    for r in rows:
        assert r.finish_reason == "forced_exit" and len(r.sampled) == len(r.token_ids)
        forced = [t for t, s in zip(r.token_ids, r.sampled) if not s]
        assert forced and tok.decode(forced).strip() == "</think>"  # exactly the appended tokens
        assert r.sampled[:6] == [1] * 6 and tok.decode(r.token_ids[6:6 + len(forced)]).strip() == "</think>"
    _, _, mask = grpo.sequence_batch(processor, rows, torch.device("cpu"))
    assert mask.sum().item() == sum(sum(r.sampled) for r in rows)
    # the loss does not move when only the forced tokens' log-probs change
    logp = -torch.rand(mask.shape)
    moved = logp.clone()
    moved[mask == 0] -= 5.0
    zeros = torch.zeros(len(rows))
    a = grpo.policy_loss(logp, logp.detach() - 0.1, logp, zeros + 1, mask, mask.sum(), beta=0)[0]
    b = grpo.policy_loss(moved, logp.detach() - 0.1, logp, zeros + 1, mask, mask.sum(), beta=0)[0]
    assert a.item() == b.item()


def test_chunked_token_logprobs_equal_the_full_logits(model, processor):
    """token_logprobs through sft.head_chunks == log_softmax of the model's own logits for the response
    positions, values and gradients (relative 1e-6), for one chunk and for many."""
    rows = [grpo.Rollout(p["messages"], p["answer"], p["options"], list(range(40, 45 + 3 * i)), None, None, "",
                         "length") for i, p in enumerate(data.load_rl_data("toy")[:3])]  # ragged responses
    batch, response, mask = grpo.sequence_batch(processor, rows, torch.device("cpu"))
    model.double()  # float64 weights: only the order of sums, not the method, could make a difference
    positions, _ = generate.rope_positions(model, batch)
    T = response.shape[1]

    def grads(value):
        model.zero_grad()
        value.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros(()) for p in model.parameters()]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
                   logits_to_keep=T + 1).logits[:, :-1]
    full = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, response[..., None])[..., 0]
    full_grads = grads((full * mask).sum())
    for chunk in (4, 1024):
        logp, entropy = grpo.token_logprobs(model, batch, response, 0.7, chunk=chunk)
        assert torch.allclose(logp, full.detach(), atol=1e-6) and not entropy.requires_grad
        for a, b in zip(grads((logp * mask).sum()), full_grads):
            assert (a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-12


def test_offload_changes_where_state_waits_not_the_result(sft_tiny, tmp_path):
    """--offload parks the training state in host memory during rollouts and the inference copy during the
    update (storages resized to 0 and refilled): the run is the same, metric for metric and weight for weight."""
    path, _ = sft_tiny
    common = ["--model", path, "--data", "toy", "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens",
              "12", "--max-steps", "2", "--lr", "1e-3", "--micro-batch", "2", "--reward-processes", "1",
              "--save-every", "0"]
    grpo.main([*common, "--out", str(tmp_path / "plain")])
    grpo.main([*common, "--offload", "--out", str(tmp_path / "offload")])
    a, b = (steps(tmp_path / n) for n in ("plain", "offload"))
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if not k.startswith("sec_")} == \
            {k: v for k, v in y.items() if not k.startswith("sec_")}
    wa, wb = (data.load_model(str(tmp_path / n / "final")).state_dict() for n in ("plain", "offload"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_offload_frees_and_restores_storages():
    t = torch.arange(10.0)
    view = t[2:5]
    saved = distributed.offload([t, view])  # one storage, offloaded once
    assert len(saved) == 1 and t.untyped_storage().nbytes() == 0
    distributed.reload(saved)
    assert torch.equal(t, torch.arange(10.0)) and torch.equal(view, torch.tensor([2.0, 3.0, 4.0]))


BAD = ["missing_model", "truncated_weights", "bad_config", "out_is_a_file", "out_under_a_file", "finished_run",
       "too_few_prompts", "resume_with_other_settings"]


@pytest.fixture(scope="module")
def finished_grpo(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished_grpo")
    grpo.main(["--model", "tiny", "--data", "toy", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens",
               "4", "--max-steps", "1", "--reward-processes", "1", "--final-state", "--out", str(out)])
    return out


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_1_and_out_unchanged(tmp_path, broken, capsys, finished_grpo, case):
    from conftest import cli_error, snapshot
    capsys.readouterr()
    out = tmp_path / "out"
    argv, first = {
        "missing_model": (["--model", str(broken.missing)], f"--model {broken.missing}: no such directory, and not "
                                                              f"a hub id"),
        "truncated_weights": (["--model", str(broken.truncated)], f"--model {broken.truncated}: model.safetensors "
                              f"is truncated ({broken.size // 2:,} of {broken.size:,} bytes)"),
        "bad_config": (["--model", str(broken.bad_config)], f"--model {broken.bad_config}: config.json is not valid "
                       f"JSON (Expecting property name enclosed in double quotes at line 1)"),
        "out_is_a_file": (["--out", str(broken.file)], f"--out {broken.file} is a file, not a directory"),
        "out_under_a_file": (["--out", str(broken.file / "sub")], f"cannot write to --out {broken.file / 'sub'}: "
                             f"{broken.file} is not a writable directory"),
        "finished_run": (["--out", str(finished_grpo)], f"--out {finished_grpo} already holds a run; pass "
                         f"--overwrite to replace it, or choose another --out"),
        "too_few_prompts": (["--prompts-per-step", "128"], "84 prompts (with 16 held out for --eval-every) cannot fill one "
                            "step of --prompts-per-step 128"),
        "resume_with_other_settings": (["--out", str(finished_grpo), "--resume", str(finished_grpo / "final"),
                                        "--beta", "0.02"], "--resume with other settings than the run's: --beta "
                                       "0.0 -> 0.02; pass --allow-changes to continue anyway"),
    }[case]
    argv = ["--model", "tiny", "--data", "toy", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens",
            "4", "--max-steps", "1", "--reward-processes", "1", "--out", str(out), *argv]
    watched = [out, finished_grpo, broken.file]
    before = [snapshot(p) for p in watched]
    status, lines = cli_error(grpo.main, argv, capsys)
    assert (status, lines[0]) == (1, "error: " + first) and len(lines) == 1
    assert [snapshot(p) for p in watched] == before


SMALL = ["--model", "tiny", "--data", "toy", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
         "--max-steps", "2", "--reward-processes", "1"]


def test_a_non_finite_update_is_refused_and_nothing_saved(tmp_path, monkeypatch, capsys):
    """Whatever makes the loss NaN (here a stand-in for it), the step stops before AdamW writes NaN into the weights:
    one line, exit 1, no checkpoint (before, --group-size 1 saved a `final` with NaN in half its tensors)."""
    from conftest import cli_error
    real = grpo.policy_loss
    monkeypatch.setattr(grpo, "policy_loss", lambda *a, **k: (lambda loss, s: (loss * float("nan"), s))(*real(*a, **k)))
    status, lines = cli_error(grpo.main, [*SMALL, "--out", str(tmp_path)], capsys)
    assert status == 1 and lines[-1] == ("error: the gradient norm is nan: the update is refused and nothing is "
                                         "saved (a loss or gradient that is not finite; try a lower --lr)")
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("step_*"))


def rollout(text, finish_reason, answer="5"):
    ids = list(range(len(text)))
    return grpo.Rollout([], answer, None, ids, [1] * len(ids), [0.0] * len(ids), text, finish_reason)


def test_a_response_cut_at_the_cap_has_not_answered_by_default():
    """--truncated zero (default): a right answer followed by more text up to the cap earns 0; score: 1 as
    written (verl); mask: 1, but the response leaves the loss (DAPO's overlong filtering)."""
    rows = [rollout("<think>2+3</think><answer>5</answer>", "stop"), rollout("<think>.</think><answer>5</answer> and", "length")]
    assert grpo.score_rollouts(rows, 1).tolist() == [1.0, 0.0]
    assert grpo.score_rollouts(rows, 1, "score").tolist() == [1.0, 1.0]
    assert [r.in_loss for r in rows] == [True, True]
    assert grpo.score_rollouts(rows, 1, "mask").tolist() == [1.0, 1.0]
    assert [r.in_loss for r in rows] == [True, False] and set(rows[1].sampled_mask()) == {0}
    assert grpo.parse_args(["--model", "m"]).truncated == "zero"


def test_a_second_run_into_the_same_out_is_refused(tmp_path, capsys):
    """The run directory's lock: while one run holds --out, another (here even a --resume of it, which passes the
    first look) is refused in one line; the lock of a killed process is gone with it."""
    import fcntl
    import signal
    from conftest import cli_error
    out = tmp_path / "out"
    grpo.main([*SMALL, "--max-steps", "1", "--final-state", "--out", str(out)])
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    argv = [*SMALL, "--max-steps", "2", "--out", str(out), "--resume", str(out / "final")]
    capsys.readouterr()
    status, lines = cli_error(grpo.main, argv, capsys)
    assert (status, lines[-1]) == (1, f"error: --out {out} is in use by another run (it holds the directory's lock)")
    holder.send_signal(signal.SIGKILL)  # killed: a stale lock must not block the resume
    holder.wait()
    grpo.main(argv)
    assert json.loads((out / "final" / "train_state.json").read_text())["step"] == 2
    fd = os.open(out, os.O_RDONLY)  # and the finished run has let go of it
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


# ----------------------------------------------------------------------------------------------------
# Balanced passes, the rollout-policy gap and its correction, the lean refresh

def test_balanced_passes_deal_every_row_once_and_even_out_the_ranks():
    """2 ranks, 8 rows each, micro-batches of 2, 2 PPO mini-batches. Rank 0 sampled long responses, rank 1 short
    ones. Every row is trained once, in the same mini-batch as in rollout order; every rank runs the same number
    of micro-batches of at most 2 rows; and the ranks' padded tokens (a micro-batch: its rows x (widest prompt +
    longest response)) go from 2,320 vs 304 in rollout order to 1,456 vs 1,168, worked out by hand below."""
    lengths = [(10, 400 - 40 * i) for i in range(8)] + [(10, 40 - 4 * i) for i in range(8)]
    padded = lambda micro: len(micro) * (max(lengths[i][0] for i in micro) + max(lengths[i][1] for i in micro))  # noqa
    for balance in (False, True):
        plan = grpo.balanced_passes(lengths, world=2, micro_batch=2, mini_batches=2, balance=balance)
        assert sorted(i for mini in plan for rank in mini for micro in rank for i in micro) == list(range(16))
        for m, mini in enumerate(plan):  # mini-batch m: each rank's m-th half, as in rollout order
            assert sorted(i for rank in mini for micro in rank for i in micro) == \
                [r * 8 + i for r in (0, 1) for i in range(4 * m, 4 * m + 4)]
            assert [len(rank) for rank in mini] == [2, 2] and all(len(mb) <= 2 for rank in mini for mb in rank)
        per_rank = [sum(padded(mb) for mini in plan for mb in mini[r]) for r in (0, 1)]
        if not balance:
            assert per_rank == [2 * (410 + 330) + 2 * (250 + 170), 2 * (50 + 42) + 2 * (34 + 26)]  # 2,320 and 304
        else:  # mini-batch 0 sorted: 400 360 | 320 280 | 40 36 | 32 28 -> bins of 820, 660, 100, 84 padded tokens;
            # snake: rank 0 takes 820 and 84, rank 1 660 and 100. Mini-batch 1: 500, 340, 68, 52 -> 500 + 52, 340 + 68
            assert per_rank == [820 + 84 + 500 + 52, 660 + 100 + 340 + 68]


def test_rollout_weights_by_hand():
    """log pi_old - log pi_sample = ln 3, ln 0.5, 0 on three tokens of one response, ln 1.5 on one of another; cap 2.
    token: min(ratio, 2) = 2, 0.5, 1 and 1.5. sequence: the first response's ratio 3 * 0.5 * 1 = 1.5 is inside
    [1/2, 2], kept; with a cap of 1.4 it is left out, while the second (1.5) is left out too, and a third of ratio
    0.75 stays."""
    import math as m
    sample = torch.zeros(3, 3)
    old = torch.tensor([[m.log(3), m.log(0.5), 0.0], [m.log(1.5), 0.0, 0.0], [m.log(0.75), 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0], [1, 0, 0]])
    token = grpo.rollout_weights(old, sample, mask, "token", cap=2.0)
    assert token[0].tolist() == pytest.approx([2.0, 0.5, 1.0]) and token[1, 0].item() == pytest.approx(1.5)
    assert grpo.rollout_weights(old, sample, mask, "sequence", cap=2.0)[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert grpo.rollout_weights(old, sample, mask, "sequence", cap=1.4)[:, 0].tolist() == [0.0, 0.0, 1.0]
    assert grpo.rollout_weights(old, sample, mask, "none") is None
    loss, _ = grpo.policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.tensor([1.0]), torch.ones(1, 2),
                               2, beta=0, weights=torch.tensor([[2.0, 0.5]]))
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)  # each token's -A weighed: (-2 - 0.5) / 2 tokens


def test_the_rollout_policy_gap_is_nil_in_the_training_dtype_and_not_in_bf16(sft_tiny):
    """Rollouts from an inference copy in the policy's own dtype (fp32 here) carry each token's log-prob under the
    distribution it was drawn from, equal to the training forward's to float tolerance: the gap is ~0. From a bf16
    copy (what a GPU run samples from) the same tokens differ measurably: the gap GRPO logs is real."""
    from plumbing.distributed import setup_distributed
    path, _ = sft_tiny
    setup_distributed()
    cpu, processor = torch.device("cpu"), data.load_processor(path)
    policy = sft.load_sharded(path, cpu)
    prompts = data.load_rl_data("toy")[:4]
    gaps = {}
    for dtype in (torch.float32, torch.bfloat16):
        infer = grpo.inference_copy(policy, path, dtype, cpu)
        rows = rollouts(infer, processor, prompts, args_for("--group-size", "2", "--temperature", "1.0",
                                                            "--max-new-tokens", "16"), seeds=[1, 2, 3, 4])
        batch, response, mask = grpo.sequence_batch(processor, rows, cpu)
        with torch.no_grad():
            logp, _ = grpo.token_logprobs(policy, batch, response, temperature=1.0)
        sample = grpo.pad_rows([torch.tensor(r.sample_logp) for r in rows], response.shape[1], cpu)
        gaps[dtype] = ((logp - sample).abs() * mask).max().item()
    assert gaps[torch.float32] < 1e-4 and gaps[torch.bfloat16] > 1e-3, gaps


def test_the_refresh_gathers_only_what_trains_in_the_copys_dtype(model):
    """Frozen weights (here the vision tower) were filled once and are not gathered again; the trained ones arrive
    cast to the copy's dtype: the bytes gathered are the trained parameters' count times 2 for a bf16 copy."""
    copy = data.load_model("tiny", dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.visual"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    gathered = grpo.refresh_inference_copy(model, copy)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert gathered == 2 * sum(p.numel() for _, p in trained)
    copies = dict(copy.named_parameters())
    assert all(torch.equal(copies[n], p.to(torch.bfloat16)) for n, p in trained)
    assert not any(torch.equal(copies[n], p.to(torch.bfloat16)) for n, p in model.named_parameters()
                   if n.startswith("model.visual") and p.dim() > 1)  # untouched: still the old values
