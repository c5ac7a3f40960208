"""Table-driven verifier tests. Every expected verdict was written by reasoning about the mathematics."""
import time

import pytest

import rewards
from rewards import choice_reward, extract_answer, math_equal, math_reward

EQUAL = [
    # wrappers and \boxed
    ("$5$", "5"), ("\\(5\\)", "5"), ("\\[5\\]", "5"), ("$$\\frac{1}{2}$$", "1/2"), ("\\boxed{7}", "7"),
    ("\\boxed{\\frac{3}{4}}", "0.75"), ("\\fbox{12}", "12"),
    # spacing and sizing commands
    ("\\left( 1, 2 \\right)", "(1,2)"), ("3\\!\\cdot\\!4", "12"), ("2\\,\\pi", "2\\pi"), ("\\displaystyle\\frac{1}{3}", "1/3"),
    # fraction spellings
    ("\\dfrac{3}{4}", "\\frac34"), ("\\tfrac{1}{2}", "\\frac{1}{2}"), ("\\frac12", "0.5"), ("\\frac{10}{4}", "\\frac{5}{2}"),
    ("\\frac1{2}", "\\frac{1}2"), ("-\\frac{1}{2}", "\\frac{-1}{2}"),
    # roots
    ("\\sqrt3", "\\sqrt{3}"), ("2\\sqrt{2}", "\\sqrt{8}"), ("\\sqrt[3]{27}", "3"), ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("\\sqrt{12}", "2\\sqrt3"), ("2^{1/2}", "\\sqrt2"),
    # thousands separators, leading dot
    ("7,425,000", "7425000"), ("11,\\! 111", "11111"), ("1{,}000", "1000"), (".4", "0.4"), ("0.50", ".5"),
    # percent
    ("50\\%", "50"), ("12.5%", "12.5"), ("30 percent", "30"),
    # units and words
    ("125 miles", "125"), ("125\\text{ miles}", "125"), ("10\\mbox{ inches}", "10"), ("\\textnormal{4 cm}", "4"),
    ("6 \\text{ cm}^2", "6"), ("\\$32", "32"), ("15 dollars", "15"),
    # degrees
    ("90^\\circ", "90"), ("45^{\\circ}", "45"), ("30°", "30"), ("60 degrees", "60"),
    # single-variable assignment
    ("x = 11", "11"), ("11", "x=11"), ("k=\\frac{1}{2}", "0.5"), ("y = -3", "-3"),
    # fractions vs decimals (exact rationals, and rounded decimals within 1e-6 relative)
    ("0.75", "\\frac{3}{4}"), ("0.333333333", "\\frac13"), ("0.6666667", "2/3"), ("1.5", "\\frac{3}{2}"), ("2.0", "2"),
    ("-0.25", "-\\frac14"),
    # constants, powers, algebra, trig identities
    ("\\pi", "3.14159265358979"), ("2\\pi", "\\pi+\\pi"), ("2^{10}", "1024"), ("10^3", "1000"), ("e^{i\\pi}", "-1"),
    ("x^2+2x+1", "(x+1)^2"), ("\\sin^2 x + \\cos^2 x", "1"), ("\\frac{x^2-1}{x-1}", "x+1"), ("2(a+b)", "2a+2b"),
    ("\\sin(2x)", "2\\sin x\\cos x"), ("\\ln(e^2)", "2"), ("\\log_2 8", "3"), ("|-3|", "3"), ("3!", "6"),
    ("\\frac{\\pi}{2}", "\\frac{2\\pi}{4}"), ("\\alpha+\\beta", "\\beta+\\alpha"), ("x_1 + x_2", "x_2 + x_1"),
    # tuples/points (ordered), sets and lists (unordered), intervals, unions
    ("(1, 2)", "(1,2)"), ("(\\frac12, 3)", "(0.5, 3)"), ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}"), ("1, 2", "2, 1"),
    ("3, 5, 7", "7,3,5"), ("[0, 9)", "[0,9)"), ("(-\\infty, 3]", "(-\\infty,3]"),
    ("(-\\infty, 3] \\cup [4, \\infty)", "(-\\infty,3]\\cup[4,\\infty)"), ("[4, \\infty) \\cup (-\\infty, 3]", "(-\\infty,3]\\cup[4,\\infty)"),
    ("(1,2)", "1, 2"),
    # matrices
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"),
    ("\\begin{pmatrix} \\frac12 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}0.5\\\\2\\end{pmatrix}"),
    ("\\begin{array}{cc} 1 & 0 \\\\ 0 & 1 \\end{array}", "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}"),
    # plus-minus
    ("1\\pm\\sqrt2", "1+\\sqrt2, 1-\\sqrt2"), ("\\pm 3", "3, -3"), ("2 \\pm i", "2+i, 2-i"),
    # text answers
    ("Red", "red"), ("\\text{(C)}", "C"), ("(B)", "B"), ("north east", "North East"), ("\\text{Yes}", "yes"),
    # equations as equations
    ("2x+4y-3=0", "y=-\\frac12 x+\\frac34"), ("y = 2x + 1", "2x - y + 1 = 0"), ("x^2+y^2=1", "2x^2+2y^2=2"),
    # thousands separators inside math mode, where the answer is a single number
    ("$1,234,567$", "1234567"), ("1\\,234\\,567", "1234567"), ("1{,}234{,}567", "1234567"), ("1\\,000\\,000", "10^6"),
    ("$12{,}345.5$", "12345.5"), ("\\boxed{2\\,500}", "2500"), ("\\$1{,}000", "1000"),
    # a choice letter wrapped in formatting inside \boxed{}
    ("\\boxed{\\text{C}}", "C"), ("\\boxed{\\textbf{(B)}}", "B"), ("\\boxed{\\mathrm{A}}", "A"), ("\\boxed{(D)}", "D"),
    ("\\boxed{\\text{(E)}}", "E"),
]

