"""Regenerate the bundled toy data (deterministic): python toy/make_toy.py

- sft.jsonl      OpenThoughts-114k schema; the learnable task "What is a + b?" with single digits.
- rl.json        Orz-math-57k schema; the same task, answers verified by rewards.math_reward.
- mathvista.json real MathVista testmini annotations (a few items of every question/answer type) whose
                 images (images/<pid>.png) are drawn here, since the real images are not shipped.
- mmmu.json, mmmu_pro.json, medqa.jsonl, mmlu_pro.json: a few items written for this repository in the
                 published schemas of MMMU (validation), MMMU-Pro (standard, 10 options), MedQA-USMLE-4-options
                 and MMLU-Pro, for evaluate.py's offline runs and tests.
"""
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SHARED_MATHVISTA = HERE.parent.parent / "shared" / "data" / "mathvista_testmini.json"
OPENTHOUGHTS_SYSTEM = ("Your role as an assistant involves thoroughly exploring questions through a systematic "
                       "long thinking process before providing the final precise and accurate solutions.")
MATHVISTA_PIDS = ["1", "2", "4", "5", "10", "19", "74", "84", "225"]


def addition_items(seed):
    items = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(items)
    return items


def sft_row(a, b):
    thought = f"I need {a} + {b}. Adding: {a} + {b} = {a + b}."
    reply = (f"<|begin_of_thought|>\n\n{thought}\n\n<|end_of_thought|>\n\n"
             f"<|begin_of_solution|>\n\n{a + b}\n\n<|end_of_solution|>")
    return {"system": OPENTHOUGHTS_SYSTEM, "conversations": [
        {"from": "user", "value": f"What is {a} + {b}?"}, {"from": "assistant", "value": reply}]}


def orz_row(a, b):
    return [{"from": "human", "value": f"What is {a} + {b}?"},
            {"from": "assistant", "ground_truth": {"value": str(a + b)}}]


