"""lm-evaluation-harness task files for local data, shared by the tests and benchmarks/evaluate.py."""

from __future__ import annotations

from pathlib import Path


def write_multiple_choice_task(folder: Path, name: str, data: Path, *, text_field: str) -> None:
    """``<folder>/<name>.yaml``: a zero-shot multiple-choice task over the jsonl ``data``
    (``text_field``, ``choices``, ``label``), scored with acc and acc_norm."""
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{{text_field}}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
