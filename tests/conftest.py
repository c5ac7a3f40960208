"""Shared fixtures: the tiny Qwen2.5-VL checkpoint (built once per machine, read through from_pretrained)."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_path():
    import data
    return data.resolve_model("tiny")


@pytest.fixture(scope="session")
def processor(tiny_path):
    import data
    return data.load_processor(tiny_path)


@pytest.fixture()
def model(tiny_path):
    import data
    return data.load_model(tiny_path).eval()


@pytest.fixture(scope="session")
def sft_tiny(tmp_path_factory):
    """The tiny model SFT'd on the toy task: in ~20 s of CPU it learns the <think>/<answer> format and gets the
    sum right about 1 time in 4 when sampled at temperature 1, which leaves GRPO something to learn."""
    import json
    import sft
    out = tmp_path_factory.mktemp("sft_tiny")
    sft.main(["--model", "tiny", "--data", "toy", "--global-batch", "10", "--micro-batch", "10", "--epochs", "36",
              "--lr", "3e-3", "--lr-decay", "1.0", "--save-every", "0", "--out", str(out)])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return str(out / "final"), metrics
