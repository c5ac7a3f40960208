"""Verifiable rewards for X-Reasoner's GRPO stage and for evaluation: r = 1 if the final answer is right, else 0.

The paper (§2.2) rewards a response 1 when its final answer is semantically equivalent to the ground truth and
0 otherwise. This file is that referee, from the raw response to the 0/1, in reading order:

    extract_answer(response)        the last <answer>...</answer>, else the text after </think>; inside it the last
                                    \\boxed{...}, else "the answer is X"; None if the model never stopped thinking
    normalize(answer)               LaTeX and prose noise away: $...$, \\left, \\!, \\dfrac, units, degrees, "x = "
    math_equal(pred, gold)          strings, then structure (tuples, sets, intervals, matrices, \\pm), then values
                                    through our own LaTeX -> sympy translation (sympy's parse_latex needs antlr)
    math_reward / choice_reward     the 1.0 / 0.0 that GRPO and evaluate.py use
    batch_rewards                   many of them in parallel helper processes, each with a hard deadline
    official_choice, mmmu_*         MMMU-Pro's and MMMU's own parsers for untagged prose (evaluate.py's judges)

Safety: model text is never `eval`'d: our translator emits only numbers, operators and whitelisted names, and
`parse_expr` runs with empty builtins. Sizes are bounded before sympy, and sympy runs in a helper process that is
killed past its deadline (any thread, any process; signals only work in the main thread). Timeout = "not equal".

    python rewards.py "<think>...</think><answer>\\frac{3}{4}</answer>" "0.75"     # extraction and verdict
    python bench/bench_rewards.py                                              # answers/s, 1 process vs pool
"""
import argparse
import itertools
import json
import math
import random
import re
import select
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

# ----------------------------------------------------------------------------------------------------
# Limits that keep any input cheap
MAX_CHARS = 2000        # longer answers are compared as strings only
MAX_DEPTH = 40          # brace / bracket nesting
MAX_POWER_DIGITS = 400  # estimated digits of an exact integer power we are willing to compute
TIMEOUT = 2.0           # seconds of sympy work per comparison
REL_TOL = 1e-6          # tolerance when one side is a rounded decimal; exact comparison otherwise

# ----------------------------------------------------------------------------------------------------
# 1. Extraction

def last_boxed(text):
    """Content of the last \\boxed{...} or \\fbox{...} (nested braces balanced), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        m = re.match(r"\\boxed ([^\s$]+)", text[start:])  # "\boxed 5"
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


ANSWER_PHRASE = re.compile(r"(?:final answer is|the answer is|answer\s*:)\s*(.+)", re.IGNORECASE)
MATH_MODE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")  # a word of prose, not a LaTeX command or a variable
LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def prose_answer(text):
    """Untagged, unboxed prose ("The total is $1,234$."): its last math-mode expression, else its last number;
    a bare expression ("x^2 + 1") is its own answer."""
    if maths := MATH_MODE.findall(text):
        return next(g for g in maths[-1] if g)
    numbers = LAST_NUMBER.findall(text)
    return numbers[-1] if len(PROSE_WORD.findall(text)) >= 2 and numbers else text


def extract_answer(response, require_tags=False, prose=True):
    """The final answer a model gave, or None when there is none (e.g. it never left <think>).

    require_tags: only an answer written inside <answer>...</answer> counts (GRPO's reward: the training prompt of
    appendix C asks for the tags, so a response without them has given no answer). Evaluation leaves it off and
    reads untagged prose too, as the benchmarks' official parsers do. prose: untagged, unboxed text answers with
    its last math-mode expression or number (prose_answer); off where a benchmark's own parser reads the prose."""
    if not response:
        return None
    if require_tags and not re.search(r"<answer>.*?</answer>", response, re.S):
        return None
    start = response.rfind("<answer>")
    if start >= 0:
        end = response.find("</answer>", start)
        text = response[start + len("<answer>"):end if end >= 0 else None]
    elif "</think>" in response:
        text = response[response.rfind("</think>") + len("</think>"):]
    elif "<think>" in response:
        return None  # still thinking: no answer
    else:
        text = response
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    phrases = ANSWER_PHRASE.findall(text)
    if phrases:
        text = phrases[-1].split("\n")[0]
        text = re.sub(r"^(is|:)\s*", "", text.strip()).rstrip(" .")
    elif start < 0 and prose:  # no tags, no box, no answer phrase
        text = prose_answer(text)
    return text.strip() or None


