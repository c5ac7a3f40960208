"""evaluate.py: scoring by each benchmark's official rules (hand-checked tables), prompts, resumable runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import evaluate as ev
from conftest import torchrun
from plumbing import records

ROOT = Path(__file__).resolve().parent.parent
MATHVISTA = json.loads((ROOT / "toy" / "mathvista.json").read_text())  # real testmini annotations
SHARED = ROOT.parent / "shared" / "data" / "mathvista_testmini.json"


# ----------------------------------------------------------------------------------------------------
# MathVista: official normalisation (letter -> choice text, nearest choice by edit distance, int, rounded float,
# list as written) applied to the answer we extract. Verdicts worked out by hand from calculate_score.py.

def mc(choices, answer):
    return {"pid": "x", "question": "q", "question_type": "multi_choice", "answer_type": "text", "choices": choices,
            "answer": answer, "precision": None, "unit": None}


MATHVISTA_CASES = [
    # float, precision 1 (answer "1.2")
    ("1", "Therefore, the spring is compressed by a distance of $\\sqrt{0.25} = 0.5$ meters.", False),
    ("1", "<think>kinetic energy equals spring energy</think><answer>1.2</answer>", True),
    ("1", "<think>...</think><answer>d \\approx 1.22 m</answer>", True),   # rounded to the precision
    ("1", "<think>...</think><answer>1.3</answer>", False),
    ("1", "1.2", True),
    # integer (answer "1000", unit g; answer "4")
    ("2", "The total volume of the measuring cup is 250 grams.", False),
    ("2", "The cup holds 1,000 g in total.", True),
    ("2", "<think>read the scale</think><answer>1000 g</answer>", True),
    ("4", "After subtracting them, there are three small objects left on the table.", False),
    ("4", "After subtracting them, four objects are left.", True),
    ("4", "<think>8 objects, minus 4</think><answer>4.0</answer>", True),  # int(float("4.0"))
    # multi_choice with numeric choices (answer "97" = A)
    ("5", "The correct answer is (C) 107.", False),
    ("5", "The answer is (A).", True),
    ("5", "<think>angles sum to 360</think><answer>A: 97</answer>", True),
    ("5", "<think>angles sum to 360</think><answer>97</answer>", True),
    ("5", "m∠H = 97 degrees, so the answer is 97.", True),
    ("5", "Let me compute the angle step by step.\nThe angle H is 97.\n\nA", True),   # a final bare letter
    ("5", "The correct option is B.", False),
    ("5", "", True),  # official: an empty extraction is nearest to the shortest choice, "97"
    # multi_choice whose choices are letters (answer "E")
    ("10", "The correct answer is (E) E.", True),
    ("10", "<think>the pattern rotates</think><answer>B</answer>", False),
    # list, written "[0, 2, ...]"
    ("225", "<think>trace</think><answer>[0, 2, 0, 2, 1, 7, 1, 2, 0, 3, 0, 6]</answer>", True),
    ("225", "<think>trace</think><answer>0,2,0,2,1,7,1,2,0,3,0,6</answer>", True),
    ("225", "The chain code is [0, 2, 0, 2, 1, 7, 1, 2, 0, 3, 0, 5].", False),
    ("74", "The difference is 47.64.", True),
    ("84", "So the angle is 130.9 degrees", True),
    ("84", "<think>the angle is 130.9 but I am not done", False),  # never left <think>
]


@pytest.mark.parametrize("pid,response,correct", MATHVISTA_CASES)
def test_mathvista_official_rules(pid, response, correct):
    assert ev.score("mathvista", response, MATHVISTA[pid]) is correct


PROSE_CASES = [  # styles of published MathVista outputs; verdicts by the official rules
    (mc(["3", "5", "6", "7", "It cannot be determined from the information given"], "6"),
     "The answer is (C).\n\nAB = AC = 6.\n\nChoice (A) is incorrect because AB is greater than 3.\n\n"
     "Choice (E) is incorrect because the length of AB can be determined from the information given.", True),
    (mc(["hong kong", "osaka", "shanghai", "tokyo"], "tokyo"), "Tokyo is the largest.\n\nThus, the answer is D (tokyo).", True),
    (mc(["yes", "no"], "yes"), "Based on the image, the correct answer is **(B) no**.\n\nIt is the third tallest.", False),
    (mc(["0.33%", "0.31%", "0.29%", "0.32%", "0.30%"], "0.30%"),  # the letter indexes `choices`, as officially
     "The highest level is **0.30%** (A).\n\nSo the answer is (A).", False),
    (mc(["Identity", "Uniform", "Uniform / Soft", "Soft / Uniform", "Soft", "Dense"], "Soft"),
     "The answer is (E) Soft.\n\nThe Soft model has the highest score.", True),
    (mc(["Yes", "No"], "No"), "No, the number of big objects is not smaller.", True),
    (mc(["quarter", "half", "quarter past", "quarter to"], "quarter past"), "The clock shows quarter past eight.", True),
    (mc(["6cm", "7cm", "4cm", "5cm"], "6cm"), "Based on the given information, the length of AC is 5cm.", False),
    (mc(["50°", "55°", "60°", "65°"], "50°"), "The angle is 115°.", True),  # nearest choice by edit distance
]


@pytest.mark.parametrize("row,response,correct", PROSE_CASES)
def test_mathvista_prose(row, response, correct):
    assert ev.score("mathvista", response, row) is correct


def test_mathvista_normalize_by_hand():
    row = mc(["135°", "140°", "145°", "150°"], "145°")
    assert ev.mathvista_normalize("(C) 145", row) == "145°"
    assert ev.mathvista_normalize("C", row) == "145°"
    assert [ev.edit_distance("144", c) for c in row["choices"]] == [3, 2, 2, 3]
    assert ev.mathvista_normalize("144", row) == "140°"  # ties go to the first choice, as in the original
    assert ev.mathvista_normalize("(c)", row) == "145°"
    free = dict(MATHVISTA["74"])
    assert ev.mathvista_normalize("47.64", free) == "47.6" and ev.mathvista_normalize("N/A", free) is None


def test_mathvista_edit_distance_by_hand():
    assert ev.edit_distance("kitten", "sitting") == 3
    assert ev.edit_distance("", "abc") == 3
    assert ev.edit_distance("flaw", "lawn") == 2
    assert ev.edit_distance("same", "same") == 0


def test_mathvista_float_precision_from_hub():  # the hub stores precision as a float (1.0)
    row = dict(MATHVISTA["1"], precision=1.0)
    assert ev.score("mathvista", "<answer>1.24</answer>", row)


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data/mathvista_testmini.json")
def test_mathvista_gold_answers_score_on_all_real_annotations():
    """Every testmini item: its own answer (tagged, as text or letter) is correct, a different answer is not."""
    rows = json.loads(SHARED.read_text())
    for row in rows.values():
        assert ev.score("mathvista", f"<think>.</think><answer>{row['answer']}</answer>", row), row["pid"]
        if row["question_type"] == "multi_choice":
            letter = data.LETTERS[row["choices"].index(row["answer"])]
            assert ev.score("mathvista", f"The answer is ({letter}).", row), row["pid"]
            other = next(c for c in row["choices"] if c != row["answer"])
            assert not ev.score("mathvista", f"<answer>{other}</answer>", row), row["pid"]
        elif row["answer_type"] in ("integer", "float"):
            wrong = str(float(row["answer"]) + 1)
            assert not ev.score("mathvista", f"So the answer is {wrong}.", row), row["pid"]


# ----------------------------------------------------------------------------------------------------
# MMMU-Pro / MMMU: the official parsers, deterministic

TEN = ["Warfarin", "Heparin", "Aspirin", "Clopidogrel", "Alteplase", "Dabigatran", "Rivaroxaban", "Apixaban",
       "Enoxaparin", "Fondaparinux"]
PRO_ROW = {"id": "test_Pharmacy_1", "question": "Which drug is shown in <image 1>?", "options": str(TEN),
           "answer": "A", "subject": "Pharmacy"}

CHOICE_CASES = [
    ("Let me check each option.\n\nAnswer: A", "A"),
    ("The answer is (A) Warfarin.", "A"),
    ("Warfarin is reversed by vitamin K, which makes this the drug in question here.", "A"),  # by option text
    ("I believe it is Warfarin.", "I"),       # the official parser reads "I " as option I
    ("(B) is tempting, but (A) fits better", "A"),  # several bracketed letters: the last one
    ("none", None),                           # the official parser guesses at random here; we do not
    ("<think>B or A?</think><answer>A: Warfarin</answer>", "A"),
    ("<think>hmm</think><answer>Warfarin</answer>", "A"),
    ("<think>hmm</think><answer>\\boxed{C}</answer>", "C"),
    ("<think>A or B, let me think", None),    # never left <think>
    ("The dose is \\boxed{5 mg}.\n\nAnswer: A", "A"),   # prose: the official parser first
    ("Therefore \\boxed{A}", "A"),                        # ... then a boxed letter
]


@pytest.mark.parametrize("response,letter", CHOICE_CASES)
def test_mmmu_pro_choice(response, letter):
    assert ev.judge("mmmu-pro", response, PRO_ROW)[0] == letter
    assert ev.score("mmmu-pro", response, PRO_ROW) is (letter == "A")


def test_mmmu_open_official_rules():
    row = json.loads((ROOT / "toy" / "mmmu.json").read_text())[2]  # open question, answer "1.43"
    assert row["question_type"] == "open"
    assert ev.score("mmmu", "t = sqrt(2h/g) = 1.4286 s, so the answer is 1.43", row)
    assert ev.score("mmmu", "it takes about 1.428 seconds", row)      # numbers compared at 2 decimals
    assert ev.score("mmmu", "<think>h = g t^2 / 2</think><answer>1.43 s</answer>", row)
    assert not ev.score("mmmu", "The time is 1.5 seconds.", row)
    word = dict(row, answer="mitochondria")
    assert ev.score("mmmu", "Therefore the organelle is the Mitochondria.", word)  # gold string inside
    assert not ev.score("mmmu", "Therefore it is the nucleus.", word)
    listed = dict(row, answer="['2', '2.0']")
    assert ev.score("mmmu", "so the result is 2", listed)


def test_mmmu_multiple_choice_and_health_subset():
    rows = json.loads((ROOT / "toy" / "mmmu.json").read_text())
    assert ev.score("mmmu", "<think>fluid</think><answer>C: Pleural effusion</answer>", rows[0])
    assert not ev.score("mmmu", "<think>air</think><answer>A</answer>", rows[0])
    keep = ev.BENCHMARKS["mmmu-health"]["keep"]
    assert [keep(r) for r in rows] == [True, False, False, True]
    assert data.mmmu_subject({"id": "validation_Basic_Medical_Science_12"}) == "Basic_Medical_Science"


# ----------------------------------------------------------------------------------------------------
# Text benchmarks and schema converters

def test_medqa_and_mmlu_pro():
    medqa = [json.loads(line) for line in (ROOT / "toy" / "medqa.jsonl").read_text().splitlines()]
    assert ev.score("medqa", "<think>lactose fermenter</think><answer>A: Escherichia coli</answer>", medqa[0])
    assert ev.score("medqa", "<think>.</think><answer>Escherichia coli</answer>", medqa[0])
    assert not ev.score("medqa", "<think>.</think><answer>B</answer>", medqa[0])
    assert ev.score("medqa", "The inferior wall is supplied by the right coronary artery, so the answer is (C).",
                    medqa[1])
    pro = json.loads((ROOT / "toy" / "mmlu_pro.json").read_text())
    assert ev.score("mmlu-pro", "<think>12*12</think><answer>B: 144</answer>", pro[0])
    assert ev.score("mmlu-pro", "<think>12*12</think><answer>144</answer>", pro[0])
    assert not ev.score("mmlu-pro", "<think>12*12</think><answer>A</answer>", pro[0])
    assert [ev.BENCHMARKS["mmlu-pro-health"]["keep"](r) for r in pro] == [False, True, True, False]


def test_gsm8k_free_form():
    row = {"question": "Natalia sold 48 clips in April and half as many in May. How many altogether?",
           "answer": "In May she sold 48/2 = 24.\nAltogether 48+24 = 72.\n#### 72"}
    assert ev.score("gsm8k", "<think>48 + 24</think><answer>72</answer>", row)
    assert ev.score("gsm8k", "She sold 48 + 24 = 72 clips in total.", row)        # prose: the final number
    assert ev.score("gsm8k", "<think>.</think><answer>\\boxed{72}</answer>", row)
    assert not ev.score("gsm8k", "<think>.</think><answer>71</answer>", row)
    big = dict(row, answer="... #### 1,250")
    assert ev.score("gsm8k", "The answer is 1250.", big)


def test_converters_for_other_schemas():
    star = {"index": 7, "image": "x.png", "answer": "B", "category": "c", "question":
            "Which option describes the image?\nOptions: A: A cat on a mat., B: A dog, C: A bird, D: Nothing"}
    t = data.mmstar_task(star)
    assert t["options"] == ["A cat on a mat.", "A dog", "A bird", "Nothing"] and t["answer"] == "B"
    assert t["question"] == "Which option describes the image?"
    medx = {"id": "MM-1", "question": "Which diagnosis?\nAnswer Choices: (A) x (B) y", "label": "B",
            "options": {"A": "x", "B": "y"}, "images": ["MM-1-a.jpeg"]}
    t = ev.BENCHMARKS["medxpertqa-mm"]["task"](medx)
    assert t["question"] == "Which diagnosis?" and t["options"] == ["x", "y"] and t["images"] == ["MM-1-a.jpeg"]
    omni = {"question_id": "q1", "question": "What modality?", "gt_answer": "CT", "image_path": "a.png",
            "option_A": "MRI", "option_B": "CT", "option_C": "X-ray"}
    assert data.omnimed_task(omni)["answer"] == "B"
    with pytest.raises(ValueError):
        data.omnimed_task(dict(omni, gt_answer="PET"))
    with pytest.raises(ValueError):  # a letter that names no option
        data.task("q", "E", ["a", "b"])
    with pytest.raises(ValueError):
        data.task("q", "", None)
    with pytest.raises(ValueError):
        ev.score("no-such-bench", "x", {})


def test_prompt_interleaves_mmmu_images_and_uses_paper_template():
    from PIL import Image
    a, b = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (9, 9, 9))
    msg = data.user_message("see <image 2> then <image 1>, again <image 2>", [a, b])
    kinds = [(p["type"], p.get("text") or p.get("image")) for p in msg["content"]]
    assert kinds == [("text", "see "), ("image", b), ("text", " then "), ("image", a),
                     ("text", ", again "), ("text", "<image 2>")]
    assert [p["type"] for p in data.user_message("no placeholder", [a])["content"]] == ["image", "text"]
    t = data.mmmu_task(json.loads((ROOT / "toy" / "mmmu.json").read_text())[1])
    text = ev.prompt_text("mmmu", t)
    assert text.startswith(data.EVAL_MC_PROMPT.split("{question}")[0]) and text.endswith("A: 3\nB: 4\nC: 6\nD: 8")


# ----------------------------------------------------------------------------------------------------
# Summary metrics by hand

def test_summary_metrics_by_hand():
    def rec(i, k, extracted, correct, reason="stop", words=10):
        return {"id": i, "sample": k, "extracted": extracted, "correct": correct, "finish_reason": reason,
                "words": words}
    rows = [rec("a", 0, "3", True), rec("a", 1, "4", False), rec("a", 2, "3", True, "forced_exit", 40),
               rec("b", 0, "1", False), rec("b", 1, "2", True), rec("b", 2, "1", False)]
    s = ev.summarize("x", rows, 3, skipped=1)
    assert s["n"] == 2 and s["skipped"] == 1
    assert s["accuracy"] == pytest.approx(100 * 3 / 6, abs=0.01)   # avg@3
    assert s["maj@3"] == 50.0                                       # a: "3" wins (right); b: "1" wins (wrong)
    assert s["pass@3"] == 100.0
    assert s["forced_exit_pct"] == pytest.approx(100 / 6, abs=0.01)
    assert s["mean_words"] == pytest.approx(90 / 6, abs=0.1)
    table = records.results_table([s], ev.PAPER_MODELS, compare=True)
    assert "| x | 2 | 50.0 | 50.0 | 100.0 |" in table and "paper X-Reasoner" in table


# ----------------------------------------------------------------------------------------------------
# End to end on the tiny model

FAST = ["--model", "tiny", "--data", "toy", "--think-budget", "12", "--answer-budget", "6"]


def run_eval(tmp_path, *extra):
    return ev.main(FAST + ["--out", str(tmp_path)] + list(extra))


def test_end_to_end_three_benchmarks(tmp_path, capsys):
    summaries = run_eval(tmp_path, "--bench", "mathvista,mmmu,medqa,mathvista", "--compare")  # one named twice
    assert [s["bench"] for s in summaries] == ["mathvista", "mmmu", "medqa"]
    assert capsys.readouterr().out.count("| mathvista |") == 1  # its row is printed once
    assert [s["n"] for s in summaries] == [9, 4, 3]
    for s in summaries:
        lines = [json.loads(line) for line in (tmp_path / f"{s['bench']}.jsonl").read_text().splitlines()]
        assert len(lines) == s["n"] and all(set(r) >= {"id", "response", "extracted", "correct", "finish_reason",
                                                         "tokens"} for r in lines)
        # the stored verdicts are score() of the stored responses
        rows = {t["id"]: t["row"] for t in data.load_benchmark(s["bench"], ev.BENCHMARKS[s["bench"]], "toy")[0]}
        assert all(ev.score(s["bench"], r["response"], rows[r["id"]]) == r["correct"] for r in lines)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mathvista"]["paper"] == {"base": "62.8 (T5)", "sota": "68.1 (T5)", "xr": "69.0 (T5)"}
    for s in summaries:  # each record carries the exact text prompt, with the benchmark's appendix-C template
        rows = {t["id"]: t for t in data.load_benchmark(s["bench"], ev.BENCHMARKS[s["bench"]], "toy")[0]}
        for r in map(json.loads, (tmp_path / f"{s['bench']}.jsonl").read_text().splitlines()):
            assert r["prompt"] == ev.prompt_text(s["bench"], rows[r["id"]])
            template = data.EVAL_MATH_PROMPT if s["bench"] == "mathvista" else data.EVAL_MC_PROMPT
            assert r["prompt"].startswith(template.split("{question}")[0])
    results = (tmp_path / "results.md").read_text()
    fingerprint = records.fingerprint(data.resolve_model("tiny"))
    assert results.splitlines()[0] == f"model: `tiny` (fingerprint {fingerprint})" and results.count("\n") == 7
    assert summary["mathvista"]["model"] == "tiny" and summary["mathvista"]["fingerprint"] == fingerprint


def test_resume_generates_only_what_is_missing(tmp_path, monkeypatch, capsys):
    import generate
    run_eval(tmp_path / "full", "--bench", "medqa,mmlu-pro")
    full = {b: (tmp_path / "full" / f"{b}.jsonl").read_text() for b in ("medqa", "mmlu-pro")}
    # an interrupted run: one complete line and one cut short by the crash
    (tmp_path / "cut").mkdir()
    for b in ("medqa", "mmlu-pro"):
        (tmp_path / "cut" / f"{b}.jsonl").write_text(full[b].splitlines()[0] + "\n" + full[b].splitlines()[1][:30])
        (tmp_path / "cut" / f"{b}.settings.json").write_text((tmp_path / "full" / f"{b}.settings.json").read_text())
    calls = []
    real = generate.generate
    monkeypatch.setattr(generate, "generate", lambda m, p, convs, **kw: calls.append(len(convs)) or real(m, p, convs, **kw))
    resumed = run_eval(tmp_path / "cut", "--bench", "medqa,mmlu-pro")
    assert calls == [2, 3]  # 3 and 4 items, one of each already done
    # the summary's decode counts are this call's, and it says for how many samples: the ones it generated
    assert [(s["n"], s["generated"]) for s in resumed] == [(3, 2), (4, 3)]
    assert all(0 < s["decode_forwards"] < 64 for s in resumed)  # one batch each, under the toy preset's 64-token cap
    for b in ("medqa", "mmlu-pro"):
        got = {(r["id"], r["response"]) for r in records.read_records(tmp_path / "cut", b).values()}
        want = {(r["id"], r["response"]) for r in map(json.loads, full[b].splitlines())}
        assert got == want  # greedy: the resumed run reproduces the straight run
    with pytest.raises(data.DataError, match="not evaluated: medqa"):
        run_eval(tmp_path / "cut", "--bench", "medqa", "--temperature", "0.7")
    assert "made with other settings" in capsys.readouterr().err


def test_samples_no_image_and_text_solvable(tmp_path):
    solvable = tmp_path / "solvable.txt"
    (s,) = run_eval(tmp_path, "--bench", "mathvista", "--samples", "2", "--temperature", "1.0", "--no-image",
                    "--text-solvable-out", str(solvable))
    lines = [json.loads(line) for line in (tmp_path / "mathvista.jsonl").read_text().splitlines()]
    assert len(lines) == 18 and {r["sample"] for r in lines} == {0, 1}
    assert set(s) >= {"maj@2", "pass@2"}
    import xml.etree.ElementTree as ET  # the avg/maj/pass@2 bars, each carrying its value
    bars = {r.get("data-label"): float(r.get("data-value")) for r in ET.parse(str(tmp_path / "results.svg")).getroot()
            .iter("{http://www.w3.org/2000/svg}rect") if r.get("data-label")}
    assert bars == {"avg@2": s["accuracy"], "maj@2": s["maj@2"], "pass@2": s["pass@2"]}
    by_id = {}
    for r in lines:
        by_id.setdefault(r["id"], []).append(r["correct"])
    assert records.read_ids([solvable], "mathvista") == {i for i, c in by_id.items() if all(c)}
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("1\n2\n5\n")
    (s,) = run_eval(tmp_path / "rest", "--bench", "mathvista", "--exclude-ids", str(exclude), "--limit", "4")
    ids = {i for i, _ in records.read_records(tmp_path / "rest", "mathvista")}
    assert s["n"] == 4 and ids == {"4", "10", "19", "74"}  # the first four after the exclusion
    # annotations without their images (e.g. ../shared/data): --no-image never opens them
    rows = {k: dict(v, image=f"images/missing_{k}.png") for k, v in MATHVISTA.items()}
    (tmp_path / "annotations.json").write_text(json.dumps(rows))
    (s,) = ev.main(FAST[:2] + ["--bench", "mathvista", "--data", str(tmp_path / "annotations.json"), "--no-image",
                               "--think-budget", "8", "--out", str(tmp_path / "ann")])
    assert s["n"] == 9 and s["skipped"] == 0


def test_bad_input_is_counted_not_fatal(tmp_path, capsys):
    rows = json.loads((ROOT / "toy" / "mmlu_pro.json").read_text())
    rows[0]["answer"] = ""                         # no answer
    rows[1]["answer"] = "Z"                        # not an option
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    (s,) = ev.main(FAST[:2] + ["--bench", "mmlu-pro", "--data", str(bad), "--think-budget", "8", "--out",
                               str(tmp_path / "o")])
    assert s["n"] == 2 and s["skipped"] == 2
    assert "skipped 2 of 4" in capsys.readouterr().err
    mmmu = json.loads((ROOT / "toy" / "mmmu.json").read_text())
    mmmu[0]["image_1"] = "images/does_not_exist.png"
    (tmp_path / "m.json").write_text(json.dumps(mmmu))
    with pytest.raises(data.DataError, match="not evaluated: nejm"):  # no hub copy: one clear error at the end
        ev.main(FAST[:2] + ["--bench", "mmmu,nejm", "--data", f"mmmu={tmp_path / 'm.json'}", "--image-root",
                            str(ROOT / "toy"), "--think-budget", "8", "--out", str(tmp_path / "m")])
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["mmmu"]["n"] == 3 and summary["mmmu"]["skipped"] == 1  # the missing image cost one item
    with pytest.raises(data.DataError, match="unknown benchmark"):
        ev.main(FAST + ["--bench", "mathvista,nope", "--out", str(tmp_path / "u")])


def test_cli_and_two_ranks_match_one_process(tmp_path):
    cmd = ["evaluate.py", "--bench", "mathvista,mmmu-pro"] + FAST
    one = subprocess.run([sys.executable] + cmd + ["--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "| mathvista | 9 |" in one.stdout
    two, at_exit = torchrun(cmd[0], cmd[1:] + ["--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, "\n".join(l for l in two.stderr.splitlines() if "rror" in l or "line" in l)[-3000:]
    # an exit status of 0 alone passes by luck: a process group alive at exit aborts one teardown in ~8 (gloo)
    assert at_exit == {0: "destroyed", 1: "destroyed"}
    for b in ("mathvista", "mmmu-pro"):
        a = {k: r["response"] for k, r in records.read_records(tmp_path / "one", b).items()}
        c = {k: r["response"] for k, r in records.read_records(tmp_path / "two", b).items()}
        assert a == c and len(list((tmp_path / "two").glob(f"{b}.rank*.jsonl"))) == 2
    bad = subprocess.run([sys.executable, "evaluate.py", "--bench", "nope", "--model", "tiny"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown benchmark")


# ----------------------------------------------------------------------------------------------------
# The paper's protocol and numbers

def test_protocol_defaults_follow_section_3():
    args = ev.parse_args([])
    assert args.max_new_tokens == 4096 and args.think_budget + args.answer_budget == 4096  # §3: 4,096 in total
    assert args.temperature == 0.0 and args.samples == 1                                   # greedy
    assert ev.parse_args(["--max-new-tokens", "100", "--answer-budget", "30"]).think_budget == 70
    assert ev.parse_args(["--think-budget", "0"]).think_budget == 0                         # forced exit off


def test_templates_per_benchmark():
    """Appendix C: the math template for MathVista, MathVision and GSM8K (their multiple-choice items too,
    with the options after it); the multiple-choice template for the others."""
    math = {b for b, spec in ev.BENCHMARKS.items() if spec["template"] == "math" and b != "custom"}  # ours
    assert math == {"mathvista", "mathvision", "gsm8k"}
    item = data.mathvista_task(MATHVISTA["5"])  # a multiple-choice MathVista item
    text = ev.prompt_text("mathvista", item)
    assert text == data.EVAL_MATH_PROMPT.format(question=item["question"]) + " Options:\n\nA: 97\nB: 102\nC: 107\nD: 122"
    medqa = [json.loads(line) for line in (ROOT / "toy" / "medqa.jsonl").read_text().splitlines()]
    t = ev.BENCHMARKS["medqa"]["task"](medqa[0])
    assert ev.prompt_text("medqa", t).startswith(data.EVAL_MC_PROMPT.split("{question}")[0])


def test_every_published_number_is_there_with_its_source():
    """Typed again from the paper (v1): Figure 1's bars, Table 5, Table 4 and Table 6."""
    figure1 = {"gsm8k": (84.9, 87.2, 88.2, None), "mmlu-pro": (47.6, 52.1, 52.6, None),
               "mmmu-pro": (38.7, 40.7, 43.0, None), "mmmu": (53.2, 55.0, 56.4, None),
               "medqa": (56.3, 71.6, 62.3, 72.4), "mmlu-pro-health": (47.8, 56.4, 51.3, 58.7),
               "mmmu-health": (56.7, 57.3, 60.0, 64.0), "medxpertqa-mm": (22.2, 23.8, 23.8, 26.4)}
    table5 = {"mmmu": (53.0, 56.4), "mmmu-pro": (38.7, 43.0), "mathvista": (62.8, 69.0), "mathvision": (25.0, 29.6)}
    table4 = {"mmlu-pro": (47.6, 53.3), "mmlu-pro-health": (47.8, 53.1), "mmmu-pro": (38.3, 42.5), "nejm": (41.8, 45.7)}
    have = {(b, m, v, src) for b, m, v, src in ev.PAPER}
    for b, values in figure1.items():
        for model, v in zip(("base", "sota", "xr", "med"), values):
            assert v is None or (b, model, v, "F1") in have, (b, model)
    for b, (base, xr) in table5.items():
        assert {(b, "base", base, "T5"), (b, "xr", xr, "T5")} <= have
    for b, (base, xr) in table4.items():
        assert {(b, "base", base, "T4"), (b, "xr", xr, "T4")} <= have
    assert ev.TEXT_SOLVABLE["mmmu-pro"] == (1730, 259, 1471, 33.4, 36.4)
    for original, solvable, left, base, xr in ev.TEXT_SOLVABLE.values():
        assert original - solvable == left and xr > base
    assert set(ev.TEXT_SOLVABLE) == {"mmmu", "mmmu-pro", "mathvista", "mathvision", "mmstar"}
    assert ev.paper_numbers("mmmu")["base"] == "53.2 (F1); 53.0 (T5)"  # two sources disagree: both kept
    assert ev.paper_numbers("mmmu-pro")["xr"] == "43.0 (F1, T5); 42.5 (T4)"
    assert all(b in ev.BENCHMARKS for b, *_ in ev.PAPER)


