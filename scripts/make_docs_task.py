"""Write two lm-evaluation-harness tasks over local data (they run offline), from text no hfcompress default was
tuned on:

- `docs_section`: which part of the Python documentation a paragraph comes from, zero-shot multiple choice over
  the six section names (../shared/docs-cls/val.jsonl);
- `docs_next_word`: the word that follows 40 words of held-out documentation prose, against three words drawn
  from elsewhere in the same text (a LAMBADA-style cloze over ../shared/corpus/val.txt).

    python scripts/make_docs_task.py OUT_DIR [--shared ../shared]
    hfcompress evaluate MODEL --tasks docs_section,docs_next_word --tasks-dir OUT_DIR --json
"""

import argparse
import json
import random
from pathlib import Path

HEADER = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
metric_list:
  - metric: acc
  - metric: acc_norm
"""
SECTION = """task: docs_section
doc_to_text: "{{{{text}}}}\\nThis paragraph comes from the Python documentation's section:"
doc_to_choice: {choices}
doc_to_target: label
"""
NEXT_WORD = """task: docs_next_word
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
"""


def _write(out: Path, name: str, rows: list[dict], task: str) -> None:
    data = out / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (out / f"{name}.yaml").write_text(task + HEADER.format(data=data.resolve()))
    print(f"wrote {out / name}.yaml ({len(rows)} documents)")


def next_word_rows(text: str, count: int = 500, context: int = 40, seed: int = 0) -> list[dict]:
    words = text.split()
    rng = random.Random(seed)
    step = (len(words) - context - 1) // count
    rows = []
    for start in range(0, step * count, step):
        right = words[start + context]
        wrong = set()
        while len(wrong) < 3:
            word = rng.choice(words)
            if word != right:
                wrong.add(word)
        choices = sorted(wrong | {right})
        rng.shuffle(choices)
        rows.append(
            {"context": " ".join(words[start : start + context]), "choices": choices, "gold": choices.index(right)}
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the task YAMLs and their data into")
    parser.add_argument("--shared", type=Path, default=Path(__file__).parent.parent.parent / "shared")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cls = args.shared / "docs-cls"
    labels = json.loads((cls / "labels.json").read_text())
    rows = [json.loads(line) for line in (cls / "val.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    _write(args.out, "docs_section", rows, SECTION.format(choices=json.dumps(labels)))
    text = (args.shared / "corpus" / "val.txt").read_text(encoding="utf-8")
    _write(args.out, "docs_next_word", next_word_rows(text), NEXT_WORD)


if __name__ == "__main__":
    main()