NOT_EQUAL = [
    ("[0,9)", "(0,9)"), ("[0,9]", "[0,9)"), ("4\\sqrt2", "4"), ("q - p", "p - q"), ("x+1", "x+2n+1"),
    ("0.3333", "\\frac13"), ("0.33", "1/3"), ("1000001", "1000000"), ("\\frac{3}{4}", "0.7"), ("2", "-2"),
    ("\\sqrt3", "3"), ("\\sqrt{2}", "1.41"), ("(1, 2)", "(2, 1)"), ("\\{1, 2\\}", "\\{1, 3\\}"), ("1, 2", "1, 2, 3"),
    ("\\pi", "3.14"), ("2\\pi", "\\pi"), ("x^2", "2x"), ("\\sin x", "\\cos x"), ("red", "der"), ("A", "B"),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&3\\\\2&4\\end{pmatrix}"),
    ("1\\pm\\sqrt2", "1+\\sqrt2"), ("x = 11", "12"), ("50\\%", "5"), ("125 miles", "126"), ("90^\\circ", "45"),
    ("2x+4y-3=0", "y=\\frac12 x+\\frac34"), ("y=x", "y=x+1"), ("(-\\infty, 3]", "(-\\infty, 3)"),
    ("", "5"), ("5", ""), ("\\frac{1}{2}", "\\frac{1}{3}"), ("10^3", "10000"), ("x_1", "x_2"), ("7,425,000", "7425"),
    ("(-\\infty,3]\\cup[4,\\infty)", "(-\\infty,3]\\cup[5,\\infty)"), ("north", "south"), ("e", "2.718"),
    # a separator only joins groups of three digits: these stay tuples, lists or products
    ("(1,234)", "1234"), ("1, 234", "1234"), ("1,23", "123"), ("$1,234,567$", "1234568"),
    ("\\boxed{\\text{C}}", "B"), ("\\boxed{(D)}", "A"),
]


@pytest.mark.parametrize("pred,gold", EQUAL)
def test_equal(pred, gold):
    assert math_equal(pred, gold), (pred, gold)
    assert math_equal(gold, pred), (gold, pred)


@pytest.mark.parametrize("pred,gold", NOT_EQUAL)
def test_not_equal(pred, gold):
    assert not math_equal(pred, gold), (pred, gold)


def test_tolerance_is_a_parameter():
    assert not math_equal("0.3333", "1/3")
    assert math_equal("0.3333", "1/3", rel_tol=1e-3)
    assert not math_equal("3", "3.001", rel_tol=1e-6) and math_equal("3", "3.001", rel_tol=1e-3)


