import sys
import torch
import pytest
from PIL import Image

import data
from conftest import ROOT, cli_error
import generate as G
from plumbing.distributed import shard


def chats(processor):
    img = Image.new("RGB", (84, 56), (10, 120, 200))
    return [[data.user_message("What is 2 + 3?")],
            [data.user_message("A much longer prompt " * 8)],
            [data.user_message("Describe this.", [img])],
            [data.user_message("Two pictures", [Image.new("RGB", (56, 56), (0, 200, 0)), img])]]


def reference(model, processor, chat, n):
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_greedy_matches_model_generate_with_and_without_images(model, processor):
    convs = chats(processor)
    ours = G.generate(model, processor, convs, max_new_tokens=12, batch_size=4)
    for chat, c in zip(convs, ours):
        assert c.token_ids == reference(model, processor, chat, 12)
        assert c.finish_reason == "length" and c.num_tokens == 12
    single = G.generate(model, processor, convs, max_new_tokens=12, batch_size=1)
    assert [c.token_ids for c in single] == [c.token_ids for c in ours]


def test_generation_leaves_no_rotary_state_behind(model, processor):
    G.generate(model, processor, chats(processor)[2:], max_new_tokens=3)
    assert model.model.rope_deltas is None


class Markov(torch.nn.Module):
    """The tiny model with its next token dictated by a table: next = table[current token]. Deterministic
    behaviour whatever the batch, so forced-exit bookkeeping can be checked exactly."""

    def __init__(self, model, table):
        super().__init__()
        self.inner, self.table = model, table
        self.config, self.model, self.generation_config = model.config, model.model, model.generation_config

    def forward(self, input_ids, **kw):
        out = self.inner(input_ids=input_ids, **kw)
        bias = torch.zeros_like(out.logits[:, -1])
        for i, t in enumerate(input_ids[:, -1].tolist()):
            bias[i, self.table.get(t, t)] = 1e4
        out.logits = out.logits[:, -1:] + bias[:, None]
        return out


def cycle_table(processor, start_tokens):
    """A chain from the prompt's last token through letters that never form '>' (never closes </think>)."""
    tok = processor.tokenizer
    letters = [tok.convert_tokens_to_ids(c) for c in "abcdefg"]
    table = {s: letters[0] for s in start_tokens}
    table.update({a: b for a, b in zip(letters, letters[1:] + letters[:1])})
    return table, letters


def test_forced_exit_appends_think_end_then_answers(model, processor):
    tok = processor.tokenizer
    last = tok.encode("assistant\n")[-1]
    table, letters = cycle_table(processor, [last])
    close = G.forced_exit_ids(tok, letters[:4])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    table[close[-1]] = im_end  # after </think> the model stops at once
    m = Markov(model, table)
    (c,) = G.generate(m, processor, [chats(processor)[0]], max_new_tokens=100, think_budget=7, answer_budget=5)
    assert c.token_ids[:7] == [letters[i % 7] for i in range(7)]  # exactly k thinking tokens
    assert tok.decode(c.token_ids[7:7 + len(close)]) == "</think>"
    assert c.token_ids[7 + len(close):] == [im_end]
    assert c.finish_reason == "forced_exit" and c.num_tokens == 7 + len(close) + 1

    del table[close[-1]]  # now it babbles after </think>: cut at answer_budget
    (c,) = G.generate(m, processor, [chats(processor)[0]], max_new_tokens=100, think_budget=7, answer_budget=5)
    assert c.num_tokens == 7 + len(close) + 5 and c.finish_reason == "forced_exit"
    (c,) = G.generate(m, processor, [chats(processor)[0]], max_new_tokens=100)  # no budget: runs to the cap
    assert c.num_tokens == 100 and c.finish_reason == "length"


