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
    ("Therefore, the answer is $\\frac{2}{3}$.", "$\\frac{2}{3}$"),
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
    start = time.monotonic()
    assert math_reward(f"<answer>{bad}</answer>", "1") == 0.0
    assert math_equal(bad, "2") is False
    assert math_equal("3", bad) is False
    assert time.monotonic() - start < 3 * (rewards.TIMEOUT + 0.5)


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