EXTRACT = [
    ("<think>hmm</think><answer>42</answer>", "42"),
    ("<think>a</think><answer>1</answer> then <answer>2</answer>", "2"),  # the last one
    ("<think>a</think><answer> 7 ", "7"),  # unclosed final <answer>
    ("<think>x</think> So the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("<think>x</think>\\boxed{a} and finally \\boxed{\\sqrt{\\frac{1}{2}}}", "\\sqrt{\\frac{1}{2}}"),  # nested, last
    ("<think>x</think><answer>The answer is \\boxed{3}</answer>", "3"),
    ("<think>x</think> The final answer is 12.", "12"),
    ("Let me compute. Answer: 5", "5"),
    ("Therefore, the answer is $\\frac{2}{3}$.", "\\frac{2}{3}"),  # the delimiters are not part of the answer
    ("<think>I keep thinking and thinking", None),
    ("<think>a</think>   ", None),
    ("", None),
    ("just 17", "just 17"),
    ("\\fbox{9}", "9"),
    ("<think>a</think><answer></answer>", None),
    ("<think>first</think> mid </think> Final answer: (C)", "(C)"),
    # untagged, unboxed prose: its last math-mode expression, else its last number; a bare expression stays whole
    ("The total is $1,234$", "1,234"), ("So we get \\(\\frac{1}{2}\\) in the end.", "\\frac{1}{2}"),
    ("<think>a</think> It comes to $3$ apples and $\\sqrt{2}$ more", "\\sqrt{2}"),
    ("The area of the square is 25 square units.", "25"), ("x^2 + 1", "x^2 + 1"),
]


@pytest.mark.parametrize("response,expected", EXTRACT)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_rl_reward_reads_only_tagged_answers():
    """GRPO's reward (require_tags=True): the training prompt asks for <answer> tags, so prose earns nothing."""
    tagged = "<think>3 + 4</think><answer>7</answer>"
    for response, lenient, strict in [(tagged, 1, 1), ("The answer is 7", 1, 0), ("7", 1, 0),
                                      ("<think>3 + 4 = 7</think> 7", 1, 0), ("<think>.</think><answer>7", 1, 0),
                                      ("<answer>\\boxed{7}</answer>", 1, 1), ("<answer>8</answer>", 0, 0)]:
        assert math_reward(response, "7") == lenient and math_reward(response, "7", require_tags=True) == strict
    assert choice_reward("Answer: B", OPTIONS, "B") == 1 and choice_reward("Answer: B", OPTIONS, "B", True) == 0
    responses = [tagged, "The answer is 7", "<answer>B</answer>", "B"]
    golds, options = ["7", "7", "B", "B"], [None, None, OPTIONS, OPTIONS]
    assert rewards.batch_rewards(responses, golds, options, processes=1, require_tags=True) == [1, 0, 1, 0]
    assert rewards.batch_rewards(responses, golds, options, processes=2) == [1, 1, 1, 1]


PROSE_AND_BOXED_GOLDS = [  # (response, gold, reward): the last two public classes, both ways
    ("The total is $1,234$", "1234", 1), ("The total is $1,234$", "1235", 0), ("The total is 1,234.", "1234", 1),
    ("After checking 3 cases, the count comes to 7.", "7", 1), ("After checking 3 cases, the count comes to 7.", "3", 0),
    ("<think>.</think> Thus $x = \\frac{3}{4}$.", "0.75", 1), ("<think>.</think> Thus $x = \\frac{3}{4}$.", "0.7", 0),
    ("<answer>12</answer>", "$\\boxed{12}$.", 1), ("<answer>13</answer>", "$\\boxed{12}$.", 0),
    ("<answer>\\frac{1}{2}</answer>", "\\(\\boxed{0.5}\\).", 1), ("The total is $1,234$", "$\\boxed{1234}$.", 1),
]


@pytest.mark.parametrize("response,gold,expected", PROSE_AND_BOXED_GOLDS)
def test_prose_answers_and_gold_answers_in_their_own_box(response, gold, expected):
    assert math_reward(response, gold) == expected


def test_a_gold_letter_in_its_own_box_is_the_letter():
    assert choice_reward("<answer>B</answer>", OPTIONS, "\\(\\boxed{\\text{B}}\\).") == 1
    assert choice_reward("<answer>C</answer>", OPTIONS, "\\(\\boxed{\\text{B}}\\).") == 0
    assert choice_reward("<answer>No</answer>", OPTIONS, "$\\boxed{B}$") == 1


def test_math_reward_end_to_end():
    assert math_reward("<think>3/4 of the cake</think><answer>\\dfrac{3}{4}</answer>", "0.75") == 1.0
    assert math_reward("<think>3/4 of the cake</think><answer>0.7</answer>", "0.75") == 0.0
    assert math_reward("<think>never closes", "5") == 0.0
    assert math_reward("The final answer is $\\boxed{10\\%}$", "10") == 1.0


OPTIONS = ["Yes", "No", "Maybe", "Only on Tuesdays"]
CHOICES = [
    ("<answer>B</answer>", "B", 1), ("<answer>(B)</answer>", "B", 1), ("<answer>B: No</answer>", "B", 1),
    ("<answer>B. No</answer>", "B", 1), ("<think>..</think> Answer: B", "B", 1), ("<answer>No</answer>", "B", 1),
    ("<answer>only on tuesdays</answer>", "D", 1), ("<answer>b</answer>", "B", 1), ("<answer>\\text{(C)}</answer>", "C", 1),
    ("<answer>A</answer> wait <answer>B</answer>", "B", 1), ("<answer>B</answer> wait <answer>A</answer>", "B", 0),
    ("<answer>A or B</answer>", "B", 0), ("<answer>A, B</answer>", "B", 0), ("<answer>C</answer>", "B", 0),
    ("<answer>Yes</answer>", "B", 0), ("<think>B is tempting</think>", "B", 0), ("<answer>The answer is (B)</answer>", "B", 1),
    ("<answer>Option D</answer>", "D", 1), ("<answer>E</answer>", "E", 0), ("<answer></answer>", "A", 0),
]


@pytest.mark.parametrize("response,gold,expected", CHOICES)
def test_choice_reward(response, gold, expected):
    assert choice_reward(response, OPTIONS, gold) == expected


ADVERSARIAL = [
    "\\boxed{9^{9^{9^{9}}}}", "9^{9^{9^{9}}}", "10^{10^{10^{10}}}", "100000000!", "(10^{100})!", "9^{-999999999}",
    "{" * 5000 + "1" + "}" * 5000, "\\\\" * 20000, "1" * 100000, "x" * 100000, "\\frac" * 3000,
    "(" * 3000 + ")" * 3000, "\\sqrt{" * 500 + "2" + "}" * 500, "2^" * 2000 + "2", "e^{e^{e^{e^{e^{e^{99}}}}}}",
    "\\begin{pmatrix}" + "1&" * 3000 + "1\\end{pmatrix}", "1," * 20000 + "1",
]


@pytest.mark.parametrize("bad", ADVERSARIAL)
def test_adversarial_inputs_return_quickly(bad):
    """Each call is bounded on its own: the deadline, plus restarting the helper it killed (as in the test below;
    three calls under one 3 x (deadline + 0.5 s) bound failed at 7.58 s on a slow hour of a 2-core host)."""
    for call, want in ((lambda: math_reward(f"<answer>{bad}</answer>", "1"), 0.0),
                       (lambda: math_equal(bad, "2"), False), (lambda: math_equal("3", bad), False)):
        start = time.monotonic()
        got = call()
        assert got == want and type(got) is type(want)
        assert time.monotonic() - start < rewards.TIMEOUT + 3.0


def test_long_hostile_prose_is_read_in_bounded_time():
    """Untagged prose is searched for its last sentence holding a value: 20,000 sentences of numbers and a box that
    never closes take well under a second, not a time quadratic in their number."""
    for text in ("It is 1. " * 20000, "We get $1$. " * 10000 + "\\boxed{" * 5000, "Answer: " * 20000):
        start = time.monotonic()
        assert math_reward(text, "2") == 0.0
        assert time.monotonic() - start < 2.0


def test_timeout_is_not_equal_and_bounded():
    start = time.monotonic()
    assert math_equal("e^{e^{e^{e^{e^{99}}}}}", "e^{e^{e^{e^{e^{98}}}}}", timeout=0.5) is False
    assert time.monotonic() - start < 0.5 + 3.0  # the deadline, plus restarting the helper
    assert math_equal("\\sin^2 x + \\cos^2 x", "1", timeout=0.0) is False  # no time, no verdict
    assert math_equal("\\sin^2 x + \\cos^2 x", "1")  # and the next call works with a fresh helper


def _verdict(pair):
    return math_equal(*pair)


def test_math_equal_works_in_a_process_pool():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert list(pool.map(_verdict, [("\\frac{3}{4}", "0.75"), ("2", "3")])) == [True, False]


def test_math_equal_works_off_the_main_thread():
    import threading
    out = []
    t = threading.Thread(target=lambda: out.append(math_equal("\\frac{3}{4}", "0.75")))
    t.start()
    t.join(10)
    assert out == [True]


def test_batch_rewards_match_one_by_one_and_resist_hangs():
    responses = [f"<answer>{p}</answer>" for p, _ in EQUAL[:20]] + [f"<answer>{p}</answer>" for p, _ in NOT_EQUAL[:20]]
    golds = [g for _, g in EQUAL[:20]] + [g for _, g in NOT_EQUAL[:20]]
    responses += ["<answer>B</answer>", "<answer>\\boxed{9^{9^{9^{9}}}}</answer>"]
    golds += ["B", "1"]
    options = [None] * 40 + [OPTIONS, None]
    serial = [math_reward(r, g) if o is None else choice_reward(r, o, g) for r, g, o in zip(responses, golds, options)]
    assert serial == [1.0] * 20 + [0.0] * 20 + [1.0, 0.0]
    assert rewards.batch_rewards(responses, golds, options, processes=2) == serial


def test_cli_prints_extraction_and_verdict():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "rewards.py", "<think>t</think><answer>\\dfrac{3}{4}</answer>", "0.75"],
                         capture_output=True, text=True, cwd=rewards.__file__.rsplit("/", 1)[0])
    assert "extracted: '\\\\dfrac{3}{4}'" in out.stdout and "reward: 1.0" in out.stdout


