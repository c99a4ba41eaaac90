"""Task data loader for the offline task YAMLs (`custom_dataset: !function utils.load`).

lm-eval resolves `!function` next to the YAML but `data_files` against the current folder; loading
through this function makes the tasks run from any working directory."""
from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def load(file: str, **unused) -> dict:
    """{"test": Dataset} of data/FILE (JSON lines); lm-eval passes dataset_kwargs and metadata here."""
    import datasets

    path = DATA / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `python -m evaluation.tasks.make_tasks` to write it")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
