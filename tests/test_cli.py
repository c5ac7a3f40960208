"""The command line of every script (plumbing/cli.py): each numeric flag's range stated once, checked before
anything loads or is written, bad input as one line and exit status 1, errors said once under torchrun."""
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, cli_error, snapshot, torchrun

import data
import evaluate
import generate
import grpo
import sft
from plumbing import charts
from plumbing.cli import DataError, Parser

SCRIPTS = {"sft": sft.parse_args, "grpo": grpo.parse_args, "evaluate": evaluate.parse_args,
           "generate": generate.parse_args, "data": data.main}
MAINS = {"sft": sft.main, "grpo": grpo.main, "evaluate": evaluate.main, "generate": generate.main, "data": data.main}
# What each script needs besides the flag under test to get as far as its checks
BASE = {"sft": ["--model", "tiny", "--data", "toy"], "grpo": ["--model", "tiny", "--data", "toy"],
        "evaluate": ["--model", "tiny", "--data", "toy", "--bench", "medqa"],
        "generate": ["--model", "tiny", "--prompt", "hi"], "data": []}

# Written by hand from the paper and the flags' meaning, not read back from the code: (script, flag, a bad value,
# what the error must say). The cases the review found first, then one bad value per range kind.
CASES = [
    ("grpo", "--group-size", "1", "an integer >= 2"),       # one sample: its group's std is NaN
    ("grpo", "--group-size", "0", "an integer >= 2"),
    ("grpo", "--group-size", "-2", "an integer >= 2"),
    ("grpo", "--prompts-per-step", "0", "an integer >= 1"),
    ("grpo", "--max-new-tokens", "0", "an integer >= 1"),
    ("grpo", "--lr", "-1e-6", "a number > 0"),
    ("grpo", "--temperature", "0", "a number > 0"),         # log-probs divide by it
    ("grpo", "--dual-clip", "0.5", "0 (off) or a number > 1"),
    ("grpo", "--eps-low", "1", "a number in [0, 1)"),
    ("sft", "--epochs", "0", "an integer >= 1"),
    ("sft", "--max-len", "-5", "an integer >= 1"),
    ("sft", "--lr", "0", "a number > 0"),
    ("sft", "--lr", "nan", "a number > 0"),
    ("sft", "--global-batch", "0", "an integer >= 1"),
    ("sft", "--micro-batch", "0", "an integer >= 1"),
    ("sft", "--warmup", "1", "a number in [0, 1)"),
    ("sft", "--keep", "-1", "an integer >= 0"),
    ("evaluate", "--limit", "0", "an integer >= 1"),
    ("evaluate", "--limit", "-1", "an integer >= 1"),
    ("evaluate", "--samples", "0", "an integer >= 1"),
    ("evaluate", "--samples", "-3", "an integer >= 1"),
    ("evaluate", "--top-p", "0", "a number in (0, 1]"),
    ("evaluate", "--temperature", "-0.1", "a number >= 0"),
    ("generate", "--temperature", "-1", "a number >= 0"),
    ("generate", "--max-new-tokens", "0", "an integer >= 1"),
    ("generate", "--max-new-tokens", "-4", "an integer >= 1"),
    ("generate", "--top-p", "0", "a number in (0, 1]"),
    ("generate", "--top-p", "1.5", "a number in (0, 1]"),
    ("data", "--max-len", "0", "an integer >= 1"),
]


@pytest.mark.parametrize("script,flag,bad,accepts", CASES)
def test_a_bad_value_is_one_line_exit_1_and_nothing_written(script, flag, bad, accepts, tmp_path, capsys):
    out = tmp_path / "out"
    argv = BASE[script] + ([] if script in ("generate", "data") else ["--out", str(out)]) + [f"{flag}={bad}"]
    before = snapshot(data.TOY_DIR)
    status, lines = cli_error(MAINS[script], argv, capsys)
    assert (status, lines) == (1, [f"error: argument {flag}: expected {accepts}, got '{bad}' (see --help)"])
    assert not out.exists() and snapshot(data.TOY_DIR) == before