# ----------------------------------------------------------------------------------------------------
# The ways a right answer is written (the eight classes of issue #34), each rule with as many cases that must stay
# unequal. Written here from the rule; the verdicts were worked out by hand. (pred, gold, why)

SEVERAL = [  # several answers: compared as a set of answers, a single tuple in order
    ("\\boxed{4}, \\boxed{9}", "4, 9", "boxes side by side are one answer with two parts"),
    ("\\boxed{-1} and \\boxed{6}", "\\{6, -1\\}", "a gold set, in another order"),
    ("\\boxed{2} \\quad \\text{and} \\quad \\boxed{5}", "5, 2", "spaced \\text{and} between the boxes"),
    ("x = 3 \\text{ or } x = -7", "-7, 3", "'or' between the answers; the name repeats, so it is one variable's"),
    ("1; 4; 9", "\\{9, 4, 1\\}", "semicolons separate answers"),
    ("(2, 7), (7, 2)", "(7, 2), (2, 7)", "a set of tuples in any order"),
    ("(3, 1), (3, 1), (0, 2)", "(0, 2), (3, 1)", "an answer repeated counts once"),
    ("{3, 8}", "\\{8, 3\\}", "plain braces only group: a list"),
    ("(6,1)or(1,6)", "(1, 6), (6, 1)", "an 'or' glued between two tuples"),
]
SEVERAL_NOT = [
    ("(2, 7)", "(7, 2)", "one tuple keeps its order"),
    ("\\boxed{4}, \\boxed{9}", "4", "two answers to a question with one: hedging earns nothing"),
    ("\\boxed{4}, \\boxed{9}", "4, 9, 16", "an answer missing"),
    ("1; 4; 9", "1, 4, 10", "one answer different"),
    ("(2, 7), (7, 3)", "(7, 2), (2, 7)", "one tuple different"),
    ("(3, 1), (0, 2)", "(0, 2), (1, 3)", "a tuple inside a set still keeps its order"),
    ("x = 3 \\text{ or } x = -7", "3", "two solutions where there is one"),
    ("{3, 8}", "(8, 3)", "a list answers a tuple in order"),
    ("(6,1)or(1,6)", "(1, 6)", "two tuples where there is one"),
]