def test_compare_table_shows_every_number_and_table_6(capsys):
    s = ev.summarize("mathvista", [{"id": "1", "sample": 0, "extracted": "1", "correct": True,
                                    "finish_reason": "stop", "words": 3}], 1, 0)
    text = records.results_table([s], ev.PAPER_MODELS, compare=True)
    assert "| mathvista | 1 | 100.0 | 0.0 | 3.0 | 62.8 (T5) | 68.1 (T5) | 69.0 (T5) | not reported |" in text
    six = records.results_table([s], ev.PAPER_MODELS, compare=True, text_solvable=True)
    assert "paper n (T6)" in six and "| 743 | 57.9 | 60.6 |" in six
    medqa = records.results_table([ev.summarize("medqa", [], 1, 0)], ev.PAPER_MODELS, compare=True)
    assert "| MedQA (4 options) |" in medqa and "72.4 (F1)" in medqa


def test_medqa_five_options_and_mmmu_pro_nested_options():
    five = {"question": "Which vitamin deficiency causes scurvy?", "answer": "Vitamin C", "answer_idx": "E",
            "options": {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin D", "D": "Vitamin K", "E": "Vitamin C"}}
    assert ev.score("medqa-5", "<think>collagen</think><answer>E: Vitamin C</answer>", five)
    assert not ev.score("medqa-5", "<think>.</think><answer>D</answer>", five)
    assert ev.BENCHMARKS["medqa-5"]["label"] == "MedQA (5 options)" and ev.BENCHMARKS["medqa-5"]["hub"] is None
    # a quirk of the published MMMU-Pro data: options as a list inside a list
    row = dict(PRO_ROW, options="[['A', 'B', 'Not enough information']]", answer="B")
    assert ev.score("mmmu-pro", "<think>.</think><answer>B</answer>", row)
    assert ev.score("mmmu-pro", "The answer is (B).", row) and not ev.score("mmmu-pro", "Answer: C", row)


def test_exclude_ids_is_the_union_of_several_files(tmp_path):
    a, b = tmp_path / "base.tsv", tmp_path / "xr.tsv"
    records.write_solvable(a, "mathvista", ["1", "2"])
    records.write_solvable(a, "mmmu", ["validation_Art_1"])
    records.write_solvable(b, "mathvista", ["2", "5"])
    records.write_solvable(a, "mathvista", ["1", "4"])  # a rerun replaces that benchmark's lines only
    plain = tmp_path / "plain.txt"
    plain.write_text("10\n")
    assert records.read_ids([a, b, plain], "mathvista") == {"1", "4", "2", "5", "10"}
    assert records.read_ids([a], "mmmu") == {"validation_Art_1"}
    args = ev.parse_args(["--exclude-ids", f"{a},{b}", "--exclude-ids", str(plain)])
    assert args.exclude_ids == [str(a), str(b), str(plain)]


# ----------------------------------------------------------------------------------------------------
# Bad input, and results that would be stale

@pytest.mark.parametrize("case", ["missing_model", "truncated_weights", "bad_config", "unknown_bench"])
def test_bad_input_is_one_line_exit_1_and_out_unchanged(tmp_path, broken, capsys, case):
    from conftest import cli_error, snapshot
    argv, first = {
        "missing_model": (["--model", str(broken.missing)], f"--model {broken.missing}: no such directory, and not "
                                                              f"a hub id"),
        "truncated_weights": (["--model", str(broken.truncated)], f"--model {broken.truncated}: model.safetensors "
                              f"is truncated ({broken.size // 2:,} of {broken.size:,} bytes)"),
        "bad_config": (["--model", str(broken.bad_config)], f"--model {broken.bad_config}: config.json is not valid "
                       f"JSON (Expecting property name enclosed in double quotes at line 1)"),
        "unknown_bench": (["--bench", "mathvista,nope"], "unknown benchmark(s) nope; known: "
                          + ", ".join(ev.BENCHMARKS)),
    }[case]
    out = tmp_path / "out"
    status, lines = cli_error(ev.main, ["--bench", "mathvista", *FAST, "--out", str(out), *argv], capsys)
    assert (status, lines[0]) == (1, "error: " + first) and len(lines) == 1
    assert snapshot(out) is None


def test_changed_weights_at_the_same_path_are_evaluated_again(tmp_path, tiny_path, monkeypatch, capsys):
    """Records are keyed on a fingerprint of the weights, not on the path: new weights at the same path are
    scored afresh (the old records kept aside); a copy of the same weights elsewhere reuses them."""
    import shutil
    import generate
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_path, model_dir)
    args = ["--bench", "medqa", "--model", str(model_dir), "--data", "toy", "--think-budget", "8",
            "--answer-budget", "4", "--out", str(tmp_path / "eval")]
    calls = []
    real = generate.generate
    monkeypatch.setattr(generate, "generate", lambda m, p, convs, **kw: calls.append(len(convs)) or real(m, p, convs, **kw))
    (first,) = ev.main(args)
    assert calls == [3]
    ev.main(args)
    assert calls == [3]  # same weights: nothing to do
    shutil.copytree(model_dir, tmp_path / "copy")
    ev.main([a if a != str(model_dir) else str(tmp_path / "copy") for a in args])
    assert calls == [3]  # same weights elsewhere: reused
    model = data.load_model(str(model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    model.save_pretrained(model_dir)  # retrained in place
    (second,) = ev.main(args)
    assert calls == [3, 3] and second["fingerprint"] != first["fingerprint"]
    assert "the weights changed" in capsys.readouterr().err
    assert (tmp_path / "eval" / f"medqa.stale-{first['fingerprint']}.jsonl").exists()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["medqa"]["fingerprint"] == second["fingerprint"]
    assert second["fingerprint"] in (tmp_path / "eval" / "results.md").read_text().splitlines()[0]


def test_custom_items_their_template_and_the_template_flag(tmp_path):
    """`custom`: local items, free-form answers with math_equal or a letter with options, images where named;
    the math template unless --template says otherwise (toy/miniature.py asks with the training prompt)."""
    from PIL import Image
    Image.new("RGB", (56, 28), "white").save(tmp_path / "sum.png")
    items = [{"id": "free", "question": "What is 2+3?", "answer": 5},
             {"id": "choice", "question": "Which is larger?", "answer": "B", "options": ["1", "2"]},
             {"id": "picture", "question": "What is <image 1>?", "answer": "7", "images": ["sum.png"]}]
    data.write_jsonl(str(tmp_path / "items.jsonl"), items)
    rows = {r["id"]: r for r in items}
    assert ev.score("custom", "<answer>5.0</answer>", rows["free"]) and not ev.score("custom", "<answer>6</answer>",
                                                                                      rows["free"])
    assert ev.score("custom", "<answer>B</answer>", rows["choice"]) and not ev.score("custom", "<answer>A</answer>",
                                                                                      rows["choice"])
    for template, text in ((None, data.EVAL_MATH_PROMPT), ("train", data.TRAIN_PROMPT), ("mc", data.EVAL_MC_PROMPT)):
        out = tmp_path / str(template)
        run_eval(out, "--bench", "custom", "--data", str(tmp_path / "items.jsonl"),
                 *(["--template", template] if template else []))
        records = {r["id"]: r for r in map(json.loads, (out / "custom.jsonl").read_text().splitlines())}
        assert records["free"]["prompt"] == text.format(question="What is 2+3?")
        assert records["choice"]["prompt"] == text.format(question="Which is larger?") + " Options:\n\nA: 1\nB: 2"
        assert records["picture"]["prompt"] == text.format(question="What is <image 1>?")
        assert all(r["correct"] == ev.score("custom", r["response"], rows[i]) for i, r in records.items())
    assert "custom" not in ev.requested(ev.parse_args(["--bench", "all"]))[0]  # all: the paper's benchmarks only