def draw_image(pid, row):
    """A stand-in picture: the question's numbers and the choices drawn as text on a coloured card."""
    rng = random.Random(int(pid))
    img = Image.new("RGB", (rng.choice([84, 112, 140]), rng.choice([84, 112])), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    draw.rectangle([4, 4, img.width - 5, img.height - 5], outline=(rng.randrange(200), 60, 160), width=3)
    draw.text((10, 10), f"#{pid}", fill=(0, 0, 0))
    for i, choice in enumerate((row["choices"] or [])[:4]):
        draw.text((10, 24 + 12 * i), str(choice)[:12], fill=(30, 30, 120))
    return img


def main():
    with open(HERE / "sft.jsonl", "w") as f:
        for a, b in addition_items(seed=0):
            f.write(json.dumps(sft_row(a, b)) + "\n")
    rows = [json.dumps(orz_row(a, b)) for a, b in addition_items(seed=1)]
    (HERE / "rl.json").write_text("[\n" + ",\n".join(rows) + "\n]\n")
    annotations = json.loads(SHARED_MATHVISTA.read_text())
    (HERE / "images").mkdir(exist_ok=True)
    rows = {}
    for pid in MATHVISTA_PIDS:
        row = dict(annotations[pid], image=f"images/{pid}.png")
        draw_image(pid, row).save(HERE / row["image"])
        rows[pid] = row
    (HERE / "mathvista.json").write_text(json.dumps(rows, indent=1))
    eval_fixtures()


def card(name, lines):
    """A stand-in picture for the multiple-choice fixtures: a few words on a card."""
    img = Image.new("RGB", (112, 84), (245, 248, 250))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((6, 6 + 14 * i), line[:16], fill=(20, 20, 20))
    img.save(HERE / "images" / name)
    return f"images/{name}"


def mmmu_row(pid, question, options, answer, images, qtype="multiple-choice", subfield=""):
    row = {"id": pid, "question": question, "options": str(options), "explanation": "", "answer": answer,
           "img_type": "['Diagrams']", "topic_difficulty": "Easy", "question_type": qtype, "subfield": subfield}
    return row | {f"image_{k}": (images[k - 1] if k <= len(images) else None) for k in range(1, 8)}


def eval_fixtures():
    mmmu = [
        mmmu_row("validation_Clinical_Medicine_1", "The chest radiograph in <image 1> shows fluid at the right "
                 "base. Which finding is this?", ["Pneumothorax", "Cardiomegaly", "Pleural effusion",
                                                  "Normal study"], "C", [card("mmmu_1.png", ["CXR", "R base"])],
                 subfield="Pulmonary"),
        mmmu_row("validation_Math_2", "<image 1> The triangles are similar with ratio 1:2; <image 2> shows the "
                 "larger one with side 8. What is x?", ["3", "4", "6", "8"], "B",
                 [card("mmmu_2a.png", ["x", "ratio 1:2"]), card("mmmu_2b.png", ["8"])], subfield="Geometry"),
        mmmu_row("validation_Physics_3", "A ball falls from rest from the height in <image 1> (10 m). How many "
                 "seconds does it take to land (g = 9.8 m/s^2)? Round to two decimals.", [], "1.43",
                 [card("mmmu_3.png", ["h = 10 m"])], qtype="open", subfield="Mechanics"),
        mmmu_row("validation_Pharmacy_4", "Which drug class does the structure in <image 1> belong to?",
                 ["Beta-lactam antibiotics", "Benzodiazepines", "Statins", "Opioids", "Diuretics"], "A",
                 [card("mmmu_4.png", ["beta-lactam", "ring"])], subfield="Pharmacology"),
    ]
    (HERE / "mmmu.json").write_text(json.dumps(mmmu, indent=1))
    ten = ["Warfarin", "Heparin", "Aspirin", "Clopidogrel", "Alteplase", "Dabigatran", "Rivaroxaban",
           "Apixaban", "Enoxaparin", "Fondaparinux"]
    pro = [
        {"id": "test_Pharmacy_1", "question": "The drug whose label is shown in <image 1> is reversed by "
         "vitamin K. Which drug is it?", "options": str(ten), "answer": "A", "subject": "Pharmacy",
         "image_1": card("pro_1.png", ["reversal:", "vitamin K"])},
        {"id": "test_History_2", "question": "The map in <image 1> shows the empire at its largest. In which "
         "century was that?", "options": str([f"{n}th century" for n in range(11, 21)]), "answer": "C",
         "subject": "History", "image_1": card("pro_2.png", ["empire", "1200s"])},
        {"id": "test_Clinical_Medicine_3", "question": "The ECG in <image 1> shows no P waves and an irregular "
         "rhythm. What is the diagnosis?", "options": str(["Atrial flutter", "Atrial fibrillation",
         "Sinus rhythm", "First-degree block", "Ventricular tachycardia", "Torsades", "Sinus arrest",
         "Junctional rhythm", "Wenckebach", "Asystole"]), "answer": "B", "subject": "Clinical_Medicine",
         "image_1": card("pro_3.png", ["no P waves", "irregular"])},
    ]
    for row in pro:
        row.update({"explanation": "", "img_type": "['Diagrams']", "topic_difficulty": "Medium"})
        row.update({f"image_{k}": None for k in range(2, 8)})
    (HERE / "mmmu_pro.json").write_text(json.dumps(pro, indent=1))
    text_fixtures()


def text_fixtures():
    """The text-only benchmark fixtures: MedQA (4 options) and MMLU-Pro rows in their published schemas."""
    medqa = [
        ("A 23-year-old woman has fever and dysuria. Urine culture grows a lactose-fermenting gram-negative rod. "
         "Which organism is most likely?", ["Escherichia coli", "Proteus mirabilis", "Pseudomonas aeruginosa",
                                             "Staphylococcus saprophyticus"], "A"),
        ("A 60-year-old man has crushing chest pain and ST elevation in leads II, III and aVF. Which artery is "
         "most likely occluded?", ["Left anterior descending", "Left circumflex", "Right coronary",
                                   "Left main"], "C"),
        ("A child has a barking cough and inspiratory stridor. Which virus most often causes this?",
         ["Respiratory syncytial virus", "Rhinovirus", "Adenovirus", "Parainfluenza virus"], "D"),
    ]
    with open(HERE / "medqa.jsonl", "w") as f:
        for question, options, letter in medqa:
            opts = dict(zip("ABCD", options))
            f.write(json.dumps({"question": question, "answer": opts[letter], "options": opts,
                                "meta_info": "step1", "answer_idx": letter}) + "\n")
    mmlu_pro = [
        (70, "What is 12 * 12?", ["124", "144", "132", "154", "121", "164", "141", "142", "134", "148"], 1, "math"),
        (71, "Which vitamin deficiency causes scurvy?", ["Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D",
                                                        "Vitamin K", "Thiamine"], 2, "health"),
        (72, "Which organ produces insulin?", ["Liver", "Pancreas", "Kidney", "Spleen", "Stomach", "Gallbladder",
                                              "Thyroid", "Adrenal gland"], 1, "health"),
        (73, "How many sides does a hexagon have?", ["5", "6", "7", "8"], 1, "math"),
    ]
    rows = [{"question_id": qid, "question": q, "options": opts, "answer": "ABCDEFGHIJ"[i], "answer_index": i,
             "cot_content": "", "category": cat, "src": f"ori_mmlu-{cat}"} for qid, q, opts, i, cat in mmlu_pro]
    (HERE / "mmlu_pro.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
