"""plumbing/tiny.py's `tiny-qwen`: Qwen2.5-VL-7B-Instruct's own tokens, template, processor and config values on a small
random model, and every stage run on that real surface (the fast tests use `tiny`, a 1,024-token BPE)."""
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import evaluate
import generate as G
import grpo
import rewards
import sft
from plumbing import tiny

THINK_OPEN, THINK_END = [13708, 766, 397], [522, 26865, 29]  # "<think>\n", "</think>" in Qwen2's BPE (the issue)


@pytest.fixture(scope="module")
def qwen():
    return data.load_model("tiny-qwen").eval(), data.load_processor("tiny-qwen")


def test_the_tokenizer_config_and_processor_are_qwens():
    """Against ../shared/qwen2-tokenizer/README.md: its 22 special tokens in id order from 151643 and its spot
    checks; against the published config values: 152,064 embedding rows, untied, M-RoPE 16/24/24 scaled to the
    small head, window attention with full attention in the last block of each group, the stop ids, pixels."""
    model, processor = data.load_model("tiny-qwen"), data.load_processor("tiny-qwen")
    tok = processor.tokenizer
    readme = (data.QWEN_FILES / "README.md").read_text()
    special = re.findall(r"`(<[^`]+>)`", readme.split("in this order:")[1].split("(151,665")[0])
    assert len(special) == 22 and tok.convert_tokens_to_ids(special) == list(range(151643, 151665))
    assert len(tok) == 151665 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    for text, want in [("Hello", [9707]), (" world", [1879]), ("<", [27]), (">", [29]), ("</", [522]),
                       ("0123456789", list(range(15, 25))), ("<think>\n", THINK_OPEN), ("</think>", THINK_END)]:
        assert tok.encode(text, add_special_tokens=False) == want, text
    assert tok.decode([151657]) == "<tool_call>" and tok.decode([151657], skip_special_tokens=True) == "<tool_call>"
    assert tok.decode([151645], skip_special_tokens=True) == ""  # special: dropped from a response's text
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.vocab_size, model.get_input_embeddings().weight.shape[0]) == (152064, 152064)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    head_dim = text.hidden_size // text.num_attention_heads
    assert text.rope_parameters["mrope_section"] == [16 * head_dim // 128, 24 * head_dim // 128, 24 * head_dim // 128]
    assert (vision.depth, vision.fullatt_block_indexes, vision.window_size) == (4, [1, 3], 112)
    assert (text.max_position_embeddings, text.rope_theta if hasattr(text, "rope_theta") else
            text.rope_parameters["rope_theta"]) == (128000, 1e6)
    assert (model.config.image_token_id, model.config.vision_start_token_id) == (151655, 151652)
    assert model.generation_config.eos_token_id == [151645, 151643]
    assert processor.image_processor.size == {"shortest_edge": 3136, "longest_edge": 12845056}
    assert processor.chat_template == tiny.QWEN_CHAT_TEMPLATE


@pytest.mark.parametrize("reply", ["<think>\nLet me add: 2 + 3 = 5.\n</think>\n<answer>5</answer>",
                                   "\n\nstarts with blank lines", "ends with a newline\n", "  two spaces first",
                                   "π ≈ 3.14159, 你好, émigré — $\\frac{1}{2}$"])
def test_sft_labels_cover_exactly_the_reply_in_real_tokens(qwen, reply):
    """The loss mask, found from character offsets, decodes back to the reply and its <|im_end|>, whatever merges
    the real BPE makes at the seam with "assistant\\n" (a reply opening with newlines) or inside multi-byte text."""
    _, processor = qwen
    ex = data.sft_example("What is 2 + 3?", reply, processor, 4096)
    labelled = [t for t in ex["labels"] if t != -100]
    assert processor.tokenizer.decode(labelled) == reply + "<|im_end|>"
    first = ex["labels"].index(labelled[0])
    assert processor.tokenizer.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")


def test_an_openthoughts_row_is_labelled_in_the_papers_format(qwen):
    """A row in OpenThoughts-114k's schema, through data.sft_row as the token cache runs it: the labels decode to
    exactly the paper's <think>/<answer> text of its thought and solution, then <|im_end|>."""
    _, processor = qwen
    row = {"system": "Your role as an assistant ...", "conversations": [
        {"from": "user", "value": "Return your final response within \\boxed{}. What is $2^{10}$?"},
        {"from": "assistant", "value": "<|begin_of_thought|>\n\nOkay, 2^10 = 1024.\n\n<|end_of_thought|>\n\n"
                                       "<|begin_of_solution|>\n\n$\\boxed{1024}$\n\n<|end_of_solution|>"}]}
    ex = data.sft_row(row, processor, 4096, None)
    want = "<think>\nOkay, 2^10 = 1024.\n</think>\n<answer>\n$\\boxed{1024}$\n</answer><|im_end|>"
    assert processor.tokenizer.decode([t for t in ex["labels"] if t != -100]) == want
    assert ex["input_ids"][-1] == 151645 and not ex["truncated"]


def test_sft_cache_counts_truncation_and_changes_with_the_tokenizer(qwen, tmp_path, monkeypatch):
    _, processor = qwen
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    rows = [{"question": f"Sum {i}?", "response": "<think>\n" + "step " * (40 if i % 2 else 2) + "</think>"
             "<answer>1</answer>"} for i in range(6)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = str(tmp_path / "rows.jsonl")
    prompt = len(data.sft_example("Sum 0?", "", processor, 4096)["input_ids"]) - 1  # the reply's <|im_end|> aside
    cap = prompt + 20  # room for the short replies (~12 tokens), not the long ones ("step " x 40 is 40 tokens)
    examples = data.load_sft_data(source, processor, max_len=cap, report=False)
    assert len(examples) == 6 and examples.meta["truncated"] == 3 and max(examples.lengths) == cap
    assert data.sft_cache(source, processor, cap) != data.sft_cache(source, data.load_processor("tiny"), cap)


def boost(model, token_id):
    """A hook making `token_id` the top logit at every position (random weights stop nowhere by themselves)."""
    def hook(_, __, logits):
        logits[..., token_id] = logits.max() + 100.0
        return logits
    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("stop", [151645, 151643])
def test_a_row_stops_at_im_end_or_endoftext(qwen, stop):
    model, processor = qwen
    handle = boost(model, stop)
    try:
        out = G.generate(model, processor, [[data.user_message("Hi")]], max_new_tokens=8, temperature=1.0)
    finally:
        handle.remove()
    assert (out[0].token_ids, out[0].finish_reason, out[0].text) == ([stop], "stop", "")


def test_the_399_rows_without_a_token_are_never_sampled(qwen):
    """Embedding row 152,000 has no token: even as the top logit, greedy and sampled rows never take it."""
    model, processor = qwen
    handle = boost(model, 152000)
    try:
        for sampling in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9)):
            out = G.generate(model, processor, [[data.user_message("Hi")]] * 2, max_new_tokens=6, **sampling)
            assert all(t < 151665 for c in out for t in c.token_ids)
    finally:
        handle.remove()


