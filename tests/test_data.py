import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import data
from conftest import ROOT, cli_error
from plumbing import tiny

# The paper's appendix C prompts, typed from the paper (independently of data.py).
PAPER_TRAIN = ("You will solve a problem/request. You should provide your thoughts within <think> </think> tags "
               "before providing the answer.\nWrite your final answer within <answer> </answer> tags. Here is the "
               "question: {question}")
PAPER_MC = ("You should provide your thoughts within <think> </think> tags, then answer with just one of the options "
            "below within <answer> </answer> tags (For example, if the question is \n'Is the earth flat?\n A: Yes "
            "\nB: No', you should answer with <think>...</think> <answer>B: No </answer>). Here is the question: "
            "{question}")
PAPER_MATH = ("A conversation between User and Assistant. The user asks a question, and you as the assistant solves "
              "it. You should first think about the reasoning process in the mind and then provide the user with the "
              "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
              "tags, respectively, i.e., <think> reasoning process here </think><answer> the final answer as the "
              "option letter or the number depending on the question </answer> (For example, if the question is \n"
              "'Is the earth flat?\n A: Yes \nB: No', you should answer with <think> your reasoning </think> "
              "<answer>B: No</answer>. If the question is 'What is 1+1?', you should answer with <think> your "
              "reasoning </think> <answer>2 </answer>).\n\nHere is the question: {question}")


def openthoughts_row(question="What is 2 + 3?", thought="2 and 3 make 5.", solution="The answer is $5$."):
    value = (f"<|begin_of_thought|>\n\n{thought}\n\n<|end_of_thought|>\n\n"
             f"<|begin_of_solution|>\n\n{solution}\n\n<|end_of_solution|>")
    return {"system": "sys", "conversations": [{"from": "user", "value": question},
                                               {"from": "assistant", "value": value}]}


def test_templates_are_the_papers_word_for_word():
    assert data.TRAIN_PROMPT == PAPER_TRAIN
    assert data.EVAL_MC_PROMPT == PAPER_MC
    assert data.EVAL_MATH_PROMPT == PAPER_MATH
    assert data.eval_prompt("Q?", ["yes", "no"], template="mc") == PAPER_MC.format(question="Q?") + \
        " Options:\n\nA: yes\nB: no"
    assert data.eval_prompt("1+1?", template="math") == PAPER_MATH.format(question="1+1?")
    # appendix C's math template also carries options (MathVista's multiple-choice items)
    assert data.eval_prompt("Q?", ["3", "4"], template="math") == PAPER_MATH.format(question="Q?") + \
        " Options:\n\nA: 3\nB: 4"


def test_openthoughts_row_becomes_paper_format():
    question, answer = data.parse_openthoughts(openthoughts_row())
    assert question == "What is 2 + 3?"
    assert answer == "<think>\n2 and 3 make 5.\n</think>\n<answer>\nThe answer is $5$.\n</answer>"


def test_sft_labels_cover_exactly_the_assistant_reply(processor):
    question, answer = data.parse_openthoughts(openthoughts_row(thought="Think {braces} and ünïcode\n\nlines."))
    ex = data.sft_example(question, answer, processor, max_len=4096)
    ids, labels = ex["input_ids"], ex["labels"]
    first = next(i for i, l in enumerate(labels) if l != -100)
    assert all(l != -100 for l in labels[first:])  # one contiguous span up to the end...
    assert labels[first:] == ids[first:]
    # ...which decodes to the reply plus the <|im_end|> that teaches the model to stop,
    assert processor.tokenizer.decode(ids[first:]) == answer + "<|im_end|>"
    # and the unlabeled prefix is the chat template's rendering of the paper's training prompt.
    prompt = processor.apply_chat_template([data.user_message(PAPER_TRAIN.format(question=question))],
                                           add_generation_prompt=True, tokenize=False)
    assert processor.tokenizer.decode(ids[:first]) == prompt
    assert not ex["truncated"]


def test_sft_truncation_is_counted(processor, capsys):
    rows = [openthoughts_row(thought="long " * 200), openthoughts_row()]
    short = len(data.sft_example(*data.parse_openthoughts(rows[1]), processor, 4096)["input_ids"])
    examples = data.convert_rows(rows, lambda r: data.sft_example(*data.parse_openthoughts(r), processor, short),
                                 "sft")
    assert [e["truncated"] for e in examples] == [True, False]
    assert len(examples[0]["input_ids"]) == short
    with pytest.raises(ValueError, match="longer than max_len"):
        data.sft_example(*data.parse_openthoughts(rows[1]), processor, 10)


