"""The command line: one parser style for every script, presets, and bad input as one line instead of a traceback."""
import argparse
import json
import re
import sys
from pathlib import Path


class DataError(ValueError):
    """Bad input the user can fix (missing file, unusable dataset, a flag out of range); printed as one line."""


def cli_parser(doc):
    """An argument parser whose --help opens with the script's purpose and launch commands (the docstring's first
    two paragraphs), one line per flag, and no abbreviated flags (so presets can see what was passed)."""
    return argparse.ArgumentParser(description="\n\n".join(doc.split("\n\n")[:2]), allow_abbrev=False,
                                   usage="%(prog)s [options]",
                                   formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
                                       prog, max_help_position=34, width=120))


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
    """Run a script's main(): bad input (DataError) ends as one line on stderr and exit code 1, no traceback."""
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")


def check_model_dir(name):
    """Fail at once, in one line, on a --model that cannot load: a path that does not exist and is no hub id, a
    directory without a readable config.json, missing or truncated weight files (their headers say how long
    they must be). A hub id passes: only the hub can tell."""
    path = Path(name)
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith(".") and not path.parent.is_dir():
            return  # "org/name", and no local directory "org" it could be a path into
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