# ----------------------------------------------------------------------------------------------------
# 2. Normalization: strip what does not change the value

UNIT_WORDS = (r"(?:square |cubic )?(?:units?|miles?|meters?|metres?|centimeters?|cm|mm|km|m|inches|inch|in|feet|foot|ft|"
              r"yards?|yd|seconds?|sec|s|minutes?|min|hours?|hrs?|h|days?|weeks?|months?|years?|dollars?|cents?|"
              r"pounds?|lbs?|kg|g|grams?|ounces?|oz|liters?|litres?|l|ml|mph|degrees?|deg|radians?|rad|people|"
              r"students?|points?|ways?|times|apples?|cookies?|pages?|marbles?|books?|hours?)")
UNIT_AT_END = re.compile(rf"\s*\b{UNIT_WORDS}(?:\^\{{?\d\}}?)?\.?$")
NUMBER_LIKE = re.compile(r"[-+]?[\d.,/\\{}()a-z]*\d[)}]*")


def strip_wrappers(s):
    """Math delimiters, a box and a final period around an answer, however they nest: "$\\boxed{12}$." -> "12".
    Gold answers get the same treatment as predictions (math_equal normalizes both)."""
    while True:
        before, s = s, s.strip().removesuffix(".").strip()
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
                s = s[len(left):len(s) - len(right)].strip()
        boxed = last_boxed(s) if s.startswith(("\\boxed", "\\fbox")) else None
        s = boxed.strip() if boxed is not None else s
        if s == before:
            return s


def normalize(s):
    """A canonical string for an answer: same value -> same string as often as a string can manage."""
    if s is None:
        return ""
    if len(s) > MAX_CHARS:  # no answer is this long; keep every regex below linear-time on what it sees
        return s.strip()
    s = strip_wrappers(str(s))
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:text|textnormal|textbf|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)\b\s*", "", s).replace("\\displaystyle", "")
    s = re.sub(r"(\d),\\!\s*(\d)", r"\1,\2", s).replace("{,}", ",")  # 11,\! 111 is a thousands separator
    s = re.sub(r"(\d)\\[,!;: ](?=\d{3}(?!\d))", r"\1", s)  # 1\,234\,567: a thin space between digit groups
    s = re.sub(r"(?<!\\)\\[,!;: ]|\\quad|\\qquad|~", " ", s)  # not the "\\" row break of a matrix
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("−", "-")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\s+degrees?\b", "", s)
    s = re.sub(r"\s*(\\%|%|\s+percent\b)", "", s)
    s = stripped = s.strip().rstrip(".").strip()
    while (m := UNIT_AT_END.search(stripped)) and m.start() > 0:  # "125 miles", "10 cm^2": the number answers
        stripped = stripped[:m.start()]
    if stripped != s and NUMBER_LIKE.fullmatch(stripped.strip()):
        s = stripped.strip()
    s = re.sub(r"^\d{1,3}(?:,\d{3})+(?:\.\d+)?$", lambda m: m.group(0).replace(",", ""), s)
    s = re.sub(r"^\(?\s*([A-Za-z])\s*\)$", r"\1", s)  # "(C)" -> "C"
    return s.strip()


# ----------------------------------------------------------------------------------------------------
# 3. LaTeX -> Python expression text (a small recursive-descent translator for the answer subset)

FUNCTIONS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
             "ln", "log", "exp"}
GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
         "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
         "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
# One-token translations. e and i are Euler's number and the imaginary unit, as in competition answers.
SIMPLE = {"\\pi": "pi", "\\infty": "oo", "\\infinity": "oo", "\\cdot": "*", "\\times": "*", "*": "*", "\\div": "/",
          "e": "E", "i": "I", "+": "+", "-": "-", "/": "/", "(": "(", ")": ")", "!": "!", "[": "(", "]": ")"}
TOKEN = re.compile(r"\\[a-zA-Z]+|\\.|\d+\.?\d*|\.\d+|[a-zA-Z]|\S")


class NotMath(ValueError):
    """The text is outside the LaTeX subset we translate; compare it as a string instead."""


def latex_to_python(s):
    tokens = TOKEN.findall(s)
    out, pos = _translate(tokens, 0, stop=None)
    if pos != len(tokens):
        raise NotMath("unbalanced braces")
    return out


