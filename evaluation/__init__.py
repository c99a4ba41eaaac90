"""Evaluating artifacts with EleutherAI's lm-evaluation-harness (`pip install 'tablefree-onnx[eval]'`).

`evaluation.lmeval` registers the `tablefree-onnx` model with lm-eval (it imports lm_eval, and lm_eval
imports torch, which is why this is a package of its own and not part of runtime/); `evaluation/tasks`
holds offline tasks whose data the project writes itself (`python -m evaluation.tasks.make_tasks`).
"""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASK_NAMES = ("tablefree_mc", "tablefree_cloze", "tablefree_ppl", "tablefree_gen")
