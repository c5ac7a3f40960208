"""Verifiable rewards for X-Reasoner's GRPO stage and for evaluation: r = 1 if the final answer is right, else 0.

The paper (§2.2) rewards a response 1 when its final answer is semantically equivalent to the ground truth and
0 otherwise. This file is that referee, a pipeline read top to bottom (each rule a named function, its example in
its docstring):

    1. extract     the final answer of a response, or of a gold written as a worked solution: the last <answer>,
                   else the text after </think>; inside it the last \\boxed{} with the boxes joined to it ("\\boxed{1}
                   and \\boxed{2}": two answers), else what follows "the answer is", else math spans joined by
                   "and", else the last math expression or number of the last sentence that has one
    2. normalise   what does not change the value goes: delimiters, \\left, thin spaces, \\dfrac, units, percent,
                   degrees, relation spellings (\\geq, >=), leading zeros, a doubled backslash
    3. split       into answers, each with the label that names it: "k = 45, n = 2" -> (k, 45), (n, 2); a chain
                   "x = 5+5+1 = 11" answers with its last side; a set or a ± gives several
    4. compare     several answers as a set (by label when both sides name them), a relation or interval as a set
                   of reals, tuples in order, matrices entry by entry, one value through our own LaTeX -> sympy
                   translation (sympy's parse_latex needs antlr), equations as the same solution set
    math_reward / choice_reward     the 1.0 / 0.0 that GRPO and evaluate.py use
    batch_rewards                   many of them in parallel helper processes, each with a hard deadline
The benchmarks' own parsers for untagged prose (MMMU, MMMU-Pro, MathVista) live beside evaluation, in evaluate.py.

Nothing here makes two different answers equal: a different number, set, interval end or tuple order scores 0,
and so do several answers to a question with one (tests/test_rewards.py holds a negative case for every rule).

Safety: model text is never `eval`'d: our translator emits only numbers, operators and whitelisted names, and
`parse_expr` runs with empty builtins. Sizes are bounded before sympy, and sympy runs in a helper process that is
killed past its deadline (any thread, any process; signals only work in the main thread). Timeout = "not equal".

    python rewards.py "<think>...</think><answer>\\frac{3}{4}</answer>" "0.75"     # extraction and verdict
    python bench/bench_rewards.py                                              # answers/s, agreement, side by side
"""
import argparse
import bisect
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
MAX_TEXT = 100_000      # longer golds or responses are not searched for an answer inside them
MAX_DEPTH = 40          # brace / bracket nesting
MAX_POWER_DIGITS = 400  # estimated digits of an exact integer power we are willing to compute
TIMEOUT = 2.0           # seconds of sympy work per comparison
REL_TOL = 1e-6          # tolerance when one side is a rounded decimal; exact comparison otherwise

# What names a quantity, so that "k = 45" answers "45": x, a_{37}, \alpha, f(x), AB, |AB|, \frac{NO}{BO}; a ratio
# of names (V_1:V_2) or a tuple of names ((p, q)). "x^2" or "2x" is an expression, never a name.
GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
         "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
         "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"}
ATOM = rf"(?:[A-Za-z]|\\(?:{'|'.join(sorted(GREEK))}))(?:_\{{?[A-Za-z0-9]+\}}?)?'*"
NAME = (rf"(?:{ATOM}(?:\(\s*{ATOM}(?:\s*,\s*{ATOM})*\s*\))?|[A-Z]{{2,8}}|\|[A-Za-z]{{1,4}}\||"
        rf"\\frac\{{[A-Z]{{1,4}}\}}\{{[A-Z]{{1,4}}\}})")
LABEL = re.compile(rf"\(\s*{NAME}(?:\s*,\s*{NAME})+\s*\)|{NAME}(?:\s*:\s*{NAME})*")

# ----------------------------------------------------------------------------------------------------
# 1. Extract: the final answer a text gives