def test_malformed_sft_rows_are_counted_and_reported(processor, tmp_path, capsys):
    good = openthoughts_row()
    no_markers = {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "just text"}]}
    empty_question = openthoughts_row(question="   ")
    empty_solution = openthoughts_row(solution="")
    no_conversations = {"system": "s"}
    path = tmp_path / "ot.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in
                              [good, no_markers, empty_question, empty_solution, no_conversations, good]))
    examples = data.load_sft_data(str(path), processor)
    assert len(examples) == 2
    assert "skipped 4 of 6 malformed rows" in capsys.readouterr().err
    path.write_text(json.dumps(no_markers) + "\n")
    with pytest.raises(data.DataError, match="no usable rows"):
        data.load_sft_data(str(path), processor)


def test_a_line_that_is_not_json_is_a_counted_malformed_row(processor, tmp_path, capsys):
    path = tmp_path / "ot.jsonl"
    path.write_text(json.dumps(openthoughts_row()) + "\n{not json\n" + json.dumps(openthoughts_row("What is 1+1?")) + "\n")
    assert len(data.load_sft_data(str(path), processor)) == 2
    err = capsys.readouterr().err
    assert f"skipped 1 of 3 malformed rows (first: ValueError: {path} line 2 is not JSON" in err
    rl = tmp_path / "rl.jsonl"
    rl.write_text('{"question": "q", "answer": "1"}\n[1, 2\n')
    assert len(data.load_rl_data(str(rl))) == 1 and f"{rl} line 2 is not JSON" in capsys.readouterr().err


def test_the_sft_cache_follows_its_source(processor, tmp_path, capsys):
    """Tokenized once: the second load reads the cache; an edited source file is a new cache."""
    path = tmp_path / "ot.jsonl"
    path.write_text(json.dumps(openthoughts_row()) + "\n")
    first = data.load_sft_data(str(path), processor)
    cache = data.sft_cache(str(path), processor, 4096)
    assert (cache / "tokens.bin").exists() and first[0]["input_ids"].tolist() == \
        data.sft_example(*data.parse_openthoughts(openthoughts_row()), processor, 4096)["input_ids"]
    mtime = (cache / "tokens.bin").stat().st_mtime_ns
    data.load_sft_data(str(path), processor)
    assert (cache / "tokens.bin").stat().st_mtime_ns == mtime  # not written again
    path.write_text(json.dumps(openthoughts_row()) + "\n" + json.dumps(openthoughts_row("What is 1+1?")) + "\n")
    assert data.sft_cache(str(path), processor, 4096) != cache and len(data.load_sft_data(str(path), processor)) == 2
    assert data.sft_cache(str(path), processor, 128) != data.sft_cache(str(path), processor, 4096)


def test_orz_rows():
    rows = [[{"from": "human", "value": "Compute $1+1$."},
             {"from": "assistant", "ground_truth": {"value": "2"}}]]
    (row,) = data.convert_rows(rows, data.parse_rl_row, "rl")
    assert row["answer"] == "2" and row["options"] is None
    assert row["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": PAPER_TRAIN.format(question="Compute $1+1$.")}]}]


def test_medqa_rows_carry_options():
    medqa = {"question": "Which drug?", "answer": "Aspirin", "answer_idx": "B",
             "options": {"A": "Heparin", "B": "Aspirin", "C": "Insulin", "D": "Saline"}, "meta_info": "step1"}
    row = data.parse_rl_row(medqa)
    assert row["answer"] == "B" and row["options"] == ["Heparin", "Aspirin", "Insulin", "Saline"]
    assert row["messages"][0]["content"][0]["text"].endswith(" Options:\n\nA: Heparin\nB: Aspirin\nC: Insulin\nD: Saline")


def test_bad_rl_rows_counted(capsys):
    rows = [[{"from": "human", "value": "q"}, {"from": "assistant", "ground_truth": {"value": ""}}],
            [{"from": "human", "value": "q"}],
            [{"from": "human", "value": "What?"}, {"from": "assistant", "ground_truth": {"value": "4"}}]]
    assert len(data.convert_rows(rows, data.parse_rl_row, "rl")) == 1
    assert "skipped 2 of 3" in capsys.readouterr().err
    # answers that are not a string or a number would become 'None', '[1, 2]', 'True' and reward such text
    odd = [{"question": "q", "answer": a} for a in (None, [1, 2], True, False, {"v": 1})]
    good = [{"question": "q", "answer": 7}, {"question": "q", "answer": 2.5}]
    assert [r["answer"] for r in data.convert_rows(odd + good, data.parse_rl_row, "rl")] == ["7", "2.5"]
    assert "skipped 5 of 7 malformed rows (first: ValueError: answer is NoneType None" in capsys.readouterr().err