def parser_of(script, monkeypatch):
    """The script's parser, caught as it parses."""
    caught = {}

    def catch(self, argv=None, namespace=None):
        caught["parser"] = self
        raise SystemExit(0)
    monkeypatch.setattr(Parser, "parse_args", catch)
    with pytest.raises(SystemExit):
        SCRIPTS[script]([])
    return caught["parser"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_states_its_range_and_refuses_what_is_outside(script, monkeypatch, capsys):
    """No numeric flag takes a bare int or float: each has a range, shown by --help, and a value outside it (or
    not a number) gets the same words back."""
    parser = parser_of(script, monkeypatch)
    monkeypatch.undo()
    numeric = [a for a in parser._actions if a.type in (int, float) or hasattr(a.type, "accepts")]
    assert numeric and all(hasattr(a.type, "accepts") for a in numeric), [a.dest for a in numeric]
    text = parser.format_help()
    for action in numeric:
        assert action.type.accepts in text
        for bad in ("x", "-1000000", "inf"):
            values = [bad] * (action.nargs if isinstance(action.nargs, int) else 1)
            with pytest.raises(DataError, match=re.escape(f"expected {action.type.accepts}, got '{bad}'")):
                parser.parse_args(BASE[script] + [action.option_strings[0], *values])


def test_help_shows_defaults_and_the_benchmark_names(capsys):
    with pytest.raises(SystemExit):  # what `python evaluate.py --help` prints (test_data_py_... runs a script's own)
        evaluate.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "[an integer >= 1; default: 4096]" in text  # --max-new-tokens: range and §3's default
    assert all(name in text.replace("\n", "").replace(" ", "") for name in evaluate.BENCHMARKS)
    with pytest.raises(SystemExit):
        grpo.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "default: 8]" in text and "default: zero]" in text


def test_data_py_without_arguments_prints_its_usage():
    r = subprocess.run([sys.executable, "data.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: data.py")


def test_inputs_that_are_not_what_they_claim(tmp_path, capsys):
    """A .json that is not JSON, a missing --exclude-ids file, --out that is a file or under one, --output that is
    a directory, a --dtype typo, --bench that names nothing: one line each, before any model loads."""
    bad_json = tmp_path / "rows.json"
    bad_json.write_text('[{"question": "1+1", ')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (sft.main, ["--model", "tiny", "--data", str(bad_json), "--out", str(tmp_path / "o1")],
         f"error: {bad_json} is not valid JSON (Expecting property name enclosed in double quotes, line 1)"),
        (data.main, ["--rl", str(bad_json)],
         f"error: {bad_json} is not valid JSON (Expecting property name enclosed in double quotes, line 1)"),
        (evaluate.main, [*BASE["evaluate"], "--exclude-ids", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o2")],
         f"error: --exclude-ids {tmp_path / 'none.txt'}: no such file"),
        (evaluate.main, [*BASE["evaluate"], "--out", str(a_file)], f"error: --out {a_file} is a file, not a directory"),
        (evaluate.main, [*BASE["evaluate"], "--out", str(a_file / "sub")],
         f"error: cannot write to --out {a_file / 'sub'}: {a_file} is not a writable directory"),
        (evaluate.main, ["--model", "tiny", "--bench", "", "--out", str(tmp_path / "o3")], "error: --bench '' names no "
         "benchmark; known: " + ", ".join(evaluate.BENCHMARKS)),
        (generate.main, [*BASE["generate"], "--output", str(tmp_path)],
         f"error: --output {tmp_path} is a directory, not a file to write"),
        (generate.main, [*BASE["generate"], "--dtype", "bf16"], "error: argument --dtype: invalid choice: 'bf16' "
         "(choose from 'auto', 'bfloat16', 'float32') (see --help)"),
    ]
    for main, argv, message in cases:
        assert cli_error(main, argv, capsys) == (1, [message]), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "rows.json"]  # nothing written, no .tmp


def test_a_row_that_cannot_be_encoded_is_skipped_and_counted(tmp_path, capsys):
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"prompt": "What is 2 + 3?"}\n{"prompt": "a lone surrogate \\ud800 here"}\n{"prompt": "1 + 1?"}\n')
    generate.main([*BASE["generate"][:2], "--input", str(rows), "--output", str(tmp_path / "out.jsonl"),
                   "--max-new-tokens", "4"])
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    assert "--input: skipped 1 of 3 malformed rows (first: UnicodeEncodeError" in capsys.readouterr().err


