"""A tokenized set on disk: tokenized once per machine into one int32 file that every rank maps. 114k
conversations of up to 4,096 tokens are ~1 GB as int32 but 15-20 GB as Python lists of ints, per rank."""
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from plumbing.cli import DataError

_WORKER = {}  # what each tokenizing process was started with: the row function and its arguments


def _init_worker(tokenize, args):
    _WORKER.update(tokenize=tokenize, args=args)


def _tokenize_chunk(rows):
    """Worker: rows -> (int32 token bytes, length, first labeled position, truncated, images) or the error's text."""
    out = []
    for row in rows:
        try:
            if isinstance(row, Exception):  # a line that could not even be read
                raise row
            e = _WORKER["tokenize"](row, *_WORKER["args"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, OSError) as err:  # OSError: files
            out.append(f"{type(err).__name__}: {err}")
            continue
        start = next(i for i, label in enumerate(e["labels"]) if label != -100)
        if any(label == -100 for label in e["labels"][start:]):  # the reply is one span at the end
            raise AssertionError("the row function produced a non-contiguous label span")
        out.append((np.asarray(e["input_ids"], dtype=np.int32).tobytes(), len(e["input_ids"]), start, e["truncated"],
                    e["images"]))
    return out


def _chunks(rows, size=256):
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def build(rows, tokenize, args, path, what, meta=None, processes=None):
    """tokenize(row, *args) -> {input_ids, labels, truncated, images} for every row, into path/tokens.bin (int32,
    concatenated), path/index.pt ((N, 3): offset, length, first labeled position) and path/meta.json; written
    aside, then renamed; `meta` is recorded beside the counts. Malformed rows are counted and skipped. A build
    that fails or is interrupted leaves nothing in the cache: the aside directory is removed whatever happens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    _init_worker(tokenize, args)
    rows = iter(rows)
    head = list(itertools.islice(rows, 2048))
    # A few thousand rows take seconds here; more go to worker processes. They start from a clean forkserver,
    # not by forking this process, whose other threads may hold locks a forked child would wait on for ever
    # (they import the launching script, so a script calling this guards its work with __name__ == "__main__").
    pool = multiprocessing.get_context("forkserver").Pool(
        processes or min(8, os.cpu_count() or 1), _init_worker, (tokenize, args)) if len(head) == 2048 else None
    index, images, bad, first_error, truncated, offset = [], {}, 0, None, 0, 0
    try:
        with open(tmp / "tokens.bin", "wb") as f, tqdm(desc="tokenize", unit=" rows", mininterval=5, delay=2) as bar:
            chunks = _chunks(itertools.chain(head, rows))
            for results in (pool.imap(_tokenize_chunk, chunks) if pool else map(_tokenize_chunk, chunks)):
                for r in results:
                    if isinstance(r, str):
                        bad, first_error = bad + 1, first_error or r
                        continue
                    f.write(r[0])
                    if r[4]:
                        images[len(index)] = r[4]
                    index.append((offset, r[1], r[2]))
                    offset, truncated = offset + r[1], truncated + r[3]
                bar.update(len(results))
        if not index:
            raise DataError(f"{what}: no usable rows ({bad} malformed; first: {first_error})")
        if bad:
            print(f"{what}: skipped {bad} of {bad + len(index)} malformed rows (first: {first_error})",
                  file=sys.stderr)
        torch.save(torch.tensor(index, dtype=torch.int64), tmp / "index.pt")
        if images:  # example index -> its image paths, read again when a batch is made
            (tmp / "images.json").write_text(json.dumps(images))
        (tmp / "meta.json").write_text(json.dumps((meta or {}) | {"examples": len(index), "tokens": offset,
                                                                "truncated": truncated, "skipped": bad}))
        os.rename(tmp, path)
    except OSError:
        if not (path / "meta.json").exists():  # not just another machine sharing this cache finishing first
            raise
    finally:
        if pool:
            pool.terminate()  # idle once the results are in; at once if the build failed
            pool.join()
        shutil.rmtree(tmp, ignore_errors=True)


class TokenFile:
    """The tokenized set, mapped from disk: only the pages a rank reads become resident."""

    def __init__(self, path):
        index = torch.load(Path(path) / "index.pt")  # (N, 3): offset, length, first labeled position
        self.meta = json.loads((Path(path) / "meta.json").read_text())
        self.offsets, self.label_starts = index[:, 0].tolist(), index[:, 2].tolist()
        self.lengths = index[:, 1].tolist()
        # tokens each sequence is trained to predict (position 0 predicts nothing)
        self.n_target = (index[:, 1] - index[:, 2].clamp(min=1)).tolist()
        self.tokens = torch.from_file(str(Path(path) / "tokens.bin"), shared=False, size=self.meta["tokens"],
                                      dtype=torch.int32)
        images = Path(path) / "images.json"
        self.images = {int(k): v for k, v in json.loads(images.read_text()).items()} if images.exists() else {}

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        ids = self.tokens[self.offsets[i]:self.offsets[i] + self.lengths[i]].long()
        labels = ids.clone()
        labels[:self.label_starts[i]] = -100
        return {"input_ids": ids, "labels": labels, "images": self.images.get(i, [])}