def test_toy_sets_parse_without_loss(processor, capsys):
    assert len(data.load_rl_data("toy")) == 100
    assert len(data.load_sft_data("toy", processor)) == 100
    assert "malformed" not in capsys.readouterr().err


def test_read_rows_formats_and_errors(tmp_path):
    rows = [{"a": 1}, {"a": 2}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "x.json").write_text(json.dumps({"p1": rows[0], "p2": rows[1]}))
    import datasets
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "x.parquet"))
    for suffix in ("jsonl", "json", "parquet"):
        assert [r["a"] for r in data.read_rows(str(tmp_path / f"x.{suffix}"))] == [1, 2]
    with pytest.raises(data.DataError, match="no such file"):
        data.read_rows(str(tmp_path / "missing.json"))
    with pytest.raises(data.DataError, match="hub load failed") as e:
        data.read_rows("no-such-org/no-such-dataset")
    assert "\n" not in str(e.value)


def test_importing_data_is_light():
    code = "import sys, data; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_tiny_checkpoint_is_a_real_qwen25_vl(tiny_path, processor, model):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration) and isinstance(processor, Qwen2_5_VLProcessor)
    tok = processor.tokenizer
    for special in tiny.QWEN_SPECIAL:
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert tok.encode(special, add_special_tokens=False) == [tok.convert_tokens_to_ids(special)]
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert tok.decode(tok.encode("Ünïcode ∑ \\frac{1}{2}")) == "Ünïcode ∑ \\frac{1}{2}"  # byte-level: any text


def test_tiny_round_trip_gives_identical_logits(model, processor, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    image = Image.new("RGB", (90, 60), (200, 30, 30))
    messages = [data.user_message(data.eval_prompt("What colour?", ["red", "blue"]), [image])]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert inputs["pixel_values"].ndim == 2 and inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    n_image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert n_image_tokens == 4 * 6 // 4  # 2x2 patches merged into one token
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)
    assert torch.isfinite(logits).all() and logits.shape[-1] == model.config.text_config.vocab_size


