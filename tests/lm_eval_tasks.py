"""lm-evaluation-harness task files for local data, shared by the tests and benchmarks/evaluate.py."""

from __future__ import annotations

from pathlib import Path


def write_multiple_choice_task(folder: Path, name: str, data: Path, *, text_field: str,
                               fewshot_from_test: bool = False) -> None:
    """``<folder>/<name>.yaml``: a multiple-choice task over the jsonl ``data`` (``text_field``,
    ``choices``, ``label``), scored with acc and acc_norm; few-shot examples (``num_fewshot``) come from
    the same data, less the question, when ``fewshot_from_test``."""
    fewshot = "fewshot_split: test\n" if fewshot_from_test else ""
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
{fewshot}output_type: multiple_choice
doc_to_text: "{{{{{text_field}}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
