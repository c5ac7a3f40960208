"""The repository's shape, read from its source with ast: modules import each other in layers, never in a circle;
imports sit at the top unless marked heavy or optional; stage files and functions stay short enough to read."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["rewards.py", "data.py", "generate.py", "sft.py", "grpo.py", "evaluate.py"]

# Each module may import only from layers below its own. `plumbing` and the tiny-model builder import nothing
# above them; the stages stack in the order a reader meets them; toy/ and bench/ sit on top.
LAYERS = [
    {"rewards", "plumbing.tiny", "plumbing", "plumbing.cli", "plumbing.charts", "plumbing.distributed"},
    {"plumbing.runs", "plumbing.tokens"},
    {"plumbing.checkpoints", "plumbing.records"},
    {"data"},
    {"generate"},
    {"sft"},
    {"grpo", "evaluate"},
    {"toy.make_toy", "toy.miniature", "bench.bench_generate"},
    {"bench.bench_sft", "bench.bench_memory", "bench.bench_rewards", "bench.bench_grpo"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def modules():
    """{module name: path} for every Python file of the repository outside tests/."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".git") or rel.parts[0].startswith("."):
            continue
        name = ".".join(rel.with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def project_imports(name, path, known):
    """The project modules `name` imports anywhere in its file (function-local imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if name.startswith("bench.") and f"bench.{t}" in known:  # bench scripts import their siblings by name
                t = f"bench.{t}"
            if t in known and t != name:
                out.add(t)
    return out


def upward_imports(known, rank):
    """Every import of a project module that is not below the importer: "a -> b" strings."""
    return [f"{name} -> {t}" for name, path in known.items() for t in project_imports(name, path, known)
            if rank[t] >= rank[name]]


def first_cycle(graph):
    """A way back to a module by following imports (a depth-first search), or None: independent of any layer table."""
    state = {}

    def visit(node, trail):
        if state.get(node) == "open":
            return trail + [node]
        if state.get(node) is None:
            state[node] = "open"
            for nxt in sorted(graph[node]):
                if found := visit(nxt, trail + [node]):
                    return found
            state[node] = "done"
        return None
    return next((cycle for node in sorted(graph) if (cycle := visit(node, []))), None)


def test_every_module_has_a_layer_and_imports_only_below_it():
    known = modules()
    assert set(known) == set(RANK), f"place new modules in LAYERS: {sorted(set(known) ^ set(RANK))}"
    assert not upward_imports(known, RANK), upward_imports(known, RANK)


def test_the_import_graph_has_no_cycle():
    known = modules()
    cycle = first_cycle({name: project_imports(name, path, known) for name, path in known.items()})
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path):
    """The two tests above can fail: made-up modules where b imports a inside a function while a imports b at the
    top (a cycle, and with a below b in the layers, an import going up), and c importing a, which is below it."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    (tmp_path / "c.py").write_text("import a\n")
    known = {name: tmp_path / f"{name}.py" for name in "abc"}
    graph = {name: project_imports(name, path, known) for name, path in known.items()}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}  # found inside a function too
    assert first_cycle(graph) == ["a", "b", "a"]
    assert first_cycle({"a": set(), "b": {"a"}, "c": {"a", "b"}}) is None
    assert upward_imports(known, {"a": 0, "b": 1, "c": 2}) == ["a -> b"]


def test_function_local_imports_are_marked_heavy_or_optional():
    known = modules()
    unmarked = []
    for name, path in known.items():
        if name.startswith("bench."):
            continue
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and not any(
                            w in lines[node.lineno - 1] for w in ("# heavy", "# optional")):
                        unmarked.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unmarked, f"function-local imports without a reason: {unmarked}"


def code_lines(path):
    """Lines of code: not blank, not a comment, not inside a module's, class's or function's docstring (the brief's
    measure: a file is read for its code; its prose is not what makes it long)."""
    source = path.read_text()
    docs = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body and \
                isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None), ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            docs.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return sum(1 for i, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docs)


def test_code_lines_leave_out_docstrings_comments_and_blank_lines(tmp_path):
    """The measure on a file counted by hand: 3 lines of code among a docstring, comments and blank lines."""
    (tmp_path / "m.py").write_text('"""Module.\n\nMore."""\n# a comment\n\ndef f(x):\n    """Doc."""\n'
                                   '    y = x  # trailing comments keep their line\n\n    return y\n')
    assert code_lines(tmp_path / "m.py") == 3


def test_stage_files_and_functions_stay_readable():
    """The brief's budget, in code lines (above): each stage file at most 450 (rewards.py, a LaTeX translator and
    the benchmarks' own parsers, 750), all six at most 2,800, each plumbing module at most 300; no function longer
    than 60 lines (docstring included) outside bench/. Past these a file or function is doing two jobs."""
    sizes = {f: code_lines(ROOT / f) for f in STAGES}
    assert all(n <= (750 if f == "rewards.py" else 450) for f, n in sizes.items()), sizes
    assert sum(sizes.values()) <= 2800, sizes
    plumbing = {p.name: code_lines(p) for p in (ROOT / "plumbing").glob("*.py")}
    assert all(n <= 300 for n in plumbing.values()), plumbing
    long = []
    for name, path in modules().items():
        if not name.startswith("bench."):
            long += [f"{path.relative_to(ROOT)}:{fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
                     for fn in ast.walk(ast.parse(path.read_text())) if isinstance(fn, ast.FunctionDef)
                     and fn.end_lineno - fn.lineno + 1 > 60]
    assert not long, long