LABELLED = [  # a name given to the answer is not part of it, on either side
    ("(a, b) = (4, 1)", "(4, 1)", "a tuple of names"),
    ("m = 12, r = 3", "r = 3, m = 12", "both named: by name, in any order"),
    ("|PQ| = 7", "7", "a length"),
    ("g(t) = 4", "4", "a function's value"),
    ("P:Q = 2", "2", "a ratio's name"),
    ("S_1:S_2 = 3:5", "3:5", "a ratio of subscripted names"),
    ("\\frac{AM}{MB} = \\frac{2}{3}", "\\frac{2}{3}", "a quotient of segment names"),
    ("AB = 6, BC = 8", "6, 8", "named on one side: in order"),
    ("u_1 = 2, u_2 = 5", "5, 2", "indices of one name are roots: any order"),
    ("y_1 = (x+1)^2, y_2 = x^2 - 1", "x^2 + 2x + 1, (x-1)(x+1)", "named expressions, compared as expressions"),
]
LABELLED_NOT = [
    ("x^2 = 9", "9", "an equation to solve is no name"),
    ("3x + y = 4", "4", "nor is an expression"),
    ("m = 12, r = 3", "m = 3, r = 12", "the names say which value is which"),
    ("AB = 6, BC = 8", "8, 6", "named on one side: the order counts"),
    ("x = 5", "y = 5", "a different name"),
    ("(a, b) = (4, 1)", "(1, 4)", "the tuple's order"),
    ("|PQ| = 7", "8", "the value"),
    ("u_1 = 2, u_2 = 5", "2, 6", "roots in any order, but these roots"),
    ("S_1:S_2 = 3:5", "5:3", "a ratio's order"),
    ("g(t) = 4", "g(t) = 5", "the same name, another value"),
]