def test_tiny_build_is_deterministic(tiny_path, tmp_path):
    from safetensors.torch import load_file
    tiny.build(tmp_path, data.tiny_corpus())
    assert (tmp_path / "tokenizer.json").read_text() == (data.Path(tiny_path) / "tokenizer.json").read_text()
    a, b = load_file(tmp_path / "model.safetensors"), load_file(data.Path(tiny_path) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# Files that are not what they should be: images, a byte-order mark, a cache that cannot be written, a checkpoint
# that vanishes while it loads, a run directory given for a checkpoint

def bad_images(tmp_path):
    """(a readable image, a missing one, a PNG cut in half as an interrupted copy leaves it, a text file named .png)."""
    good, missing, cut, text = (tmp_path / n for n in ("good.png", "missing.png", "cut.png", "text.png"))
    Image.effect_noise((64, 64), 60).convert("RGB").save(good)  # noise: a file too large to be all header
    cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    text.write_text("not an image")
    return good, missing, cut, text


def test_a_bad_image_is_named_in_its_error(tmp_path):
    """PIL says "image file is truncated" and names no file; the row's error must say which image it was."""
    good, missing, cut, text = bad_images(tmp_path)
    assert data.load_image(good).size == (64, 64)
    for path, says in ((missing, "is missing"), (cut, "is truncated"), (text, "cannot be read (cannot identify")):
        with pytest.raises(ValueError) as e:
            data.load_image(path)
        assert str(e.value).startswith(f"image {path} {says}")


def test_sft_rows_with_bad_images_are_skipped_by_name_and_leave_no_temporary_files(processor, tmp_path,
                                                                                   monkeypatch, capsys):
    """One row a good image, three bad: one example, the skip counted with the first bad file named; all bad: one
    DataError. Neither, nor a tokenization interrupted half-way, leaves a hidden directory in the cache."""
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    images = bad_images(tmp_path)
    rows = [{"messages": [{"role": "user", "content": "Read <image 1>."}, {"role": "assistant", "content": "12"}],
             "images": [p.name]} for p in images]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(data.load_sft_data(str(path), processor)) == 1
    assert (f"sft data: skipped 3 of 4 malformed rows (first: ValueError: image {images[1]} is missing)"
            in capsys.readouterr().err)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    with pytest.raises(data.DataError, match=f"no usable rows \\(2 malformed; first: ValueError: image {images[2]} "
                                             f"is truncated\\)"):
        data.load_sft_data(str(path), processor)

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "sft_row", interrupted)
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(KeyboardInterrupt):
        data.load_sft_data(str(path), processor)
    assert not data.sft_cache(str(path), processor, 4096).exists()  # the interrupted set is not in the cache
    assert [p.name for p in (tmp_path / "cache" / "sft").iterdir() if p.name.startswith(".")] == []


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    """Windows editors start UTF-8 files with U+FEFF: read as text, it made JSON invalid and JSONL's first line a
    malformed row (dropped, exit 0). Both read every row."""
    rows = [{"question": "What is 1+1?", "answer": "2"}, {"question": "What is 2+2?", "answer": "4"}]
    (tmp_path / "rl.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    (tmp_path / "rl.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    for name in ("rl.json", "rl.jsonl"):
        assert [r["answer"] for r in data.load_rl_data(str(tmp_path / name))] == ["2", "4"]


def test_a_cache_that_cannot_be_written_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """The cache is written when the tiny model is first built. Not a directory (a file is in its way), or not
    writable: the line names the directory and XREASONER_CACHE. (Tests run as root, whom file modes do not stop,
    so the refusal of a read-only directory is made where the kernel would make it: os.mkdir.)"""
    import os
    import sft
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    monkeypatch.setenv("XREASONER_CACHE", str(blocked / "cache"))
    monkeypatch.setattr(data, "CACHE", blocked / "cache")
    argv = ["--model", "tiny", "--data", "toy", "--out", str(tmp_path / "out")]
    status, lines = cli_error(sft.main, argv, capsys)
    assert (status, [l for l in lines if "error" in l.lower()]) == (1, [
        f"error: XREASONER_CACHE={blocked / 'cache'} cannot be written (Not a directory): point XREASONER_CACHE at a "
        f"writable directory"])
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(read_only)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", refuse)
    monkeypatch.setenv("XREASONER_CACHE", str(read_only))
    monkeypatch.setattr(data, "CACHE", read_only)
    status, lines = cli_error(sft.main, argv, capsys)
    assert (status, [l for l in lines if "error" in l.lower()]) == (1, [
        f"error: XREASONER_CACHE={read_only} cannot be written (Permission denied): point XREASONER_CACHE at a "
        f"writable directory"])
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_vanishes_while_loading_says_so(tiny_path, tmp_path, monkeypatch):
    """check_model passed the directory; it is deleted before from_pretrained reads it (another job pruned it).
    transformers then takes the path for a malformed hub id; the error says the directory vanished."""
    import shutil
    import transformers
    copy = tmp_path / "ckpt" / "final"
    shutil.copytree(tiny_path, copy)
    real = transformers.AutoConfig.from_pretrained

    def deleted_first(path, *args, **kwargs):
        shutil.rmtree(copy, ignore_errors=True)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", deleted_first)
    with pytest.raises(data.DataError) as e:
        data.load_model(str(copy))
    assert str(e.value) == (f"--model {copy}: the directory vanished while the model loaded (deleted or moved by "
                            f"another process?)")


def test_a_run_directory_stands_for_its_final_checkpoint(tiny_path, tmp_path, capsys):
    """`--model runs/sft` (what a user types after SFT) loads runs/sft/final and says so; a directory with neither
    a config nor a final/ is still refused."""
    import shutil
    shutil.copytree(tiny_path, tmp_path / "run" / "final")
    assert data.check_model(str(tmp_path / "run")) == str(tmp_path / "run" / "final")
    assert capsys.readouterr().err == (f"--model {tmp_path / 'run'} is a run directory: loading its final "
                                       f"checkpoint, {tmp_path / 'run' / 'final'}\n")
    assert data.check_model(str(tmp_path / "run" / "final")) == str(tmp_path / "run" / "final")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no config.json"):
        data.check_model(str(tmp_path / "empty"))
