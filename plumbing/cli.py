"""The command line: one parser style for every script, presets, and bad input as one line instead of a traceback."""
import argparse
import json
import math
import os
import re
import sys
from pathlib import Path


class DataError(ValueError):
    """Bad input the user can fix (missing file, unusable dataset, a flag out of range); printed as one line.
    `every_rank=False`: only this rank met it (e.g. an image it alone reads), so this rank says it."""

    def __init__(self, message, every_rank=True):
        super().__init__(message)
        self.every_rank = every_rank


class Refused(RuntimeError):
    """The run stops itself rather than do harm (a non-finite gradient): one line, exit status 1, nothing saved. Not
    bad input, so not a DataError: the data may be fine and the learning rate not."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a DataError: one line, exit status 1, like every other bad input."""

    def error(self, message):
        raise DataError(f"{message} (see --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with what it accepts (from its type, below) and its default."""

    def _get_help_string(self, action):
        text, accepts = action.help or "", getattr(action.type, "accepts", None)
        shown = not (action.default is None or action.default is False or action.default == argparse.SUPPRESS)
        if shown and action.option_strings:
            accepts = f"{accepts}; " if accepts else ""
            return f"{text} [{accepts}default: %(default)s]"
        return f"{text} [{accepts}]" if accepts else text


def cli_parser(doc):
    """An argument parser whose --help opens with the script's purpose and launch commands (the docstring's first
    two paragraphs), one line per flag with its range and default, and no abbreviated flags (so presets can see
    what was passed)."""
    return Parser(description="\n\n".join(doc.split("\n\n")[:2]), allow_abbrev=False, usage="%(prog)s [options]",
                  formatter_class=lambda prog: HelpFormatter(prog, max_help_position=34, width=120))


# ----------------------------------------------------------------------------------------------------
# What a numeric flag accepts, stated once: argparse's type= checks it, --help and the error say it in the same words

def accepting(cast, accepts, ok):
    """A type= function: `cast` the text, then `ok(value)` must hold; its `accepts` is the range in words."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {accepts}, got {text!r}")
        return value
    parse.accepts = parse.__name__ = accepts
    return parse


def int_at_least(n):
    return accepting(int, f"an integer >= {n}", lambda v: v >= n)


POSITIVE_INT = int_at_least(1)
COUNT = int_at_least(0)
POSITIVE = accepting(float, "a number > 0", lambda v: math.isfinite(v) and v > 0)
NON_NEGATIVE = accepting(float, "a number >= 0", lambda v: math.isfinite(v) and v >= 0)
PROBABILITY = accepting(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
FRACTION = accepting(float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def passed_flags(parser, argv):
    """The options given on the command line (by dest), so that a preset fills in only the others."""
    argv = sys.argv[1:] if argv is None else argv
    return {a.dest for a in parser._actions for opt in a.option_strings
            if any(x == opt or x.startswith(opt + "=") for x in argv)}


def toy_preset(args, preset):
    """`--data toy`: every option the user did not pass takes the value sized for the toy task on a CPU (the
    paper's defaults are for the real data). Returns the one line to announce it with, once the inputs check."""
    chosen = {k: v for k, v in preset.items() if k not in args.passed}
    for k, v in chosen.items():
        setattr(args, k, v)
    return "toy preset: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in chosen.items()) + \
        "; flags you pass win" if chosen else ""


def cli(main):
    """Run a script's main(): bad input (DataError) ends as one line on stderr and exit status 1, no traceback;
    Ctrl-C before the training loop (which saves first, see runs.Preemption) as one line and status 130. Under
    torchrun every rank meets the same bad input, so rank 0 alone says it, on a line of its own; an error that
    one rank alone meets (DataError(..., every_rank=False)) is said by that rank.

    However main() ends, a process group that torchrun's ranks started is destroyed before the interpreter
    exits: one left alive lets gloo's worker threads free tensors during the interpreter's teardown, which aborts
    the process (SIGABRT, "terminate called without an active exception") about one exit in eight on a CPU,
    after the results were written (pytorch/pytorch#190489)."""
    speaker = os.environ.get("RANK", "0") == "0"
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}" if speaker or not e.every_rank else 1)
    except Refused as e:  # every rank meets it together (the gradient norm is the same number everywhere)
        sys.exit(f"error: {e}" if speaker else 1)
    except KeyboardInterrupt:
        if speaker:
            print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if "plumbing.distributed" in sys.modules:  # only a script that set up ranks imported it (and torch)
            sys.modules["plumbing.distributed"].finish()


def hub_id(name):
    """A name that is no local path and reads as "org/name" (with no local directory "org" it could point into)."""
    return (not Path(name).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
            and not name.startswith(".") and not Path(name).parent.is_dir())


def check_model_dir(name):
    """Fail at once, in one line, on a --model that cannot load: a path that does not exist and is no hub id, a
    directory without a readable config.json, missing or truncated weight files (their headers say how long
    they must be). A hub id passes: only the hub can tell."""
    path = Path(name)
    if not path.exists():
        if hub_id(name):
            return
        raise DataError(f"--model {name}: no such directory, and not a hub id")
    if not path.is_dir():
        raise DataError(f"--model {name}: not a directory")
    try:
        json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise DataError(f"--model {name}: no config.json, so not a model directory") from None
    except json.JSONDecodeError as e:
        raise DataError(f"--model {name}: config.json is not valid JSON ({e.msg} at line {e.lineno})") from None
    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        [f.name for f in sorted(path.glob("*.safetensors"))]
    if not shards and not (path / "pytorch_model.bin").exists():
        raise DataError(f"--model {name}: no weights (*.safetensors) in the directory")
    for shard in shards:
        f = path / shard
        if not f.exists():
            raise DataError(f"--model {name}: {shard} is missing")
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(fh.read(n)) if 0 < n < size else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
        if header is None:
            raise DataError(f"--model {name}: {shard} is not a readable safetensors file")
        expected = 8 + n + max([v["data_offsets"][1] for v in header.values() if isinstance(v, dict)
                                and "data_offsets" in v], default=0)
        if size != expected:
            raise DataError(f"--model {name}: {shard} is truncated ({size:,} of {expected:,} bytes)")
