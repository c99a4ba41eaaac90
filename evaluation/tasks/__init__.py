"""The offline lm-eval tasks (YAML next to their data; load them with `--include_path evaluation/tasks`)."""