def test_row_that_closes_think_early_is_untouched(model, processor):
    tok = processor.tokenizer
    think_end = tok.encode("x</think>", add_special_tokens=False)
    last = tok.encode("assistant\n")[-1]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    chain = [last] + think_end + [im_end]
    table = dict(zip(chain, chain[1:]))
    m = Markov(model, table)
    with_budget = G.generate(m, processor, [chats(processor)[0]], max_new_tokens=50, think_budget=10)
    without = G.generate(m, processor, [chats(processor)[0]], max_new_tokens=50)
    assert with_budget == without
    assert with_budget[0].finish_reason == "stop" and with_budget[0].token_ids == think_end + [im_end]
    assert with_budget[0].text == "x</think>"


def test_sampling_is_reproducible_whatever_the_batch(model, processor):
    convs = chats(processor) * 2
    a = G.generate(model, processor, convs, max_new_tokens=8, temperature=1.0, seed=3, batch_size=8)
    b = G.generate(model, processor, convs, max_new_tokens=8, temperature=1.0, seed=3, batch_size=3)
    c = G.generate(model, processor, convs, max_new_tokens=8, temperature=1.0, seed=4, batch_size=8)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert a[0].token_ids != a[4].token_ids  # the same prompt twice gets two different samples (GRPO groups)


def test_temperature_zero_is_greedy(model, processor):
    convs = chats(processor)[:2]
    assert G.generate(model, processor, convs, max_new_tokens=6, temperature=0.0, top_p=0.5, seed=1) == \
        G.generate(model, processor, convs, max_new_tokens=6)


def test_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    drawn = G.sample(logits, 1.0, 0.7, gens)[0]
    counts = torch.bincount(drawn, minlength=4).float() / 4000
    # the nucleus for top_p=0.7 is {0, 1} (0.5 < 0.7 <= 0.8), renormalized to 0.625 / 0.375
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] - 0.625) < 0.03
    full = torch.bincount(G.sample(logits, 1.0, 1.0, gens)[0], minlength=4).float() / 4000
    assert abs(full[3] - 0.05) < 0.015


