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