def _argument(tokens, pos):
    """One LaTeX argument: a {group} or a single token (\\frac12, \\sqrt3, x^2)."""
    if pos >= len(tokens):
        raise NotMath("missing argument")
    if tokens[pos] == "{":
        inner, pos = _translate(tokens, pos + 1, stop="}")
        return f"({inner})", pos + 1
    tok = tokens[pos]
    if re.fullmatch(r"\d+", tok):  # \frac12 = \frac{1}{2}: a LaTeX argument is one character
        tokens[pos:pos + 1] = [tok[0], tok[1:]] if len(tok) > 1 else [tok]
        return tok[0], pos + 1
    text, _ = _translate([tok], 0, stop=None)
    return f"({text})", pos + 1


def _function(tok, tokens, pos, depth):
    """A function such as \\sin or \\log_2 applied to its argument, with an optional power (\\sin^2 x)."""
    power, base = None, None
    if tok == "\\log" and pos < len(tokens) and tokens[pos] == "_":  # \log_2 8
        base, pos = _argument(tokens, pos + 1)
    if pos < len(tokens) and tokens[pos] == "^":  # \sin^2 x = (sin x)^2
        power, pos = _argument(tokens, pos + 1)
    if pos < len(tokens) and tokens[pos] == "(":
        arg, pos = _translate(tokens, pos + 1, ")", depth + 1)
        pos += 1
    else:
        arg, pos = _argument(tokens, pos)
    name = {"ln": "log", "arcsin": "asin", "arccos": "acos", "arctan": "atan"}.get(tok[1:], tok[1:])
    arg = f"{arg}, {base}" if base else arg
    return f"{name}({arg})" + (f"**{power}" if power else ""), pos


def _translate(tokens, pos, stop, depth=0):
    if depth > MAX_DEPTH:
        raise NotMath("too deeply nested")
    out, abs_open = [], False
    while pos < len(tokens):
        tok = tokens[pos]
        if tok == stop:
            return " ".join(out), pos
        pos += 1
        if tok == "{":
            inner, pos = _translate(tokens, pos, "}", depth + 1)
            out.append(f"({inner})")
            pos += 1
        elif tok == "}":
            raise NotMath("unbalanced braces")
        elif tok == "\\frac":
            num, pos = _argument(tokens, pos)
            den, pos = _argument(tokens, pos)
            out.append(f"({num}/{den})")
        elif tok == "\\sqrt":
            if pos < len(tokens) and tokens[pos] == "[":
                index, pos = _translate(tokens, pos + 1, "]", depth + 1)
                arg, pos = _argument(tokens, pos + 1)
                out.append(f"root({arg}, {index})")
            else:
                arg, pos = _argument(tokens, pos)
                out.append(f"sqrt({arg})")
        elif tok in ("^", "_"):
            if pos < len(tokens) and re.fullmatch(r"\d+", tokens[pos]):  # 2^10 means 1024, whatever TeX says
                arg, pos = tokens[pos], pos + 1
            else:
                arg, pos = _argument(tokens, pos)
            if tok == "^":
                out.append(f"**{arg}")
            elif out and re.fullmatch(r"[a-zA-Z]\w*", out[-1]):  # x_1 -> one symbol named x_1
                out[-1] += "_" + re.sub(r"\W", "", arg)
            else:
                raise NotMath("subscript")
        elif tok.startswith("\\") and tok[1:] in FUNCTIONS:
            call, pos = _function(tok, tokens, pos, depth)
            out.append(call)
        elif tok.startswith("\\") and tok[1:] in GREEK:
            out.append(tok[1:] + "_")  # a symbol; the underscore keeps sympy from reading e.g. "beta" as a function
        elif tok == "|":
            out.append(")" if abs_open else "Abs(")
            abs_open = not abs_open
        elif tok in SIMPLE:
            out.append(SIMPLE[tok])
        elif re.fullmatch(r"\d+\.?\d*|\.\d+|[a-zA-Z]", tok):
            out.append(tok)
        else:
            raise NotMath(f"unsupported {tok!r}")
    if stop is not None:
        raise NotMath("unbalanced braces")
    if abs_open:
        raise NotMath("unbalanced |")
    return " ".join(out), pos


# ----------------------------------------------------------------------------------------------------
# 4. Python text -> sympy, under a whitelist and size guards

_SYMPY = None


