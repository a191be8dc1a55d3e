"""Rebuild the bundled test and example data from the project's shared datasets (run from the repo root).

    python tests/data/build.py ../shared/data

The outputs are committed; this script documents exactly how they were made (see SOURCE.md for origins/licences).
"""

import csv
import gzip
import json
import random
import sys
from pathlib import Path

shared = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
here = Path(__file__).parent
examples = here.parent.parent / "examples" / "data"

labels = {r["condition_label"]: r["condition_name"]
          for r in csv.DictReader(open(shared / "medical_abstracts" / "medical_tc_labels.csv"))}
abstracts = [
    {"id": f"medabs-{i}", "text": r["medical_abstract"], "label": labels[r["condition_label"]]}
    for i, r in enumerate(csv.DictReader(open(shared / "medical_abstracts" / "medical_tc_test.csv", newline="")))
]
pool = [json.loads(line) for line in open(shared / "general_web" / "general_pool.jsonl")]


def write_jsonl_gz(path, rows):
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


write_jsonl_gz(here / "medical_abstracts.jsonl.gz", abstracts)
write_jsonl_gz(here / "general_pool.jsonl.gz", pool)

# The quickstart: 300 abstracts teach the classifier; 300 others hide among 2,700 general web documents.
rng = random.Random(2026)
shuffled = abstracts[:]
rng.shuffle(shuffled)
seeds, hidden = shuffled[:300], shuffled[300:600]
general = rng.sample(pool, 2700)
with open(examples / "medical_in_domain.jsonl", "w", encoding="utf-8") as f:
    for r in seeds:
        f.write(json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n")
corpus = [{"id": r["id"], "text": r["text"], "source": "hidden_medical_abstract", "subsource": r["label"]}
          for r in hidden] + general
rng.shuffle(corpus)
for shard in range(3):
    write_jsonl_gz(examples / "corpus" / f"web-{shard:03d}.jsonl.gz", corpus[shard::3])
# CRAFT retrieval: PubMedQA's 1,000 expert-labelled abstracts (biomedical documents to find) and CRAFT's BioQA and
# MedQA few-shots (task examples to find them with), copied as they are.
pubmedqa = [json.loads(line) for line in open(shared / "pubmedqa" / "pqal_1k.jsonl")]
write_jsonl_gz(here / "pubmedqa_abstracts.jsonl.gz",
               [{"id": f"pubmedqa-{r['pmid']}", "text": r["context"], "source": "pubmedqa"} for r in pubmedqa])
for task in ("bioqa", "medqa"):
    few_shots = (shared / "craft_fewshot" / f"{task}.corpus-task-32.jsonl").read_bytes()
    (here / f"craft_{task}_fewshot.jsonl").write_bytes(few_shots)
(examples / "craft_bioqa_fewshot.jsonl").write_bytes((here / "craft_bioqa_fewshot.jsonl").read_bytes())
print(len(abstracts), "abstracts,", len(pool), "pool docs,", len(corpus), "quickstart corpus docs")

# TRAIT's knowledge-centred case (math): word problems of two tasks, GSM8K and MMLU elementary mathematics.
gsm8k = [json.loads(line) for line in open(shared / "gsm8k" / "train.jsonl")][:12]
mmlu_math = list(csv.reader(open(shared / "mmlu" / "test" / "elementary_mathematics_test.csv", newline="")))[:12]
math_problems = [{"id": f"gsm8k-train-{i}", "task": "gsm8k", "question": r["question"],
                  "answer": r["answer"].split("####")[-1].strip()} for i, r in enumerate(gsm8k)]
math_problems += [{"id": f"mmlu-elementary-math-{i}", "task": "mmlu",
                   "question": q + "\n" + "\n".join(f"{x}. {o}" for x, o in zip("ABCD", opts)), "answer": a}
                  for i, (q, *opts, a) in enumerate(mmlu_math)]
with open(here / "math_problems.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in math_problems)
# CRAFT's CommonsenseQA few-shots: two options (Yes/No), the wrong shape for a four-option task.
(here / "craft_csqa_fewshot.jsonl").write_text((shared / "craft_fewshot" / "csqa.corpus-task-32.jsonl").read_text())
# The quickstart's evaluation set for decontamination: MMLU college biology test questions (CRAFT's BioQA evaluation).
bio = list(csv.reader(open(shared / "mmlu" / "test" / "college_biology_test.csv", newline="")))
with open(examples / "eval_bioqa.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"id": f"mmlu-college-biology-{i}", "question": q, "choices": opts, "answer": a},
                            ensure_ascii=False) + "\n" for i, (q, *opts, a) in enumerate(bio))