END_OF_TURN = re.compile(r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>")
ANSWER_WORDS = re.compile(r"final answer is|the answer is|answer\s*:", re.IGNORECASE)
ANSWER_PHRASE = re.compile(rf"(?:{ANSWER_WORDS.pattern})\s*(.+)", re.IGNORECASE)
MATH_MODE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
# a word of prose ("It is 9."), not a LaTeX command or a variable; two of them make a text prose
PROSE_WORD = re.compile(r"(?<![\\A-Za-z])(?:[A-Za-z]{3,}|(?i:is|it|so|we|be|to|of|as|at|by))(?![A-Za-z])")
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?|(?<![\w.])-?\.\d+")  # 12, -1,234, 3.5, .4: not inside a word
NUMBER_OR_FRACTION = re.compile(rf"(?:{NUMBER.pattern})(?:/\d+)?")  # and 2/3, as prose writes a fraction
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def boxes(text):
    """Every outermost \\boxed{...} or \\fbox{...} of `text` (nested braces balanced; "\\boxed 5" too), in order, as
    (start, end, content); a box that never closes ends the list with content None."""
    found, after = [], 0
    for m in re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text):
        if m.start() < after:
            continue  # inside the box before it
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    found.append((m.start(), j + 1, text[i + 1:j]))
                    after = j + 1
                    break
            else:
                return found + [(m.start(), len(text), None)]  # every later box is inside this one
        elif short := re.match(r" ([^\s$]+)", text[m.end():]):
            found.append((m.start(), m.end() + short.end(), short.group(1)))
            after = m.end() + short.end()
    return found


def last_boxed(text):
    """Content of the last \\boxed{...} or \\fbox{...}, or None."""
    found = boxes(text)
    return found[-1][2] if found else None


REVISING = {"finally", "final", "so", "thus", "therefore", "hence", "wait", "actually", "instead", "rather", "but",
            "not", "no", "is", "gives", "becomes", "equals"}  # between two boxes: the later one replaces the earlier


