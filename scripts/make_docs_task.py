"""Write an lm-evaluation-harness task over local data (runs offline): which part of the Python documentation a
paragraph comes from, as a zero-shot multiple choice over the six section names, from
../shared/docs-cls/val.jsonl (a real classification task the reference model was never tuned on).

    python scripts/make_docs_task.py OUT_DIR [--data ../shared/docs-cls/val.jsonl]
    hfcompress evaluate MODEL --tasks docs_section --tasks-dir OUT_DIR --json
"""

import argparse
import json
from pathlib import Path

TASK = """task: docs_section
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}\\nThis paragraph comes from the Python documentation's section:"
doc_to_choice: {choices}
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the task YAML and its data into")
    parser.add_argument("--data", type=Path, default=Path(__file__).parent.parent.parent / "shared/docs-cls/val.jsonl")
    args = parser.parse_args()
    labels = json.loads((args.data.parent / "labels.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = args.out / "docs_section.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (args.out / "docs_section.yaml").write_text(TASK.format(data=data.resolve(), choices=json.dumps(labels)))
    print(f"wrote {args.out}/docs_section.yaml ({len(rows)} documents, choices {labels})")


if __name__ == "__main__":
    main()
