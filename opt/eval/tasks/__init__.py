"""Small offline tasks in lm-eval's format (YAML + JSON lines), bundled so that `make run` and the tests evaluate
without the network. `TASKS_DIR` is the include path to hand to lm-eval's TaskManager."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
BUNDLED = ("pydocs_cloze", "pydocs_choice", "pydocs_story")