RELATIONS = [  # relations, inequalities and intervals: the same set of reals
    ("t \\geq 2", "t >= 2", "two spellings of one relation"),
    ("t \\ge 2", "2 \\leq t", "the sides swapped"),
    ("t \\neq 0", "t != 0", "not equal"),
    ("y \\lt 4", "y < 4", "\\lt"),
    ("-2t > -6", "t < 3", "divided by a negative number, the relation turns"),
    ("-4 < b < 9", "(-4, 9)", "a chain is an open interval"),
    ("0 < g(x) < 2", "(0, 2)", "a function's value as the variable"),
    ("x \\in [1, 5]", "[1, 5]", "'x in' names the set"),
    ("1 \\le x \\le 5", "x \\in [1, 5]", "a chain and a named interval"),
    ("|u| \\le 2", "[-2, 2]", "an absolute value"),
    ("[0, 4) \\cup (4, 10]", "(4, 10] \\cup [0, 4)", "a union in any order"),
    ("x < -1 \\text{ or } x \\geq 3", "(-\\infty, -1) \\cup [3, \\infty)", "'or' between relations is a union"),
    ("k > 0", "(0, +\\infty)", "+infinity"),
]
RELATIONS_NOT = [
    ("t > 2", "t \\geq 2", "an open end is not a closed one"),
    ("-2t > -6", "t > 3", "the relation turns when divided by a negative number"),
    ("x \\in [1, 5]", "(1, 5]", "the left end"),
    ("-4 < b < 9", "[-4, 9]", "open ends"),
    ("y < 4", "y > 4", "the other side"),
    ("|u| \\le 2", "[0, 2]", "the negative half"),
    ("[0, 4) \\cup (4, 10]", "[0, 10]", "the point left out"),
    ("x < -1 \\text{ or } x \\geq 3", "(-\\infty, -1) \\cup (3, \\infty)", "a closed end of a union"),
    ("t \\neq 0", "t > 0", "not equal is both sides"),
    ("0 < g(x) < 2", "(0, 3)", "the right end"),
    ("k > 0", "[0, +\\infty)", "zero is not above zero"),
    ("t \\ge 2", "t \\le 2", "the other direction"),
    ("1 \\le x \\le 5", "x \\in [1, 6]", "the right end of a named interval"),
]

SPELLINGS = [  # delimiters and LaTeX spellings
    ("$$\n\\frac{5}{6}\n$$", "5/6", "display dollars with newlines"),
    ("\\[\n 12 \n\\]", "12", "a display bracket"),
    ("\\(\n0.25\n\\)", "1/4", "an inline parenthesis"),
    ("\\cfrac{7}{2}", "3.5", "\\cfrac"),
    ("\\left[ 2, 3 \\right)", "[2,3)", "\\left[ \\right)"),
    ("22,\\! 222,\\! 000", "22222000", "thin spaces after thousands commas"),
    ("2 500", "2500", "a space between digit groups"),
    ("007", "7", "leading zeros"),
    (".75", "0.75", "no zero before the point"),
    ("\\\\frac{1}{4}", "0.25", "a doubled backslash"),
    ("3,25", "3.25", "a decimal comma"),
    ("31{, }000", "31000", "a thousands comma in braces, spaced"),
]
SPELLINGS_NOT = [
    ("007", "70", "the zeros lead, they do not trail"),
    ("2 500", "25", "a digit group is not dropped"),
    ("22,\\! 222", "22", "nor cut short"),
    (".75", "0.075", "the point's place"),
    ("\\cfrac{7}{2}", "2/7", "numerator and denominator"),
    ("2,500", "2.5", "a comma before three digits groups thousands"),
    ("3,25", "3.26", "a decimal comma, another number"),
    ("2 500", "2500.5", "grouped digits, then a fraction"),
    ("\\left[ 2, 3 \\right)", "[2,3]", "the right end"),
    ("$$\n\\frac{5}{6}\n$$", "6/5", "the fraction's way up"),
    ("\\\\frac{1}{4}", "0.4", "a doubled backslash, another value"),
    ("31{, }000", "31", "a thousands comma is no decimal point"),
]