def _sympy():
    """Import sympy lazily: `import rewards` stays instant, and worker processes pay only when they need it."""
    global _SYMPY
    if _SYMPY is None:
        import sympy  # heavy: see the docstring
        from sympy.parsing import sympy_parser as sp  # heavy
        names = ("sqrt root sin cos tan cot sec csc asin acos atan sinh cosh tanh log exp Abs factorial pi E oo "
                 "I Integer Float Rational Symbol Add Mul Pow").split()
        whitelist = {name: getattr(sympy, name) for name in names}

        def factorial(n):  # sympy evaluates n! on construction, even under evaluate=False: check n first
            if n.is_number and abs(complex(n.evalf(15))) > 200:
                raise NotMath("factorial too large")
            return sympy.factorial(n)
        whitelist["factorial"] = factorial
        whitelist["__builtins__"] = {}
        transforms = sp.standard_transformations + (sp.implicit_multiplication, sp.factorial_notation)
        _SYMPY = (sympy, sp, whitelist, transforms)
    return _SYMPY


def to_sympy(text):
    """A sympy expression for an answer string, or raise NotMath."""
    if len(text) > MAX_CHARS:
        raise NotMath("too long")
    code = re.sub(r"\s+!", "!", latex_to_python(text))
    if re.search(r"(?<!\\)(?<![A-Za-z])[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+", " ", text)):
        raise NotMath("prose")  # words like "red" would otherwise become the product r*e*d
    names = set(re.findall(r"[A-Za-z_]\w*", code))
    allowed = {"sqrt", "root", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh",
               "tanh", "log", "exp", "Abs", "pi", "E", "I", "oo"}
    if any(n.startswith("_") or (n not in allowed and not re.fullmatch(r"[A-Za-z]+_\w*|[A-Za-z]", n)) for n in names):
        raise NotMath("unknown name")  # multi-letter words are prose, not math
    sympy, sp, whitelist, transforms = _sympy()
    code = re.sub(r"(\d+\.\d*|\.\d+)", r"Rational('\1')", code)  # decimals exact: 0.75 is 3/4
    try:
        tree = sp.parse_expr(code, global_dict=dict(whitelist), transformations=transforms, evaluate=False)
        _check_size(tree, sympy)
        return sp.parse_expr(code, global_dict=dict(whitelist), transformations=transforms)
    except NotMath:
        raise
    except Exception as e:  # noqa: BLE001 - sympy raises many types on junk; all mean "not math"
        raise NotMath(f"{type(e).__name__}") from e


def _check_size(tree, sympy):
    """Refuse expressions whose exact evaluation would be huge: 9^(9^9), 100000!, 10^10^10."""
    def magnitude(x):  # floating-point estimate: mpmath handles 9^(9^9) without computing its digits
        return abs(complex(x.evalf(15)))
    try:
        for node in sympy.preorder_traversal(tree):
            if isinstance(node, sympy.Pow) and node.args[0].is_number and node.args[1].is_number:
                base, exponent = map(magnitude, node.args)
                if base > 0 and exponent * abs(math.log10(base)) > MAX_POWER_DIGITS:
                    raise NotMath("power too large")
    except (OverflowError, TypeError, ValueError) as e:
        raise NotMath("too large") from e


# sympy runs in a helper process that is killed when it overruns. A thread cannot be stopped, and big-integer
# arithmetic holds the GIL, so a runaway thread would starve its caller; a process can always be killed.
_SERVERS = threading.local()


def _serve():
    """The helper's loop: one JSON [pred, gold, rel_tol] per line in, "1" or "0" out."""
    _sympy()
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            verdict = _equal(*json.loads(line))
        except Exception:  # noqa: BLE001 - anything sympy throws is a "no"
            verdict = False
        print("1" if verdict else "0", flush=True)


def _server():
    proc = getattr(_SERVERS, "proc", None)
    if proc is None or proc.poll() is not None:
        proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, bufsize=1)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("rewards.py: the verifier helper process failed to start")
        _SERVERS.proc = proc
    return proc


def equal_with_deadline(pred, gold, rel_tol, timeout):
    """_equal(pred, gold) in this thread's helper process; False (and a fresh helper) past `timeout` seconds."""
    proc = _server()
    proc.stdin.write(json.dumps([pred, gold, rel_tol]) + "\n")
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        proc.wait()
        _SERVERS.proc = None
        return False
    return proc.stdout.readline().strip() == "1"


# ----------------------------------------------------------------------------------------------------
# 5. Equivalence