def test_a_sampled_token_carries_its_log_prob_where_it_was_drawn():
    """p = 0.5, 0.3, 0.15, 0.05. Top-p 0.7 keeps {0, 1}, renormalized to 0.625 and 0.375; at temperature 2 (no top-p)
    the distribution is sqrt(p) normalized: 0.7071 / 1.8657 = 0.3790 for token 0; greedy is a point mass, log 1 = 0.
    What the forced exit writes carries 0 too (it was not drawn)."""
    import math
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(200, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    tokens, logp = G.sample(logits, 1.0, 0.7, gens)
    want = {0: math.log(0.625), 1: math.log(0.375)}
    assert all(lp == pytest.approx(want[t], abs=1e-6) for t, lp in zip(tokens.tolist(), logp.tolist()))
    tokens, logp = G.sample(logits, 2.0, 1.0, gens)
    roots = [math.sqrt(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert all(lp == pytest.approx(math.log(roots[t] / sum(roots)), abs=1e-6) for t, lp in zip(tokens.tolist(),
                                                                                              logp.tolist()))
    assert G.sample(logits[:3], 0.0, 1.0, gens[:3])[1].tolist() == [0.0, 0.0, 0.0]


def test_completions_carry_one_log_prob_per_token(model, processor):
    (c,) = G.generate(model, processor, chats(processor)[:1], max_new_tokens=10, temperature=1.0, seed=3,
                      think_budget=4, answer_budget=3)
    assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
    assert all(lp == 0.0 for lp, s in zip(c.logprobs, c.sampled) if s == 0)  # the forced exit's "</think>"


def test_edge_cases(model, processor):
    assert G.generate(model, processor, []) == []
    (c,) = G.generate(model, processor, [chats(processor)[0]], max_new_tokens=0)
    assert c.token_ids == [] and c.finish_reason == "length"
    too_long = [data.user_message("word " * 5000)]
    with pytest.raises(ValueError, match="context"):
        G.generate(model, processor, [too_long], max_new_tokens=4)


def test_each_item_lands_on_exactly_one_rank():
    parts = [shard(list(range(11)), r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]


def test_cli_prompt(tiny_path, tmp_path):
    import json
    import subprocess
    import sys
    img = tmp_path / "x.png"
    Image.new("RGB", (60, 60)).save(img)
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hi", "images": [str(img)]}) + "\n")
    out = subprocess.run([sys.executable, "generate.py", "--model", tiny_path, "--input", str(tmp_path / "in.jsonl"),
                          "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "5"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["num_tokens"] == 5 and row["finish_reason"] == "length"


def test_an_input_row_with_a_bad_image_is_skipped_by_name(tiny_path, tmp_path, capsys):
    """--input: a row whose image is missing is counted and skipped, the file named, and the other rows are
    answered (it used to end the whole run); a --prompt whose one image is missing is one error line."""
    import json
    import generate
    Image.new("RGB", (60, 60)).save(tmp_path / "x.png")
    rows = [{"prompt": "hi", "images": [str(tmp_path / "x.png")]}, {"prompt": "ho", "images": [str(tmp_path / "no.png")]},
            {"prompt": "text only"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    generate.main(["--model", tiny_path, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                   "--max-new-tokens", "3"])
    assert [json.loads(line)["prompt"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == ["hi", "text only"]
    assert (f"--input: skipped 1 of 3 malformed rows (first: ValueError: image {tmp_path / 'no.png'} is missing)"
            in capsys.readouterr().err)
    status, lines = cli_error(generate.main, ["--model", tiny_path, "--prompt", "hi", "--image", str(tmp_path / "no.png")],
                              capsys)
    assert (status, lines) == (1, [f"error: --prompt: no usable rows (1 malformed; first: ValueError: image "
                                   f"{tmp_path / 'no.png'} is missing)"])


# ----------------------------------------------------------------------------------------------------
# A text-only teacher (QwQ-32B's shape) and distillation for X-Reasoner-Med (§3.2)

def test_a_text_only_causal_lm_generates_like_model_generate():
    """The same decode loop drives a Qwen2 causal LM: ordinary 1-D positions after the left padding."""
    teacher, tok = data.load_model("tiny-text").eval(), data.load_processor("tiny-text")
    assert not hasattr(teacher.model, "get_rope_index") and data.tokenizer_of(tok) is tok
    convs = [[data.user_message("What is 2 + 3?")], [data.user_message("A much longer prompt " * 6)]]
    ours = G.generate(teacher, tok, convs, max_new_tokens=10, batch_size=2)  # one left-padded batch
    for chat, c in zip(convs, ours):
        inputs = G.encode(tok, chat)
        ref = teacher.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert c.token_ids == ref.tolist()
    assert G.encode(tok, convs[0])["input_ids"].shape[1] < 40  # content parts became one string, not a repr
    a = G.generate(teacher, tok, convs, max_new_tokens=8, temperature=1.0, seed=[5, 6], batch_size=1)
    b = G.generate(teacher, tok, convs, max_new_tokens=8, temperature=1.0, seed=[5, 6], batch_size=2)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_select_correct_keeps_right_answers_in_the_papers_format():
    rows = [{"question": "Q1 Options:\n\nA: x\nB: y", "answer": "B", "options": ["x", "y"]},
            {"question": "What is 2 + 2?", "answer": "4", "options": None}]
    texts = ["<think>y fits</think><answer>B</answer>",           # right
             "y fits\n</think>\n<answer>B: y</answer>",            # right; the teacher's template opened <think>
             "<think>x</think><answer>A</answer>",                 # wrong letter
             "The answer is B",                                    # right letter, but no tags: not SFT material
             "<think>2+2</think><answer>4</answer>",               # right
             "<think>2+2</think><answer>5</answer>"]               # wrong
    completions = [G.Completion(t, [], "stop", 0) for t in texts]
    kept = G.select_correct(rows, completions, samples=3)
    assert [k["response"] for k in kept] == [texts[0], "<think>\n" + texts[1], texts[4]]
    assert [k["question"] for k in kept] == [rows[0]["question"]] * 2 + [rows[1]["question"]]
    for k in kept:  # what sft.py reads back: the training prompt with the same question text
        assert data.parse_sft_row(k) == (k["question"], k["response"])


def test_x_reasoner_med_chain_distil_then_sft_then_grpo(tmp_path, monkeypatch):
    """The three commands of the README on toy MedQA rows: distil with a teacher (its completions scripted,
    half right), SFT the tiny VLM on what was kept, then GRPO on the same questions."""
    import json
    import grpo
    import sft
    medqa = str(ROOT / "toy" / "medqa.jsonl")
    rows = data.load_rl_data(medqa)
    real = G.generate
    calls = []

    def teacher(model, processor, conversations, **kw):  # the real loop runs; its texts are then scripted
        out = real(model, processor, conversations, **{**kw, "max_new_tokens": 4})
        calls.append(len(conversations))
        for i, c in enumerate(out):
            row = rows[i // 2]
            letter = row["answer"] if i % 2 == 0 else next(l for l in "ABCD" if l != row["answer"])
            c.text = f"Reasoning about the options.\n</think>\n<answer>{letter}</answer>"
        return out
    monkeypatch.setattr(G, "generate", teacher)
    out = tmp_path / "medqa_cot.jsonl"
    kept = G.main(["--model", "tiny-text", "--distil", medqa, "--samples", "2", "--temperature", "0.6",
                   "--output", str(out)])
    assert calls == [2 * len(rows)] and len(kept) == len(rows)  # one right completion of two, per question
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == kept and all(w["response"].startswith("<think>\n") for w in written)
    monkeypatch.setattr(G, "generate", real)
    sft.main(["--model", "tiny", "--data", str(out), "--global-batch", str(len(rows)), "--micro-batch", "1",
              "--epochs", "1", "--out", str(tmp_path / "med-sft")])
    grpo.main(["--model", str(tmp_path / "med-sft" / "final"), "--data", medqa, "--prompts-per-step", "2",
               "--group-size", "2", "--max-new-tokens", "8", "--max-steps", "1", "--out", str(tmp_path / "med-grpo")])
    assert (tmp_path / "med-grpo" / "final" / "config.json").exists()


def test_distil_with_a_real_teacher_runs(tmp_path):
    """Unscripted, a random tiny teacher is never right: the run still completes and writes an empty set."""
    kept = G.main(["--model", "tiny-text", "--distil", str(ROOT / "toy" / "medqa.jsonl"), "--samples", "2",
                   "--temperature", "1.0", "--max-new-tokens", "6", "--output", str(tmp_path / "d.jsonl")])
    assert kept == [] and (tmp_path / "d.jsonl").read_text() == ""


def slot_case(processor):
    """Prompts of many lengths, two with images, sampled and greedy rows, some cut by a think budget."""
    convs = chats(processor) + [[data.user_message("word " * (3 * i) + "What is 4 + 4?")] for i in range(1, 9)]
    return convs


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9),
                                      dict(temperature=1.0, think_budget=5, answer_budget=3)])
def test_each_row_is_the_same_whatever_the_slots_and_the_admission_order(model, processor, sampling):
    """The engine's contract: a row's tokens, sampled flags and finish reason depend on its prompt and seed alone:
    1, 3 or 16 slots, the prompts in any order, and the chunked loop it replaced (bench/), all agree."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_generate import reference_generate
    convs = slot_case(processor)
    budgets = [6 + 3 * (i % 4) for i in range(len(convs))]  # rows end at different steps: slots refill
    seeds = [G.row_seed(0, i) for i in range(len(convs))]
    runs = {}
    for slots in (1, 3, 16):
        runs[slots] = G.generate(model, processor, convs, max_new_tokens=budgets, batch_size=slots, seed=seeds, **sampling)
    flip = list(reversed(range(len(convs))))
    flipped = G.generate(model, processor, [convs[i] for i in flip], max_new_tokens=[budgets[i] for i in flip],
                         batch_size=3, seed=[seeds[i] for i in flip], **sampling)
    runs["reversed"] = [flipped[flip.index(i)] for i in range(len(convs))]
    runs["reference"] = reference_generate(model, processor, convs, max_new_tokens=budgets, batch_size=4, seed=0,
                                           **sampling)
    key = lambda c: (c.token_ids, c.sampled, c.finish_reason)  # noqa: E731
    for name, out in runs.items():
        assert [key(c) for c in out] == [key(c) for c in runs[1]], name
    if "think_budget" in sampling:
        assert {c.finish_reason for c in runs[1]} >= {"forced_exit"}


def test_the_slot_cache_is_never_reallocated(model, processor, monkeypatch):
    """Every decode step writes in place: the keys and values of every layer keep their storage from the first
    step to the last, while rows finish and new ones are admitted (DynamicCache reallocates every step)."""
    seen, real = [], G.decode_one_token

    def watch(forward, tokens, columns, cache, slots, axes):
        seen.append([(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers])
        return real(forward, tokens, columns, cache, slots, axes)
    monkeypatch.setattr(G, "decode_one_token", watch)
    stats = {}
    G.generate(model, processor, slot_case(processor), max_new_tokens=[4 + i for i in range(12)], batch_size=3,
               stats=stats)
    assert len(seen) == stats["decode_forwards"] > 10 and all(s == seen[0] for s in seen)
    assert 0 < stats["occupancy"] <= 1


def test_compiled_decode_gives_the_same_rows(model, processor):
    """--compile: the decode step through torch.compile (dynamic shapes: slots fill and empty, the attention length
    grows) writes the same tokens, flags and finish reasons as eager, images and forced exits included."""
    convs = slot_case(processor)
    budgets, seeds = [6 + 3 * (i % 4) for i in range(len(convs))], [G.row_seed(0, i) for i in range(len(convs))]
    sampling = dict(temperature=1.0, top_p=0.9, think_budget=5, answer_budget=3, max_new_tokens=budgets, seed=seeds)
    eager = G.generate(model, processor, convs, batch_size=3, **sampling)
    stats = {}
    fast = G.generate(model, processor, convs, batch_size=3, compile=True, stats=stats, **sampling)
    key = lambda c: (c.token_ids, c.sampled, c.finish_reason)  # noqa: E731
    assert [key(c) for c in fast] == [key(c) for c in eager]
    assert stats["compile_s"] > 0 and stats["decode_forwards"] > 0


def test_the_bandwidth_bound_counts_what_a_decode_step_reads(model, processor):
    """bench_generate --gpu's arithmetic, worked by hand from the tiny model's config (fp32: 4 bytes), then that
    GPU-only path itself run on the CPU at a small shape."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_generate import gpu, step_bytes
    tc = model.config.get_text_config()
    h, heads, kv, layers, inter = (tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads,
                                   tc.num_hidden_layers, tc.intermediate_size)
    d, vocab = h // heads, model.get_output_embeddings().weight.shape[0]
    layer = (h * heads * d + heads * d) + 2 * (h * kv * d + kv * d) + heads * d * h + 3 * h * inter + 2 * h
    weights = layers * layer + h + vocab * h  # q, k, v with biases, o, gate/up/down, 2 norms; final norm; head
    batch, cache = 3, 10
    assert step_bytes(model, batch, cache) == 4 * (weights + batch * h + batch * cache * 2 * layers * kv * d)
    rows = gpu(processor, device="cpu", dtype=torch.float32, shapes=("kv7b",), batches=(1, 2), new=4, peak_bw=1e10)
    assert [(r["shape"], r["batch"]) for r in rows] == [("kv7b", 1), ("kv7b", 2)]
    assert all(r["tok_s"] > 0 and r["ref_tok_s"] > 0 and r["bound_tok_s"] > 0 for r in rows)