def test_forced_exit_appends_think_end_as_the_real_bpe_writes_it(qwen):
    """After any text, the forced tokens decode to exactly "</think>" appended to the row's text, and the sampled
    mask marks exactly them; where no merge crosses the seam they are Qwen's [522, 26865, 29]."""
    model, processor = qwen
    tok = processor.tokenizer
    for before in ["So the sum is 5", "thinking ", "a)", "x.", "line\n", "π", "3 <"]:
        ids = tok.encode(before, add_special_tokens=False)
        forced = G.forced_exit_ids(tok, ids)
        assert tok.decode(forced) == "</think>" and tok.decode(ids + forced) == before + "</think>"
    assert G.forced_exit_ids(tok, tok.encode("So the sum is 5", add_special_tokens=False)) == THINK_END
    chats = [[data.user_message(f"What is {i} + {i}?")] for i in range(4)]
    out = G.generate(model, processor, chats, max_new_tokens=16, temperature=1.0, think_budget=5, answer_budget=4,
                     seed=3)
    for c in out:
        assert c.finish_reason == "forced_exit" and c.sampled[:5] == [1] * 5
        k = c.sampled.index(0)
        n = c.sampled.count(0)
        assert c.sampled[k:k + n] == [0] * n and tok.decode(c.token_ids[k:k + n]) == "</think>"
        assert c.token_ids[k:k + n] == G.forced_exit_ids(tok, c.token_ids[:k])


def test_grpo_step_and_rewards_on_real_token_decodes(tmp_path):
    """The reward reads the answer out of a real-token decode (multi-byte text, LaTeX, a boxed answer), and one
    GRPO step runs on tiny-qwen end to end."""
    tok = data.load_processor("tiny-qwen").tokenizer
    for response, gold in [("<think>\nπ·2 = 2π\n</think>\n<answer>$2\\pi$</answer>", "2\\pi"),
                           ("<think>\n½ + ½\n</think>\n<answer>\\boxed{1}</answer>", "1")]:
        text = tok.decode(tok.encode(response + "<|im_end|>"), skip_special_tokens=True)
        assert text == response and rewards.math_reward(text, gold, require_tags=True) == 1.0
    out = tmp_path / "grpo"
    grpo.main(["--model", "tiny-qwen", "--data", "toy", "--out", str(out), "--max-steps", "1",
               "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "12"])
    metrics = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in row]
    assert len(metrics) == 1 and all(v == v for v in metrics[0].values() if isinstance(v, float))


def test_evaluation_through_the_real_template_and_processor(tmp_path):
    """MathVista, MMMU and MedQA toy items on tiny-qwen; a 1008 x 812 picture is 36 x 29 = 1,044 image tokens at
    the processor's own bounds (3,136 to 12,845,056 pixels) and 20 x 16 = 320 at the 262,144-pixel evaluation bound
    (Qwen's smart_resize by hand: scale by sqrt(812 * 1008 / 262144) = 1.767, floor to 28s: 448 x 560)."""
    processor = data.load_processor("tiny-qwen")
    picture = [[data.user_message("What is shown?", [Image.new("RGB", (1008, 812), (200, 30, 30))])]]
    pads = lambda: int((G.encode(processor, picture[0])["input_ids"] == 151655).sum())  # noqa: E731
    assert pads() == 1044
    processor.image_processor.size = {"shortest_edge": 262144, "longest_edge": 262144}
    assert pads() == 320
    summaries = evaluate.main(["--model", "tiny-qwen", "--bench", "mathvista,mmmu,medqa", "--data", "toy",
                               "--limit", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "eval")])
    assert [s["bench"] for s in summaries] == ["mathvista", "mmmu", "medqa"] and all(s["n"] == 2 for s in summaries)
    record = json.loads((tmp_path / "eval" / "mathvista.jsonl").read_text().splitlines()[0])
    assert record["tokens"] <= 6 and "<|im_end|>" not in record["response"]


