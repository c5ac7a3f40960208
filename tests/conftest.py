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
    """The tiny model SFT'd on the toy task: it learns the <think>/<answer> format in ~20 s of CPU."""
    import json
    import sft
    out = tmp_path_factory.mktemp("sft_tiny")
    sft.main(["--model", "tiny", "--data", "toy", "--global-batch", "10", "--micro-batch", "10", "--epochs", "30",
              "--lr", "3e-3", "--save-every", "0", "--out", str(out)])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return str(out / "final"), metrics
