"""evaluate.py's files on disk: per-sample JSONL kept across reruns only for the same weights and protocol, the
text-solvable id lists, the fingerprint of a model's weights, and the results (summary.json, results.md,
results.svg) written from the summaries evaluate.py makes."""
import hashlib
import json
import sys
from pathlib import Path

from plumbing.charts import svg_page
from plumbing.cli import DataError
from plumbing.distributed import barrier
from plumbing.runs import write_atomic


def reuse_records(out, name, protocol, weights, model, rank):
    """Per-sample records in `out` (name.jsonl, name.rank*.jsonl) are kept only if made under the same `protocol`
    by the same `weights` (a fingerprint, not a path): other settings stop the run (every rank, in one line);
    other weights move the records aside, to name.stale-<fingerprint>.*, so they are computed afresh. Collective."""
    meta = out / f"{name}.settings.json"
    old = json.loads(meta.read_text()) if meta.exists() else protocol | {"fingerprint": weights}
    if {k: v for k, v in old.items() if k not in ("fingerprint", "model")} != protocol:
        raise DataError(f"{out} holds {name} results made with other settings ({meta}); use a new --out")
    out.mkdir(parents=True, exist_ok=True)  # every rank: none may open its file before the directory exists
    barrier()  # all ranks have read the old settings before rank 0 replaces them
    if rank == 0:
        stale = old.get("fingerprint")
        if stale != weights:
            print(f"{name}: the weights changed since {out} was written (fingerprint {stale} -> {weights}); its "
                  f"records move to {name}.stale-{stale}.*", file=sys.stderr)
            for f in [*out.glob(f"{name}.jsonl"), *out.glob(f"{name}.rank*.jsonl")]:
                f.rename(out / f.name.replace(name, f"{name}.stale-{stale}", 1))
        write_atomic(meta, json.dumps(protocol | {"fingerprint": weights, "model": model}, indent=1))
    barrier()  # the moves are done before anyone reads the records


def read_records(out, bench):
    """evaluate.py's per-sample records for `bench` in `out` (bench.jsonl, bench.rank*.jsonl), by (id, sample)."""
    records, bad = {}, 0
    for path in sorted(out.glob(f"{bench}.jsonl")) + sorted(out.glob(f"{bench}.rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                records[(r["id"], r["sample"])] = r
            except (json.JSONDecodeError, KeyError):
                bad += 1  # a line cut short by a crash: that sample is generated again
    if bad:
        print(f"{bench}: ignoring {bad} unreadable lines in {out}", file=sys.stderr)
    return records


def write_solvable(path, bench, ids):
    """Record `bench`'s text-solvable ids in `path` beside the other benchmarks' (one file serves a run)."""
    path = Path(path)
    keep = [line for line in (path.read_text().splitlines() if path.exists() else [])
            if not line.startswith(bench + "\t")]
    write_atomic(path, "".join(f"{line}\n" for line in keep + [f"{bench}\t{i}" for i in ids]))


def read_ids(paths, bench):
    """Ids to leave out of `bench`: the union over files, each a JSON list or lines of "id" (any benchmark) or
    "bench<TAB>id" (as --text-solvable-out writes them)."""
    ids = set()
    for path in paths:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first id
        if text.lstrip().startswith("["):
            ids |= set(map(str, json.loads(text)))
            continue
        for line in filter(str.strip, text.splitlines()):
            b, tab, i = line.rstrip("\n").partition("\t")
            ids |= {i} if tab and b == bench else set() if tab else {line.strip()}
    return ids


def fingerprint(path):
    """A short hash of what a model's outputs depend on: its config, and per weight file the size and 16 evenly
    spaced 4 KiB samples of the weights (retrained weights differ everywhere; reading 64 KiB per file is fast at
    any size). For a hub id, the id itself."""
    path = Path(path)
    if not path.is_dir():
        return hashlib.sha1(str(path).encode()).hexdigest()[:12]
    h = hashlib.sha1((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for k in range(16):
                fh.seek(size * k // 16)
                h.update(fh.read(4096))
    return h.hexdigest()[:12]


def results_table(summaries, paper_models, compare, text_solvable=False):
    """The results as Markdown, under a line naming the model(s) scored; with `compare`, the paper's numbers each
    summary carries beside ours (its `paper`: {model key: cell}; with `text_solvable`, Table 6's `paper_text_solvable`:
    (original, text-solvable, remaining, base, xr)). `paper_models`: {model key: column name}."""
    k = summaries[0]["samples"] if summaries else 1
    models = sorted({(s.get("model"), s.get("fingerprint")) for s in summaries if s.get("model")})
    title = "model: " + "; ".join(f"`{m}` (fingerprint {f})" for m, f in models) + "\n\n" if models else ""
    head = ["benchmark", "n", "accuracy" if k == 1 else f"avg@{k}"] + ([f"maj@{k}", f"pass@{k}"] if k > 1 else [])
    head += ["forced exit %", "words"]
    if compare and text_solvable:
        head += ["paper n (T6)", "paper Qwen2.5-VL-7B (T6)", "paper X-Reasoner (T6)"]
    elif compare:
        head += [f"paper {name}" for name in paper_models.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s.get("label", s["bench"]), s["n"], s["accuracy"]]
        cells += ([s[f"maj@{k}"], s[f"pass@{k}"]] if k > 1 else []) + [s["forced_exit_pct"], s["mean_words"]]
        if compare and text_solvable:
            t6 = s.get("paper_text_solvable")
            cells += list(t6[2:]) if t6 else ["not reported"] * 3
        elif compare:
            cells += [s.get("paper", {}).get(m, "not reported") for m in paper_models]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return title + "\n".join(lines)


def write_results(out, summaries, paper_models, compare, text_solvable, title):
    """summary.json and results.md (every benchmark evaluated into `out` so far) and, with K > 1 samples, the
    avg/maj/pass@K bars of the sampling study (§3) in results.svg under `title`. Returns this call's table."""
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    summary.update({s["bench"]: s for s in summaries})
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    write_atomic(out / "results.md", results_table(list(summary.values()), paper_models, compare, text_solvable) + "\n")
    k = summaries[0]["samples"]
    if k > 1:
        names = [s["bench"] for s in summaries]
        bars = [(f"{metric}@{k}", [s[key] for s in summaries]) for metric, key in
                (("avg", "accuracy"), ("maj", f"maj@{k}"), ("pass", f"pass@{k}"))]
        write_atomic(out / "results.svg", svg_page([("accuracy (%)", names, bars, None, True)], title,
                                                   max(520, 160 * len(names) + 80), 320, 1))
    return results_table(summaries, paper_models, compare, text_solvable)