def joins(gap):
    """Whether the text between two boxes makes them one answer with several parts: punctuation, math delimiters,
    spacing and at most four words in one sentence (" and ", "\\quad \\text{and} \\quad", " for part (a) and ",
    " papers and "), none of them a word that revises or concludes ("\\boxed{3} and finally \\boxed{5}", "\\boxed{3}.
    Wait, it is \\boxed{5}": the last box answers alone)."""
    if len(gap) > 100 or "\n\n" in gap or SENTENCE_END.search(gap.replace("\\.", "")):
        return False
    words = [w.lower() for w in re.findall(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", " ", gap))]
    return len(words) <= 4 and not REVISING & set(words)


def boxed_answer(text, several=True):
    """The last box, and (with `several`) the boxes before it that join it: "\\boxed{1} and \\boxed{2}" -> "1, 2",
    which is compared as several answers. None without a box, or when the last box never closes."""
    found = boxes(text)
    if not found or found[-1][2] is None:
        return None
    run = [found[-1]]
    while several and len(run) < len(found) and joins(text[found[-len(run) - 1][1]:run[0][0]]):
        run.insert(0, found[-len(run) - 1])
    return ", ".join(content.strip() for _, _, content in run if content.strip()) or None


def phrase_answer(text, prose=True):
    """What follows the last "the answer is" / "Answer:": a math span ("The final answer is $10,455$. I hope it is
    correct." -> "10,455"), else its sentence, which answers with its last number when it is prose ("Final Answer:
    The largest $n$ is 34." -> "34"). Without `prose` (a benchmark's own parser reads on), the line as written."""
    if not prose:
        phrases = ANSWER_PHRASE.findall(text)
        return re.sub(r"^(is|:)\s*", "", phrases[-1].split("\n")[0].strip()).rstrip(" .") if phrases else None
    found = list(ANSWER_WORDS.finditer(text))
    if not found:
        return None
    rest = re.sub(r"^(is|:)\s*", "", text[found[-1].end():].strip().split("\n")[0])
    end = SENTENCE_END.search(MATH_MODE.sub(lambda m: " " * len(m.group(0)), rest))  # not a "." inside math
    sentence = re.sub(r"^(?:\\?[\"'“”])+|(?:\\?[\"'“”])+$", "", rest[:end.start() if end else None].strip())
    if joined := spans_answer(sentence):
        return joined
    if span := MATH_MODE.match(sentence):
        return next(g for g in span.groups() if g is not None)
    return prose_answer(sentence) if len(PROSE_WORD.findall(sentence)) >= 2 else sentence.strip()


def spans_answer(text):
    """A text of math spans joined by nothing but commas, "and" or "or": "$1$ and $2$ and $3$" -> "1, 2, 3"."""
    spans = list(MATH_MODE.finditer(text))
    gaps = [text[a.end():b.start()] for a, b in zip(spans, spans[1:])]
    if len(spans) < 2 or text[:spans[0].start()].strip() or text[spans[-1].end():].strip(" .") or not all(
            re.fullmatch(r"\s*[,;]?\s*(?:and|or)?\s*", gap) for gap in gaps):
        return None
    return ", ".join(next(g for g in m.groups() if g is not None) for m in spans)


def prose_answer(text):
    """Untagged, unboxed prose answers in its last sentence that holds a value: with the last math expression in it
    that is not a bare name, else its last number ("It comes to $3$ apples and $\\sqrt{2}$ more" -> "\\sqrt{2}";
    "The largest $n$ is 34." -> "34"; "...$$\\geq 2.$$ So the error grows by 100%." -> "100"). Text with no
    sentence of prose ("x^2 + 1") is its own answer."""
    outside = MATH_MODE.sub(lambda m: " " * len(m.group(0)), text)  # numbers and sentence ends outside math
    spans = [(m.start(), next(g for g in m.groups() if g is not None)) for m in MATH_MODE.finditer(text)]
    if not spans and len(PROSE_WORD.findall(outside)) < 2:
        return text
    numbers = [(m.start(), m.group(0)) for m in NUMBER_OR_FRACTION.finditer(outside)]
    ends = sorted([m.start() for m in SENTENCE_END.finditer(outside)] + [  # and after a display, or math ending in "."
        m.end() - 1 for m in MATH_MODE.finditer(text)
        if m.group(1) or m.group(4) or m.group(0).rstrip("$\\)").endswith(".")])
    sentence = lambda pos: bisect.bisect_left(ends, pos)  # noqa: E731  (the sentence a position is in)
    last = max((sentence(pos) for pos, _ in spans + numbers), default=None)
    if last is None:
        return text
    values = [v for pos, v in spans if sentence(pos) == last and not LABEL.fullmatch(v.strip())]
    names = [v for pos, v in spans if sentence(pos) == last]
    return (values or [v for pos, v in numbers if sentence(pos) == last] or names)[-1]


def final_answer(text, prose=True, several=True):
    """The answer a text gives: its boxes (or, with `prose`, an answer phrase after them), else its answer phrase,
    else (with `prose`) its joined math spans or the answer of its prose; else the text itself. None if empty."""
    answer = boxed_answer(text, several)
    stated_after = prose and (found := boxes(text)) and ANSWER_PHRASE.search(text, found[-1][1])
    if answer is None or stated_after:  # "... \boxed{255} ... The final answer is $10,455$.": the last word holds
        answer = phrase_answer(text, prose)
    if answer is None and prose:
        answer = spans_answer(text) or prose_answer(text)
    return (text if answer is None else answer).strip() or None


def tagged(response):
    """Whether a response gives its answer in the training format: inside <answer>...</answer> (appendix C's
    training prompt asks for it). GRPO's reward reads nothing else (extract_answer's require_tags)."""
    return re.search(r"<answer>.*?</answer>", response or "", re.S) is not None


def extract_answer(response, require_tags=False, prose=True, several=True):
    """The final answer a model gave, or None when there is none (e.g. it never left <think>).

    require_tags: only an answer written inside <answer>...</answer> counts (GRPO's reward: the training prompt of
    appendix C asks for the tags, so a response without them has given no answer). Evaluation leaves it off and
    reads untagged prose too, as the benchmarks' official parsers do. prose: untagged, unboxed text answers as
    prose_answer() reads it; off where a benchmark's own parser reads the prose. several: boxes joined by "and" are
    one answer with several parts (boxed_answer); off where a benchmark's parser wants the last box alone. What
    follows an end-of-turn token (a leaked next turn, "<|im_start|>user ...") is not part of the response."""
    if not response:
        return None
    response = END_OF_TURN.split(response, maxsplit=1)[0]
    if require_tags and not tagged(response):
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
    return final_answer(text, prose and start < 0, several)


def answer_in(s):
    """What a gold (or an extracted) answer says, when it is more than an answer: a worked solution or a sentence
    answers with its final answer ("$\\boxed{2}, \\boxed{3}$" -> "2, 3"; "\\boxed{1} papers and \\boxed{2} bins" ->
    "1, 2"; "$1$ and $2$" -> "1, 2"); anything else is its own answer."""
    if len(s) > MAX_TEXT:
        return s
    worded = len(PROSE_WORD.findall(re.sub(r"\\(?:begin|end)\{[^{}]*\}", " ", MATH_MODE.sub(" ", s)))) >= 2
    if "\\boxed" in s or "\\fbox" in s or worded or len(MATH_MODE.findall(s)) >= 2 or ANSWER_PHRASE.search(s):
        return final_answer(s) or s
    return s


# ----------------------------------------------------------------------------------------------------
# 2. Normalise: strip what does not change the value

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
    """A canonical string for an answer, shared with multiple choice: same value -> same string as often as a
    string can manage."""
    if s is None:
        return ""
    if len(s) > MAX_CHARS:  # no answer is this long; keep every regex below linear-time on what it sees
        return s.strip()
    s = strip_wrappers(str(s))
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:text|textnormal|textbf|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)\b\s*", "", s).replace("\\displaystyle", "")
    s = re.sub(r"(\d),\\!\s*(\d)", r"\1,\2", s)  # 11,\! 111 is a thousands separator, and so is {,}
    s = re.sub(r"\s*\{\s*,\s*\}\s*", ",", s)
    s = re.sub(r"(\d)\\[,!;: ](?=\d{3}(?!\d))", r"\1", s)  # 1\,234\,567: a thin space between digit groups
    s = re.sub(r"(?<!\\)\\[,!;: ]|\\quad|\\qquad|~", " ", s)  # not the "\\" row break of a matrix
    s = re.sub(r"\\[dtc]frac", r"\\frac", s).replace("−", "-")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\s+degrees?\b", "", s)
    s = re.sub(r"\s*(\\%|%|\s+percent\b)", "", s)
    s = stripped = s.strip().rstrip(".").strip()
    while (m := UNIT_AT_END.search(stripped)) and m.start() > 0:  # "125 miles", "10 cm^2": the number answers
        stripped = stripped[:m.start()]
    if stripped != s and NUMBER_LIKE.fullmatch(stripped.strip()):
        s = stripped.strip()
    s = re.sub(r"^[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?$", lambda m: m.group(0).replace(",", ""), s)  # not "0,111"
    s = re.sub(r"^\(?\s*([A-Za-z])\s*\)$", r"\1", s)  # "(C)" -> "C"
    return s.strip()


# What only a mathematical answer needs, on top of normalize(): each rule one function, applied in this order.

def single_escapes(s):
    r"""A LaTeX command written with a doubled backslash (text escaped twice) has one: "\\frac12" is "\frac12".
    A matrix's row break (two backslashes before a number or a space) is left alone."""
    return re.sub(r"(?<!\\)\\(?=\\(?:left|right|[dtc]?frac|sqrt|boxed|text\w*|math\w+|pi|infty|cdot|times|pm|le|ge|"
                  r"leq|geq|ne|neq|lt|gt|in|cup|approx|circ|quad|begin|end|sin|cos|tan|log|ln)(?![A-Za-z]))", "", s)


def percent_words(s):
    """"28 pct" and "28 percentage" are "28%" (normalize() then drops the sign, as it does for "28 percent")."""
    return re.sub(r"\s*\b(?:pct|percentage)\b", "%", s)


def relations(s):
    """One spelling per relation: "\\geq", "\\ge", "≥" -> ">="; "\\leq", "\\le", "≤" -> "<="; "\\neq", "\\ne",
    "≠" -> "!="; "\\gt", "\\lt" -> ">", "<"; "≈" -> "\\approx"."""
    for spellings, canonical_form in ((r"\\geq?(?![A-Za-z])|≥", ">="), (r"\\leq?(?![A-Za-z])|≤", "<="),
                                      (r"\\neq?(?![A-Za-z])|≠", "!="), (r"\\gt(?![A-Za-z])", ">"),
                                      (r"\\lt(?![A-Za-z])", "<"), ("≈", "\\\\approx")):
        s = re.sub(spellings, canonical_form, s)
    return s


def spaced_connectors(s):
    """"W(x)=1orW(x)=-1" -> "W(x)=1 or W(x)=-1": an "or" or "and" glued between one answer and the next."""
    return re.sub(r"(?<=[\d)}])(or|and)(?=[A-Z(\\\d-])", r" \1 ", s)


def digit_groups(s):
    """A space between groups of three digits is a thousands separator: "1 000" -> "1000"."""
    return re.sub(r"^-?\d{1,3}(?: \d{3})+(?:\.\d+)?$", lambda m: m.group(0).replace(" ", ""), s)


def leading_zeros(s):
    """"004" -> "4" (a count padded to three digits); "0.5", "10" and "0" keep theirs."""
    return re.sub(r"^(-?)0+(?=\d)", r"\1", s)


MAGNITUDES = {"hundred", "thousand", "million", "billion", "trillion", "dozen", "pi", "and", "or", "times"}


def unit_words(s):
    """A number followed by one to three words is the number: "0.06 yuan" -> "0.06", "35 cm" -> "35". A word that
    scales it ("3 million", "2 pi") stays, so a unit never makes two different numbers equal."""
    m = re.fullmatch(r"(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?|-?\\frac\{[^{}]*\}\{[^{}]*\})\s*((?:[A-Za-z]{2,}\.?\s*)"
                     r"{1,3})", s)
    words = {w.lower().rstrip("s") for w in re.findall(r"[A-Za-z]+", m.group(2))} if m else {"pi"}
    return m.group(1) if not words & MAGNITUDES else s


def outer_braces(s):
    """Braces around the whole answer only group it: "{1, 3}" -> "1, 3" (a set is written \\{1, 3\\})."""
    return s[1:-1].strip() if s.startswith("{") and s.endswith("}") and encloses(s) else s


def bracketed_matrix(s):
    """A matrix environment inside brackets is the matrix: "[\\begin{array}{cc}1 & 2\\end{array}]" -> the array."""
    m = re.fullmatch(r"[\[(]\s*(\\begin\{(\w+)\}.*\\end\{\2\})\s*[\])]", s, re.S)
    return m.group(1) if m else s


def canonical(s):
    """normalize() and the rules above: the form in which a mathematical answer is split and compared."""
    s = normalize(percent_words(single_escapes(str(s))))
    for rule in (relations, spaced_connectors, digit_groups, leading_zeros, unit_words, outer_braces, bracketed_matrix):
        s = rule(s).strip()
    return s


def encloses(s):
    """Whether the first character's bracket is closed by the last one: "(1, 2)" yes, "(1) + (2)" no."""
    depth = list(itertools.accumulate(1 if c in "([{" else -1 if c in ")]}" else 0 for c in s))
    return min(depth[:-1], default=1) > 0 and depth[-1] == 0


# ----------------------------------------------------------------------------------------------------
# 3. Split into answers, each with its label

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


def chain_value(s):
    """A chain answers with its last side, after the name it starts with: "x = 5+5+1 = 11" -> "x = 11",
    "1 = y = 0" -> "0"; before an approximation, the exact value: "x = 1/3 \\approx 0.33" -> "x = 1/3", and a
    name approximated names the value: "x \\approx 11" -> "x = 11"."""
    if len(split_top(s)) > 1:
        return s  # several answers: each is a chain of its own
    if "\\approx" in s:
        exact, _, approximate = s.partition("\\approx")
        s = f"{exact} = {approximate}" if LABEL.fullmatch(exact.strip()) else exact
    sides = split_top(s, ("=",)) if not re.search(r"[<>!]=", s) else [s]
    if len(sides) > 2:
        return f"{sides[0]} = {sides[-1]}" if LABEL.fullmatch(sides[0]) else sides[-1]
    return s


def label_of(s):
    """(the name an answer is given, its value): "k = 45" -> ("k", "45"), "(p,q)=(3,2)" -> ("(p,q)", "(3,2)"),
    "x \\in [-2,7]" -> ("x", "[-2,7]"); (None, s) when it names nothing ("x^2 = 4" is an equation)."""
    m = re.fullmatch(rf"\s*({LABEL.pattern})\s*(?:=|\\in(?![A-Za-z]))\s*(.+)", s, re.S)
    if m and "=" not in m.group(m.lastindex) and len(split_top(m.group(m.lastindex))) == 1:
        return re.sub(r"[\s{}]", "", m.group(1)), m.group(m.lastindex).strip()
    return None, s


def plus_minus(s):
    """"1 \\pm \\sqrt2" -> "1+\\sqrt2", "1-\\sqrt2"; "\\pm 3" -> "3", "-3"; anything else is itself."""
    if s.count("\\pm") != 1:
        return [s]
    left, right = s.split("\\pm")
    return [f"{left}+{right}", f"{left}-{right}"] if left.strip() else [right.strip(), f"-{right.strip()}"]


def answers(s):
    """The answers a canonical text gives, as (label or None, value): split at top-level ";" when there is one
    ("p=5,q=2;p=7,q=2"), else at commas, "and" and "or"; a set \\{1, 2\\} gives its elements and a ± two answers.
    "k = 45, n = 2" -> [("k", "45"), ("n", "2")]; "(5, 8), (8, 5)" -> two tuples."""
    if s.startswith("\\{") and s.endswith("\\}") and encloses("{" + s[2:-2] + "}"):
        s = s[2:-2]
    parts = split_top(s, (";",))
    parts = parts if len(parts) > 1 else split_top(s, (",", " and ", " or "))
    return [(label, v) for part in parts if part for label, value in [label_of(chain_value(part))]
            for v in plus_minus(value)] or [(None, s)]


# ----------------------------------------------------------------------------------------------------
# 4. LaTeX -> Python expression text (a small recursive-descent translator for the answer subset)

# The functions an answer may use, once: LaTeX's name -> sympy's. Only these, the constants and the number classes
# below reach parse_expr (to_sympy checks every name first; the whitelist is its whole namespace).
FUNCTIONS = {"sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc", "arcsin": "asin",
             "arccos": "acos", "arctan": "atan", "sinh": "sinh", "cosh": "cosh", "tanh": "tanh", "ln": "log",
             "log": "log", "exp": "exp"}
MATH_NAMES = {*FUNCTIONS.values(), "sqrt", "root", "Abs", "pi", "E", "I", "oo"}  # what our translation writes
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
    name = FUNCTIONS[tok[1:]]
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
# 5. Python text -> sympy, under a whitelist and size guards

_SYMPY = None


def _sympy():
    """Import sympy lazily: `import rewards` stays instant, and worker processes pay only when they need it."""
    global _SYMPY
    if _SYMPY is None:
        import sympy  # heavy: see the docstring
        from sympy.parsing import sympy_parser as sp  # heavy
        names = MATH_NAMES | {"factorial", "Integer", "Float", "Rational", "Symbol", "Add", "Mul", "Pow"}  # parse_expr's
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
    if any(n.startswith("_") or (n not in MATH_NAMES and not re.fullmatch(r"[A-Za-z]+_\w*|[A-Za-z]", n))
           for n in names):
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
# 6. Sets of reals: a relation in one variable, an interval, a union, a finite set

def as_set(s):
    """The set of reals a canonical answer describes: "-793 < a < 10" -> (-793, 10); "5 <= x" -> [5, oo);
    "1 <= |z| <= 3/2" -> [-3/2, -1] ∪ [1, 3/2]; "x != 3" -> all reals but 3; "0 < f(x) < 1" -> (0, 1) (a function's
    value is the variable); "(2, 12) \\cup (12, 102)"; "x < -1 or x >= 3"; "(a, b)" is then an open interval."""
    sympy = _sympy()[0]
    if len(either := split_top(s, ("\\cup", " or "))) > 1:  # "x < -1 or x >= 3" is a union too
        return sympy.Union(*[as_set(part) for part in either])
    if s.startswith("\\{") and s.endswith("\\}"):
        return sympy.FiniteSet(*[to_sympy(x) for x in split_top(s[2:-2]) if x])
    if len(s) > 2 and s[0] in "([" and s[-1] in ")]" and encloses(s) and len(ends := split_top(s[1:-1])) == 2:
        low, high = (to_sympy(x) for x in ends)
        return sympy.Interval(low, high, left_open=s[0] == "(", right_open=s[-1] == ")")
    parts = re.split(r"(<=|>=|!=|<|>)", re.sub(r"\b([A-Za-z])\(\s*([A-Za-z])\s*\)", r"\1_{\2}", s))
    if len(parts) < 3:
        return sympy.FiniteSet(to_sympy(s))
    sides = [to_sympy(x) for x in parts[0::2]]
    variables = set().union(*(side.free_symbols for side in sides))
    if len(variables) != 1:
        raise NotMath("a relation in one variable")
    variable = variables.pop()
    real = sympy.Symbol(variable.name, real=True)
    sides = [side.subs(variable, real) for side in sides]
    solved = sympy.S.Reals
    for left, op, right in zip(sides, parts[1::2], sides[1:]):
        solved = solved.intersect(solve_relation(left, op, right, real, sympy))
    return solved


def solve_relation(left, op, right, x, sympy):
    """The reals where `left op right` holds: written down at once when one side is x and the other a number
    ("x > 5", "5 <= x": most answers), else by sympy's solveset ("-2x > -6", "|x| <= 2")."""
    if right == x and not left.free_symbols:  # "5 <= x" is "x >= 5"
        left, right, op = right, left, {"<": ">", ">": "<", "<=": ">=", ">=": "<="}.get(op, op)
    if left == x and not right.free_symbols:
        oo, a = sympy.oo, right
        return {"<": sympy.Interval.open(-oo, a), "<=": sympy.Interval(-oo, a), ">": sympy.Interval.open(a, oo),
                ">=": sympy.Interval(a, oo),
                "!=": sympy.Union(sympy.Interval.open(-oo, a), sympy.Interval.open(a, oo))}[op]
    relation = {"<": sympy.Lt, ">": sympy.Gt, "<=": sympy.Le, ">=": sympy.Ge, "!=": sympy.Ne}[op]
    return sympy.solveset(relation(left, right), x, sympy.S.Reals)


def set_like(s):
    """A relation, or a union: compared as sets of reals."""
    return bool(re.search(r"[<>]|!=|\\cup", s))


def sets_equal(p, g):
    """Both sides as sets of reals (as_set): "x \\geq 5" and "[5, \\infty)" are the same answer."""
    try:
        a, b = as_set(p), as_set(g)
    except NotMath:
        return False
    return a == b or a.symmetric_difference(b) == _sympy()[0].S.EmptySet


# ----------------------------------------------------------------------------------------------------
# 7. Compare: text first (most right answers end there, without sympy), then answers, then values

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


def text_equal(p, g):
    """Normalized strings, then the same up to case and spacing: True / False, or None when undecided."""
    p, g = normalize(p), normalize(g)
    if not p or not g:
        return False
    return True if re.sub(r"\s+", "", p).lower() == re.sub(r"\s+", "", g).lower() else None


def decimal_comma(p, g):
    """"1000,99" or "0,111" against a decimal written with a point: a comma before anything but a group of three
    digits after a lead of one to three digits that is not 0 ("1,234" is 1234) is a decimal comma. True / False,
    or None when neither side is one."""
    for a, b in ((p, g), (g, p)):
        m = re.fullmatch(r"(-?)(\d+),(\d+)", a)
        if m and re.fullmatch(r"-?\d*\.\d+", b) and (len(m.group(3)) != 3 or m.group(2) == "0" or len(m.group(2)) > 3):
            return float(f"{m.group(1)}{m.group(2)}.{m.group(3)}") == float(b)
    return None


def named(labels):
    """Labels that name each answer once, by names that are not one name's indices (x_1, x_2 are roots, in any
    order): then the labels say which value is which."""
    bases = {re.sub(r"_.*", "", label) for label in labels if label}
    return all(labels) and len(set(labels)) == len(labels) and len(bases) == len(labels)


def answers_equal(pa, ga, eq):
    """Several answers on one side at least. By label when both sides name each answer ("a_3 = 2, a_{37} = 19" vs
    "a_{37} = 19, a_3 = 2"); in order when one side names them and the other does not ("AB = 4, CD = 5" vs "4, 5"),
    or when the other side is one tuple ("p=5, q=2" vs "(5, 2)"); else as sets, each answer of either side equal to
    one of the other's ("(5, 8), (8, 5)" vs "(8, 5), (5, 8)"; a repeated answer counts once)."""
    (p_labels, pv), (g_labels, gv) = zip(*pa), zip(*ga)
    if len(pv) == 1 or len(gv) == 1:
        one, many = (pv[0], gv) if len(pv) == 1 else (gv[0], pv)
        entries = split_top(one[1:-1], (",", ";")) if one[:1] + one[-1:] == "()" and encloses(one) else []
        return len(entries) == len(many) and all(eq(a, b) for a, b in zip(entries, many))
    if named(p_labels) and named(g_labels):
        by_label = dict(ga)
        return set(p_labels) == set(g_labels) and all(eq(v, by_label[label]) for label, v in pa)
    if (named(p_labels) and not any(g_labels)) or (named(g_labels) and not any(p_labels)):
        return len(pv) == len(gv) and all(eq(a, b) for a, b in zip(pv, gv))
    return all(any(eq(a, b) for b in gv) for a in pv) and all(any(eq(a, b) for a in pv) for b in gv)


def answer_equal(p, g, eq, rel_tol):
    """One answer on each side. Equations by their solution sets; a label dropped where one side has it ("(p,q) =
    (3,2)" vs "(3,2)", "|AB| = 1" vs "1") and compared where both do ("x = 5" is not "y = 5"); relations and unions
    as sets of reals; then matrices, tuples and intervals (in order, with their brackets), and single values."""
    (pl, pv), (gl, gv) = answers(p)[0], answers(g)[0]
    p, g = chain_value(p), chain_value(g)
    if "=" in p.replace("!=", "") and "=" in g.replace("!=", "") and not set_like(p + g):
        try:
            if equations_equal(p, g, rel_tol):
                return True
        except NotMath:
            pass
    if pl and gl:
        return pl == gl and eq(pv, gv)
    if pl or gl:
        return eq(pv, gv)
    if set_like(p) or set_like(g):
        return sets_equal(p, g)
    return shapes_equal(p, g, eq, rel_tol)


def shapes_equal(p, g, eq, rel_tol):
    """Matrices entry by entry; tuples and intervals in order, with the same brackets; else two values."""
    matrices = [re.fullmatch(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", x, re.S)
                for x in (p, g)]
    if all(matrices):
        rows = [[[c.strip() for c in r.split("&")] for r in re.split(r"\\\\", m.group(2)) if r.strip()]
                for m in matrices]
        return [len(r) for r in rows[0]] == [len(r) for r in rows[1]] and all(
            eq(a, b) for ra, rb in zip(*rows) for a, b in zip(ra, rb))
    entries = [split_top(x[1:-1], (",", ";")) if len(x) > 2 and x[0] in "([" and x[-1] in ")]" and encloses(x)
               else [] for x in (p, g)]
    if len(entries[0]) > 1 or len(entries[1]) > 1:  # "(9+1)" is a value in brackets, "(1, 2)" a tuple
        return p[0] + p[-1] == g[0] + g[-1] and len(entries[0]) == len(entries[1]) and all(
            eq(a, b) for a, b in zip(*entries))
    return scalars_equal(p, g, rel_tol)


def scalars_equal(p, g, rel_tol):
    """Two values through sympy: exactly when both were written exactly, else within rel_tol."""
    if "=" in p or "=" in g:
        return False  # an equation against a value (equations compare above)
    try:
        a, b = to_sympy(p), to_sympy(g)
    except NotMath:
        return False
    written_exactly = not re.search(r"\d\.\d|(?<!\d)\.\d", p + " " + g)  # no rounded decimal on either side
    return values_equal(a, b, written_exactly, rel_tol)


def _equal(p, g, rel_tol, depth=0):
    """The comparison the helper process runs: canonical forms, then the answers each side gives."""
    if (verdict := text_equal(p, g)) is not None:
        return verdict
    p, g = canonical(p), canonical(g)
    if not p or not g or depth > 3:
        return False
    if re.sub(r"\s+", "", p).lower() == re.sub(r"\s+", "", g).lower():
        return True
    if (verdict := decimal_comma(p, g)) is not None:
        return verdict
    eq = lambda a, b: _equal(a, b, rel_tol, depth + 1)  # noqa: E731
    pa, ga = answers(p), answers(g)
    if len(pa) > 1 or len(ga) > 1:  # "x < -1 or x >= 3" is one set, though "or" splits it
        return ((set_like(p) or set_like(g)) and sets_equal(p, g)) or answers_equal(pa, ga, eq)
    return answer_equal(p, g, eq, rel_tol)


def math_equal(pred, gold, rel_tol=REL_TOL, timeout=TIMEOUT):
    """Whether two answer strings denote the same mathematical object; a gold written as a solution or a sentence
    answers with its final answer (answer_in). Never raises; bounded time."""
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if (verdict := text_equal(pred, gold)) is not None:
        return verdict  # most correct answers end here, without sympy
    pred, gold = answer_in(pred), answer_in(gold)
    if len(pred) > MAX_CHARS or len(gold) > MAX_CHARS:
        return pred.strip() == gold.strip()
    if (verdict := text_equal(pred, gold)) is not None:
        return verdict
    return equal_with_deadline(pred, gold, rel_tol, timeout)


def math_reward(response, gold, require_tags=False):
    """Paper §2.2: 1.0 if the response's final answer is equivalent to the ground truth, else 0.0."""
    answer = extract_answer(response, require_tags)
    return float(answer is not None and math_equal(answer, gold))


# ----------------------------------------------------------------------------------------------------
# 8. Multiple choice

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
# 9. Many at once: worker processes, each task with a hard deadline

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