def at_random_points(exprs, n=4, seed=0):
    """Complex values of the expressions at n random rational points: identities by evaluation, not algebra."""
    sympy = _sympy()[0]
    symbols = sorted(set().union(*(e.free_symbols for e in exprs)), key=str)
    rng = random.Random(seed)
    for _ in range(n):
        point = {s: sympy.Rational(rng.randint(11, 97), 37) for s in symbols}
        yield [complex(e.evalf(30, subs=point)) for e in exprs]


def close(x, y, tol):
    return abs(x - y) <= tol * max(abs(x), abs(y), 1e-12)


def values_equal(a, b, exact, rel_tol):
    """Two sympy expressions: exactly when both were written exactly, else within rel_tol; symbols by sampling."""
    if not (a.free_symbols | b.free_symbols):
        if exact and a.is_Rational and b.is_Rational:
            return bool(a == b)
        x, y = complex(a.evalf(30)), complex(b.evalf(30))
        return x == y or close(x, y, 1e-12 if exact else rel_tol)
    agree = 0  # identities (trig, algebra) at random points; sympy's simplify only if those are inconclusive
    for x, y in at_random_points([a, b]):
        if any(math.isnan(v.real) or math.isinf(v.real) for v in (x, y)):
            continue
        if not close(x, y, 1e-9 if exact else rel_tol):
            return False
        agree += 1
    return agree >= 2 or _sympy()[0].simplify(a - b) == 0


def equations_equal(p, g, rel_tol):
    """lhs1 = rhs1 and lhs2 = rhs2 describe the same set when (lhs1 - rhs1) / (lhs2 - rhs2) is a nonzero constant."""
    d1 = [to_sympy(side) for side in p.split("=", 1)]
    d2 = [to_sympy(side) for side in g.split("=", 1)]
    e1, e2 = d1[0] - d1[1], d2[0] - d2[1]
    if not (e1.free_symbols | e2.free_symbols):
        return values_equal(d1[0], d2[0], True, rel_tol) and values_equal(d1[1], d2[1], True, rel_tol)
    ratios = []
    for x, y in at_random_points([e1, e2], seed=1):
        if abs(y) < 1e-12:
            if abs(x) > 1e-9:
                return False
            continue
        ratios.append(x / y)
    return len(ratios) >= 2 and abs(ratios[0]) > 1e-12 and all(close(r, ratios[0], 1e-9) for r in ratios)


def split_top(s, seps=(",",)):
    """Split on separators outside (), [], {}."""
    parts, depth, cur, i = [], 0, "", 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            cur += s[i:i + 2]
            i += 2
            continue
        ch = s[i]
        depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        sep = next((x for x in seps if depth == 0 and s.startswith(x, i)), None)
        if sep:
            parts.append(cur.strip())
            cur, i = "", i + len(sep)
            continue
        cur += ch
        i += 1
    parts.append(cur.strip())
    return parts


