"""Write the planted ground-truth models as local checkpoints and their tasks.

    python scripts/export_planted.py            # -> models/planted-<name>/ and tasks/planted-<name>/

The shipped copies are checked against `circuitctl.testing.planted.build` by the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

from circuitctl.testing.planted import PLANTED, REDUNDANT, build, export

ROOT = Path(__file__).resolve().parent.parent


def shipped_name(name: str) -> str:
    return "planted-" + name.replace("_", "-")


def main(names: list[str]) -> None:
    for name in names or sorted({**PLANTED, **REDUNDANT}):
        pc = build(name)
        shipped = shipped_name(name)
        model_dir, task_dir = export(pc, ROOT / "models" / shipped, ROOT / "tasks" / shipped)
        (task_dir / "true_edges.txt").write_text("\n".join(sorted(pc.true_edges)) + "\n")
        print(f"{name}: {model_dir.relative_to(ROOT)}, {task_dir.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