def test_sft_learns_on_tiny_qwen_and_saves_qwens_surface(tmp_path):
    """Four SFT steps on Qwen's real tokens: the loss starts at ln(152,064) = 11.93 (a random model's uniform guess
    over every embedding row) and falls at every step; the checkpoint reloads with from_pretrained with Qwen's
    tokenizer, template and processor bounds intact, and the weights it holds are the trained ones."""
    sft.main(["--model", "tiny-qwen", "--data", "toy", "--out", str(tmp_path / "sft"), "--max-steps", "4"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(11.93, abs=0.1) and all(b < a for a, b in zip(losses, losses[1:])), losses
    from safetensors.torch import load_file
    processor = data.load_processor(str(tmp_path / "sft" / "final"))
    assert len(processor.tokenizer) == 151665 and processor.chat_template == tiny.QWEN_CHAT_TEMPLATE
    assert processor.image_processor.size == {"shortest_edge": 3136, "longest_edge": 12845056}  # Qwen's bounds
    legacy = lambda k: k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")  # noqa
    trained, before = ({legacy(k): v for k, v in load_file(f).items()} for f in (
        tmp_path / "sft" / "final" / "model.safetensors", Path(data.resolve_model("tiny-qwen")) / "model.safetensors"))
    assert trained.keys() == before.keys()
    assert not torch.equal(trained["lm_head.weight"], before["lm_head.weight"])
    assert all(torch.equal(trained[k], before[k]) for k in trained if k.startswith("visual."))  # frozen


def test_without_qwens_files_tiny_qwen_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "QWEN_FILES", tmp_path)
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(data.DataError, match="tiny-qwen needs Qwen2's vocab.json and merges.txt"):
        data.load_processor("tiny-qwen")


def test_greedy_rows_equal_model_generate_with_and_without_its_repetition_penalty(qwen):
    """Our decode loop against transformers' model.generate on Qwen's real surface: 14 prompts of mixed lengths, 3
    with images, each with its own budget, through 3 slots. Penalty off: model.generate(do_sample=False). With
    Qwen2.5-VL-7B-Instruct's generation_config.json (sampling at top_k 1, i.e. argmax, and repetition penalty
    1.05), model.generate's defaults equal our greedy with --repetition-penalty 1.05. A token kept 1% ahead of the
    rest repeats without the penalty and not with it, so the check is not empty. The 399 embedding rows without a
    token, which we never sample, are suppressed on the transformers side."""
    model, processor = qwen
    assert model.generation_config.repetition_penalty == 1.05 and model.generation_config.top_k == 1
    no_token = list(range(len(processor.tokenizer), model.config.get_text_config().vocab_size))
    picture = Image.new("RGB", (112, 84), (200, 40, 40))
    questions = ["What is 2 + 3?", "Name a prime.", "Say yes " * 9, "Count: 1 2 3", "Why?" * 3, "x", "a b c d e f g",
                 "Add 17 and 25, then halve it.", "Repeat after me: the the the", "Q" * 40, "Hello there"]
    convs = [[data.user_message(q)] for q in questions] + [
        [data.user_message("Describe <image 1>.", [picture])], [data.user_message("Two:", [picture, picture])],
        [data.user_message("A long one about <image 1> " * 4, [picture])]]
    budgets = [3 + (7 * i) % 12 for i in range(len(convs))]

    def lead(_, __, logits):  # one token 1% ahead everywhere: it repeats unless a penalty (1.05: ~5%) holds it back
        top = logits.max(-1).values
        logits[..., 9707] = top + 0.01 * top.abs()
        return logits
    handle, rows = model.lm_head.register_forward_hook(lead), {}
    try:
        for penalty, theirs in ((1.0, dict(do_sample=False, repetition_penalty=1.0)), (1.05, {})):
            ours = G.generate(model, processor, convs, max_new_tokens=budgets, batch_size=3,
                              repetition_penalty=penalty)
            rows[penalty] = [c.token_ids for c in ours]
            for conv, budget, c in zip(convs, budgets, ours):
                inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt")
                out = model.generate(**inputs, max_new_tokens=budget, suppress_tokens=no_token, **theirs)
                assert c.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist(), (penalty, conv)
    finally:
        handle.remove()
    assert all(set(r) == {9707} for r in rows[1.0])  # no penalty: the leading token throughout
    assert rows[1.05] != rows[1.0]  # the penalty holds it back once it is seen