def structure(s):
    """(kind, parts): 'matrix', 'union', 'interval', 'tuple', 'set', 'list', 'pm' or 'scalar'."""
    m = re.fullmatch(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", s, re.S)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        return "matrix", [[c.strip() for c in r.split("&")] for r in rows]
    if "\\cup" in s:
        return "union", [p.strip() for p in s.split("\\cup")]
    if s.startswith("\\{") and s.endswith("\\}"):
        return "set", split_top(s[2:-2])
    if len(s) > 2 and s[0] in "([" and s[-1] in ")]":
        depth = list(itertools.accumulate(1 if c in "([{" else -1 if c in ")]}" else 0 for c in s[1:-1]))
        if min(depth) >= 0 and depth[-1] == 0:  # the outer brackets enclose everything: "(1,2)", not "(1)+(2)"
            parts = split_top(s[1:-1])
            if len(parts) > 1:
                return ("tuple" if s[0] + s[-1] == "()" else "interval"), [s[0] + s[-1]] + parts
    parts = split_top(s, (",", ";", "\\text{ and }", " and "))
    if len(parts) > 1:
        return "list", parts
    if "\\pm" in s and s.count("\\pm") == 1:
        left, right = s.split("\\pm")
        return "pm", [f"{left}+{right}" if left.strip() else right, f"{left}-{right}" if left.strip() else f"-{right}"]
    return "scalar", [s]


def _same_multiset(ps, gs, eq):
    remaining = list(gs)
    for p in ps:
        match = next((i for i, g in enumerate(remaining) if eq(p, g)), None)
        if match is None:
            return False
        remaining.pop(match)
    return not remaining


def text_equal(p, g):
    """Normalized strings, then the same up to case and spacing: True / False, or None when undecided."""
    p, g = normalize(p), normalize(g)
    if not p or not g:
        return False
    return True if re.sub(r"\s+", "", p).lower() == re.sub(r"\s+", "", g).lower() else None


def _equal(p, g, rel_tol, depth=0):
    if (verdict := text_equal(p, g)) is not None:
        return verdict
    p, g = normalize(p), normalize(g)
    if depth > 3:
        return False
    pk, pp = structure(p)
    gk, gp = structure(g)
    eq = lambda a, b: _equal(a, b, rel_tol, depth + 1)  # noqa: E731
    unordered = {"set", "list", "pm", "union"}
    if pk in unordered and gk in unordered:
        return len(pp) == len(gp) and _same_multiset(pp, gp, eq)
    if pk == gk == "matrix":
        return [len(r) for r in pp] == [len(r) for r in gp] and all(
            eq(a, b) for ra, rb in zip(pp, gp) for a, b in zip(ra, rb))
    if pk in ("tuple", "interval") or gk in ("tuple", "interval"):
        ordered = {"tuple", "interval", "list"}  # "1, 2" may answer "(1, 2)"
        if pk in ordered and gk in ordered:
            pb, gb = (pp[0] if pk != "list" else "()"), (gp[0] if gk != "list" else "()")
            pv, gv = (pp[1:] if pk != "list" else pp), (gp[1:] if gk != "list" else gp)
            return pb == gb and len(pv) == len(gv) and all(eq(a, b) for a, b in zip(pv, gv))
        return False
    if pk != "scalar" or gk != "scalar":
        return False
    return scalars_equal(p, g, rel_tol)


def scalars_equal(p, g, rel_tol):
    assignment = r"^\s*[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*([^=]+)$"  # "x = 11" answers "11"
    if ("=" in p) != ("=" in g):
        p = re.sub(assignment, r"\1", p) if "=" in p else p
        g = re.sub(assignment, r"\1", g) if "=" in g else g
        if "=" in p or "=" in g:
            return False
    elif "=" in p:
        return equations_equal(p, g, rel_tol)
    try:
        a, b = to_sympy(p), to_sympy(g)
    except NotMath:
        return False
    written_exactly = not re.search(r"\d\.\d|(?<!\d)\.\d", p + " " + g)  # no rounded decimal on either side
    return values_equal(a, b, written_exactly, rel_tol)


def math_equal(pred, gold, rel_tol=REL_TOL, timeout=TIMEOUT):
    """Whether two answer strings denote the same mathematical object. Never raises; bounded time."""
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if len(pred) > MAX_CHARS or len(gold) > MAX_CHARS:
        return pred.strip() == gold.strip()
    if (verdict := text_equal(pred, gold)) is not None:
        return verdict  # most correct answers end here, without sympy
    return equal_with_deadline(pred, gold, rel_tol, timeout)


def math_reward(response, gold, require_tags=False):
    """Paper §2.2: 1.0 if the response's final answer is equivalent to the ground truth, else 0.0."""
    answer = extract_answer(response, require_tags)
    return float(answer is not None and math_equal(answer, gold))


# ----------------------------------------------------------------------------------------------------
# 6. Multiple choice

def choice_letter(answer, options):
    """The option letter an extracted answer names, or None (none, or several different ones)."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:max(len(options), 1)]
    if len(answer) > MAX_CHARS:
        return None
    s = normalize(answer)
    s = re.sub(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:\-]?\s*", "", s, flags=re.I)
    if re.fullmatch(r"\(?[a-z]\)?", s):
        s = s.upper()  # a lone lowercase letter is a choice; inside prose "a" is an article
    m = re.fullmatch(rf"\(?([{letters}])\)?(?:\s*[:.)]\s*(.*))?", s, re.S)
    if m:
        return m.group(1)
    canon = lambda t: re.sub(r"[\s.]+", " ", str(t)).strip().lower()  # noqa: E731
    by_text = [letters[i] for i, o in enumerate(options) if canon(o) and canon(o) == canon(s)]
    if len(by_text) == 1:
        return by_text[0]
    named = set(re.findall(rf"\(([{letters}])\)", s)) or set(re.findall(rf"\b([{letters}])\b", s))
    if len(named) == 1:
        return named.pop()
    if named:
        return None  # several different letters: no single choice
    contained = [letters[i] for i, o in enumerate(options) if canon(o) and canon(o) in canon(s)]
    return contained[0] if len(contained) == 1 else None


def choice_reward(response, options, answer, require_tags=False):
    """1.0 if the response's final answer picks the gold letter `answer`, by letter or by the option's text."""
    extracted = extract_answer(response, require_tags)
    return float(extracted is not None and choice_letter(extracted, options) == normalize(str(answer)).upper())


# ----------------------------------------------------------------------------------------------------
# 7. Many at once: worker processes, each task with a hard deadline

_POOL = None


def _score(item):
    response, gold, options, require_tags = item
    return choice_reward(response, options, gold, require_tags) if options else math_reward(response, gold, require_tags)


def batch_rewards(responses, golds, options=None, processes=4, require_tags=False):
    """Rewards for many responses at once. Each of `processes` threads drives its own helper process, so the
    sympy work runs in parallel, and every comparison keeps its own deadline. `options`: per response, None
    (math: math_equal) or the option texts (multiple choice: the gold is a letter). `require_tags`: see
    extract_answer."""
    global _POOL
    items = [(r, g, o, require_tags) for r, g, o in zip(responses, golds, options or [None] * len(golds))]
    if processes <= 1:
        return [_score(it) for it in items]
    if _POOL is None or _POOL._max_workers != processes:  # threads (and their helpers) live across calls
        _POOL = ThreadPoolExecutor(processes)
    return list(_POOL.map(_score, items))


# ----------------------------------------------------------------------------------------------------
# 8. The benchmarks' own parsers, ported rule for rule (evaluate.py reads untagged prose with them)

def official_choice(response, options):
    """MMMU-Pro's parse_multi_choice_response (mmmu-pro/evaluate.py), minus its random guess: None instead."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    last = response.rfind("Answer:")
    if last != -1:
        named = [c for c in letters if c in response[last + len("Answer:"):].strip()]
        if len(named) == 1:
            return named[0]
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = f" {response} "
    candidates = [c for c in letters if f"({c})" in response]
    brackets = bool(candidates)
    candidates = (candidates or [c for c in letters if f"{c} " in response]
                  or [c for c in letters if f"{c}." in response])
    by_text = False
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, o in zip(letters, options) if o.lower() in response.lower()]
        by_text = True
    if not candidates:
        return None
    if by_text:  # several: the one mentioned last
        return max(candidates, key=lambda c: response.lower().rfind(options[letters.index(c)].lower()))
    return max(candidates, key=lambda c: response.rfind(f"({c})" if brackets else f" {c} "))