PERCENT_AND_UNITS = [
    ("45\\%", "45 pct", "pct"), ("45\\%", "45 percent", "percent"), ("45%", "45 percentage", "percentage"),
    ("18 \\text{ km}", "18", "a unit in \\text"), ("0.4 \\text{ euros}", "0.4", "a unit not in our list"),
    ("\\frac{2}{5} \\textbf{meters}", "0.4", "a fraction with a bold unit"), ("35 cm", "35", "a plain unit"),
]
PERCENT_AND_UNITS_NOT = [
    ("18 \\text{ km}", "19", "a unit never makes two numbers equal"), ("3 million", "3", "a word that scales"),
    ("45 pct", "54", "the number"), ("0.4 \\text{ euros}", "4", "the point"), ("2 pi", "2", "pi is no unit"),
    ("35 cm", "3.5", "the value, not the digits"), ("45\\%", "0.45 percent", "a percentage of a percent"),
]

MATRICES = [
    ("\\begin{bmatrix} 2 & 0 \\\\ 1 & 3 \\end{bmatrix}", "\\begin{pmatrix} 2 & 0 \\\\ 1 & 3 \\end{pmatrix}", "brackets"),
    ("\\left[\\begin{array}{cc} 1 & \\frac{1}{2} \\\\ 0 & 1 \\end{array}\\right]",
     "\\begin{pmatrix}1 & 0.5\\\\0 & 1\\end{pmatrix}", "an array in \\left[ \\right], entries as values"),
    ("\\begin{pmatrix} \\sqrt{4} \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 3 \\end{pmatrix}", "a vector"),
]
MATRICES_NOT = [
    ("\\begin{pmatrix} 2 & 0 \\\\ 1 & 3 \\end{pmatrix}", "\\begin{pmatrix} 2 & 1 \\\\ 0 & 3 \\end{pmatrix}", "transposed"),
    ("\\begin{pmatrix} 2 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix} 2 & 3 \\end{pmatrix}", "a column is not a row"),
    ("\\left[\\begin{array}{cc} 1 & \\frac{1}{2} \\\\ 0 & 1 \\end{array}\\right]",
     "\\begin{pmatrix}1 & 0.6\\\\0 & 1\\end{pmatrix}", "one entry"),
]

CHAINS = [
    ("y = 4 \\cdot 3 - 2 = 10", "10", "a chain answers with its last side"),
    ("y = 4 \\cdot 3 - 2 = 10", "y = 10", "and keeps its name"),
    ("t \\approx 7", "7", "a name approximated"),
    ("r = \\frac{2}{3} \\approx 0.67", "2/3", "the exact value before an approximation"),
    ("2 = 6 - 4 = s", "s", "the last side, whatever it is"),
]
CHAINS_NOT = [
    ("y = 4 \\cdot 3 - 2 = 10", "12", "not the sides before the last"),
    ("t \\approx 7", "8", "the value approximated"),
    ("r = \\frac{2}{3} \\approx 0.67", "0.67", "the exact value, not its rounding (1e-6)"),
    ("2 = 6 - 4 = s", "2", "the last side answers"),
    ("7 = 11a + c", "11a + c", "one equation is no chain"),
]


def by_rule(*tables):
    return [pytest.param(p, g, id=why) for table in tables for p, g, why in table]


@pytest.mark.parametrize("pred,gold", by_rule(SEVERAL, LABELLED, RELATIONS, SPELLINGS, PERCENT_AND_UNITS, MATRICES,
                                               CHAINS))
def test_a_right_answer_in_any_of_its_forms(pred, gold):
    assert math_equal(pred, gold) and math_equal(gold, pred)


@pytest.mark.parametrize("pred,gold", by_rule(SEVERAL_NOT, LABELLED_NOT, RELATIONS_NOT, SPELLINGS_NOT,
                                               PERCENT_AND_UNITS_NOT, MATRICES_NOT, CHAINS_NOT))