def test_under_torchrun_an_error_is_said_once(tmp_path):
    """Two ranks meet the same bad input; rank 0 alone prints it, on a line of its own, and both destroy their
    process group on the way out. The flag is checked before the ranks meet; --out after they do (a collective)."""
    r, _ = torchrun("sft.py", ["--model", "tiny", "--data", "toy", "--lr", "0", "--out", str(tmp_path / "o")])
    said = [line for line in r.stderr.splitlines() if "expected a number > 0" in line]
    assert r.returncode != 0 and said == ["error: argument --lr: expected a number > 0, got '0' (see --help)"]
    assert not (tmp_path / "o").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("a run")
    r, at_exit = torchrun("sft.py", ["--model", "tiny", "--data", "toy", "--out", str(tmp_path / "busy")])
    said = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(said) == 1 and "already holds a run" in said[0]
    assert at_exit == {0: "destroyed", 1: "destroyed"}


CLI_EXITS = """
import os, sys
sys.path.insert(0, os.getcwd())
import torch.distributed as dist
from plumbing.cli import DataError, cli
from plumbing.distributed import setup_distributed

def main():
    setup_distributed()  # as torchrun's ranks do: WORLD_SIZE is set
    if sys.argv[1] == "error":
        raise DataError("bad input")
    if sys.argv[1] == "interrupt":
        raise KeyboardInterrupt
try:
    cli(main)
    code = 0
except SystemExit as e:
    code = e.code
print(repr(code), dist.is_initialized())
"""


@pytest.mark.parametrize("how, code", [("ok", 0), ("error", "'error: bad input'"), ("interrupt", 130)])
def test_the_command_line_destroys_the_process_group_however_main_ends(how, code, tmp_path):
    """A torchrun rank that leaves its gloo group alive may abort in the interpreter's teardown (SIGABRT after
    its results are written: pytorch/pytorch#190489). cli() destroys it on a normal return, on bad input and on
    Ctrl-C alike (one rank of one, in a process of its own: the test's own group stays out of it)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    r = subprocess.run([sys.executable, "-c", CLI_EXITS, how], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.stdout.split("\n")[-2] == f"{code} False", r.stderr[-2000:]


def test_an_error_one_rank_alone_meets_is_said_by_that_rank(monkeypatch, capsys):
    """Rank 1 stays quiet about the bad input every rank meets (rank 0 says it), but says an error only it met."""
    from plumbing.cli import DataError, cli
    monkeypatch.setenv("RANK", "1")

    def fails(every_rank):
        def main():
            raise DataError("image x.png is missing", every_rank=every_rank)
        return main
    for every_rank, said in ((True, 1), (False, "error: image x.png is missing")):
        with pytest.raises(SystemExit) as exc:
            cli(fails(every_rank))
        assert exc.value.code == said


def test_bars_of_zero_start_at_zero():
    """All accuracies 0: the axis runs from 0 up, and the bars sit on it (they were drawn from -0.6)."""
    import xml.etree.ElementTree as ET
    page = charts.svg_page([("accuracy (%)", ["a", "b"], [("avg@2", [0.0, 0.0])], None, True)], "t", 400, 300, 1)
    svg = ET.fromstring(page)
    ticks = [float(t.text) for t in svg.iter("{http://www.w3.org/2000/svg}text") if t.get("text-anchor") == "end"
             and t.text.replace(".", "").isdigit()]
    assert ticks[0] == 0 and min(ticks) == 0 and max(ticks) > 0
    bars = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if r.get("data-value") is not None]
    assert len(bars) == 2 and all(float(r.get("height")) == 0 for r in bars)