def mmmu_normalize(s):
    """MMMU's normalize_str: numbers to floats rounded to 2 decimals, other strings lower-cased."""
    s = str(s).strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
        return [" " + s, s + " "] if len(s) == 1 else [s]


def mmmu_open_predictions(response):
    """MMMU's parse_open_response: the tails of the key sentences plus every number in them."""
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys, indicators = [], ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    for i, sentence in enumerate(sentences):
        shortest = None  # the shortest tail; as in the original, an empty tail does not count as found
        for ind in indicators + (["="] if i == len(sentences) - 1 else []):
            tail = sentence.split(ind)[-1].strip() if ind in sentence else None
            if tail is not None and (not shortest or len(tail) < len(shortest)):
                shortest = tail
        if shortest and shortest not in [":", ",", ".", "!", "?", ";", "'"]:
            keys.append(shortest)
    keys = keys or [response]
    found = [n for k in keys for n in re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", k)
             + re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", k)
             + re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", k)]
    return [p for s in keys + found for p in mmmu_normalize(s)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Extract the answer from a response and verify it against a gold answer.")
    ap.add_argument("response", nargs="?", help="a model response (tags optional)")
    ap.add_argument("gold", nargs="?", help="the ground-truth answer")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the helper process
    args = ap.parse_args()
    if args.serve:
        _serve()
    elif args.response is not None and args.gold is not None:
        answer = extract_answer(args.response)
        print(f"extracted: {answer!r}\nnormalized: {normalize(answer)!r} vs {normalize(args.gold)!r}")
        print(f"reward: {math_reward(args.response, args.gold)}")
    else:
        ap.print_help()