def test_a_wrong_answer_in_any_form_stays_wrong(pred, gold):
    assert not math_equal(pred, gold) and not math_equal(gold, pred)


def test_every_class_has_as_many_negative_cases_as_positive_ones():
    for yes, no in ((SEVERAL, SEVERAL_NOT), (LABELLED, LABELLED_NOT), (RELATIONS, RELATIONS_NOT),
                    (SPELLINGS, SPELLINGS_NOT), (PERCENT_AND_UNITS, PERCENT_AND_UNITS_NOT), (MATRICES, MATRICES_NOT),
                    (CHAINS, CHAINS_NOT), (PROSE, PROSE_NOT)):
        assert len(no) >= len(yes)


PROSE = [  # (response, gold): the answer inside prose, and a gold that is a sentence or a worked solution
    ("So the answer is \\( y \\in (-3, 8) \\).", "(-3, 8)", "an answer phrase, a math span with a name"),
    ("Final Answer: The smallest $k$ is 21.", "21", "a sentence after the phrase: its last number, not the name"),
    ("The final answer is $9,104$. I hope it is correct.", "9104", "the span after the phrase, not the sentence"),
    ("Answer \\[ 14 \\]", "14", "a bare 'Answer' and a display"),
    ("<think>7 and 8</think> It is 15.", "We add: $7 + 8 = 15$, so the total is $\\boxed{15}$.",
     "a worked solution as gold: its box"),
    ("<think>..</think> 15", "Adding gives $7+8$, which comes to $15$.", "a gold sentence: its last value"),
    ("It is 9.<|im_start|>user\nWhat is 2+2? The answer is 4.", "9", "a leaked next turn is not the answer"),
    ("\\boxed{40} for the area. The final answer is $44$.", "44", "the answer stated after the box holds"),
    ("$3$ and $11$", "3, 11", "math spans joined by 'and'"),
    ("We get $$\\frac{d}{t} \\ge 2.$$ So the speed rises by 30%.", "30", "the last sentence, after a display"),
]
PROSE_NOT = [
    ("So the answer is \\( y \\in (-3, 8) \\).", "[-3, 8]", "the interval's ends"),
    ("Final Answer: The smallest $k$ is 21.", "k", "the name is not the answer"),
    ("The final answer is $9,104$. I hope it is correct.", "9105", "the value"),
    ("Answer \\[ 14 \\]", "41", "the value"),
    ("<think>7 and 8</think> It is 15.", "We add: $7 + 8 = 16$, so the total is $\\boxed{16}$.", "the gold's box"),
    ("<think>..</think> 15", "Adding gives $7+8$, which comes to $16$.", "the gold sentence's value"),
    ("It is 9.<|im_start|>user\nWhat is 2+2? The answer is 4.", "4", "not the leaked turn's"),
    ("\\boxed{40} for the area. The final answer is $44$.", "40", "not the earlier box"),
    ("$3$ and $11$", "3", "two answers where there is one"),
    ("We get $$\\frac{d}{t} \\ge 2.$$ So the speed rises by 30%.", "2", "not the earlier sentence's"),
    ("\\boxed{3} and finally \\boxed{5}", "3, 5", "a revising word between boxes: the last box alone"),
]


@pytest.mark.parametrize("response,gold", by_rule(PROSE))
def test_the_answer_in_prose_and_a_gold_written_as_prose(response, gold):
    assert math_reward(response, gold) == 1.0


@pytest.mark.parametrize("response,gold", by_rule(PROSE_NOT))
def test_the_wrong_answer_in_prose_scores_nothing(response, gold):
    assert math_reward(response, gold) == 0.0


def test_grpo_reads_these_forms_inside_the_answer_tags():
    """GRPO's reward (require_tags) reads the same forms inside <answer>; several boxed answers to a one-answer
    gold still earn 0, so listing candidates never pays."""
    assert math_reward("<think>.</think><answer>\\boxed{2} \\text{ and } \\boxed{5}</answer>", "\\{5, 2\\}", True) == 1
    assert math_reward("<think>.</think><answer>\\boxed{2} \\text{ and } \\boxed{5}</answer>", "5", True) == 0
    assert math_reward("<think>.</think><answer>x \\geq 5</answer>", "[5, \\infty)", True) == 1
    assert math_reward("<think>.</think><answer>(p, q) = (3, 2)</answer>", "(3, 2)", True) == 1
