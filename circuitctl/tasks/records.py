"""Reading task data: the task YAML spec and its JSONL prompt pairs (no torch, no tokenizer).

A pair record is ``{"clean", "corrupt", "answers", "wrong_answers", "positions"}``; prompts
and answers are text (tokenized with the model's tokenizer) or integer token ids (used as
they are). Every problem names the file and line. A pair may also name a second, unwanted
answer set, ``spurious_answers`` (and ``spurious_wrong_answers``, what they compete with): the
behaviour an edit should remove while the intended one survives (SHIFT, Marks et al. 2024;
`circuitctl intervene --ablate RUN:top=N:by=spurious`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from circuitctl.errors import UsageError
from circuitctl.graph import naming
from circuitctl.io.yaml_errors import describe_yaml_error

Prompt = Union[str, list[int]]
Answer = Union[str, int]


@dataclass(frozen=True)
class PromptPair:
    clean: Prompt
    corrupt: Prompt
    answers: tuple[Answer, ...]
    wrong_answers: tuple[Answer, ...] = ()
    positions: dict[str, int] = field(default_factory=dict)
    line: int = 0  # 1-based line in the source file (0 for generated pairs)
    spurious_answers: tuple[Answer, ...] = ()  # an unwanted answer set (empty: none)
    spurious_wrong_answers: tuple[Answer, ...] = ()


class TaskSpec(BaseModel):
    """The small YAML file that describes a task."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    version: int = 1
    description: str = ""
    pairs: Optional[str] = Field(None, description="JSONL file of prompt pairs, relative to the spec")
    generator: Optional[str] = Field(None, description="name of a built-in prompt-pair generator")
    options: dict[str, Any] = Field(default_factory=dict, description="generator options")
    n_pairs: Optional[int] = Field(None, ge=1)
    metric: Optional[str] = None
    positions: list[str] = Field(default_factory=list, description="labelled positions, e.g. [S1, S2, end]")


@dataclass(frozen=True)
class TaskSource:
    """A task as read from disk: its spec and either pairs or a generator to run later."""

    spec: TaskSpec
    pairs: Sequence[PromptPair] | None  # a PairFile (read lazily) or a tuple; None for a generator
    origin: str


def _check_prompt(value: Any, what: str, where: str) -> Prompt:
    if isinstance(value, str):
        if not value:
            raise UsageError(f"{where}: '{what}' is an empty string")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    raise UsageError(f"{where}: '{what}' must be a non-empty string or a list of integer token ids")


def _check_answers(value: Any, what: str, where: str, required: bool) -> tuple[Answer, ...]:
    if value is None:
        if required:
            raise UsageError(f"{where}: '{what}' is missing")
        return ()
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or (required and not value):
        raise UsageError(f"{where}: '{what}' must be a non-empty list of answers (strings or token ids)")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int)) or item == "":
            raise UsageError(f"{where}: '{what}' contains {item!r}; answers are strings or token ids")
    return tuple(value)


def pair_from_record(record: Any, where: str, line: int = 0) -> PromptPair:
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a pair must be a JSON object with clean, corrupt, answers")
    unknown = set(record) - {"clean", "corrupt", "answers", "wrong_answers", "positions", "meta", *SPURIOUS_FIELDS}
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for key in ("clean", "corrupt", "answers"):
        if key not in record:
            raise UsageError(f"{where}: '{key}' is missing")
    positions = record.get("positions") or {}
    if not isinstance(positions, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in positions.values()):
        raise UsageError(f"{where}: 'positions' must map labels to integer token indices")
    bad = next((label for label in positions if not naming.is_position_label(label)), None)
    if bad is not None:  # labels become node names (a3.h0@label) and appear in every drawing
        raise UsageError(f"{where}: position label {bad!r} is not allowed; labels are {naming.POSITION_LABEL_RULE}")
    answers = _check_answers(record["answers"], "answers", where, True)
    wrong = _check_answers(record.get("wrong_answers"), "wrong_answers", where, False)
    same = next((a for a in answers if a in wrong), None)
    if same is not None:
        raise UsageError(f"{where}: {same!r} is both an answer and a wrong answer; the metric would compare it with itself")
    return PromptPair(
        clean=_check_prompt(record["clean"], "clean", where),
        corrupt=_check_prompt(record["corrupt"], "corrupt", where),
        answers=answers,
        wrong_answers=wrong,
        positions=dict(positions),
        line=line,
        **_spurious(record, where),
    )


SPURIOUS_FIELDS = ("spurious_answers", "spurious_wrong_answers")


def _spurious(record: dict, where: str) -> dict:
    """The optional spurious answer sets; wrong ones only beside spurious answers."""
    found = {key: _check_answers(record.get(key), key, where, False) for key in SPURIOUS_FIELDS}
    if record.get("spurious_answers") is not None and not found["spurious_answers"]:
        raise UsageError(f"{where}: 'spurious_answers' must be a non-empty list of answers (strings or token ids)")
    if found["spurious_wrong_answers"] and not found["spurious_answers"]:
        raise UsageError(f"{where}: 'spurious_wrong_answers' is given without 'spurious_answers'")
    return found


def read_pairs_jsonl(path: Path):
    """The pairs of a JSONL file: every line checked in one streaming pass, pairs read lazily
    (`circuitctl.tasks.pair_file.PairFile`, a sequence of PromptPair)."""
    from circuitctl.tasks.pair_file import PairFile

    return PairFile(path, pair_from_record)


def read_spec(path: Path) -> TaskSpec:
    from circuitctl.io.yaml_errors import check_nesting, read_text

    text = read_text(path)
    check_nesting(text, path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(describe_yaml_error(path, exc)) from exc
    except RecursionError:  # PyYAML recurses once per nesting level
        raise UsageError(f"{path}: YAML nested too deeply to read") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a task spec must be a YAML mapping (name, pairs, ...)")
    try:
        spec = TaskSpec.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise UsageError(f"{path} is not a valid task spec:\n  - " + "\n  - ".join(problems)) from exc
    if (spec.pairs is None) == (spec.generator is None):
        raise UsageError(f"{path}: give exactly one of 'pairs' (a JSONL file) or 'generator'")
    return spec


def read_task(name: str | None, path: Path | None, shipped_dir: Path) -> TaskSource:
    """Read a task by shipped name, generator name, spec path or JSONL path."""
    spec, pairs_file, origin = _locate(name, path, shipped_dir)
    return TaskSource(spec, read_pairs_jsonl(pairs_file) if pairs_file is not None else None, origin)


def read_task_spec(name: str | None, path: Path | None, shipped_dir: Path) -> tuple[TaskSpec, str]:
    """The spec of a task (as `read_task` finds it) and where it comes from, without its pairs."""
    spec, _, origin = _locate(name, path, shipped_dir)
    return spec, origin


def _locate(name: str | None, path: Path | None, shipped_dir: Path) -> tuple[TaskSpec, Path | None, str]:
    """(spec, the JSONL file of its pairs or None for a generator, origin)."""
    if path is not None:
        if not path.exists():
            raise UsageError(f"task.path: '{path}' does not exist")
        if path.is_dir():
            path = path / "task.yaml"
            if not path.is_file():
                raise UsageError("task.path: directory has no task.yaml")
        if path.suffix == ".jsonl":
            return TaskSpec(name=path.stem, pairs=path.name), path, str(path)
        return _with_pairs_file(read_spec(path), path)
    assert name is not None
    spec_file = shipped_dir / name / "task.yaml"
    if spec_file.is_file():
        return _with_pairs_file(read_spec(spec_file), spec_file)
    from circuitctl.tasks import catalog

    if name in catalog.generator_names():
        return TaskSpec(name=name, generator=name, metric=catalog.generator_metric(name)), None, f"generator:{name}"
    raise UsageError("task.name: " + catalog.unknown_task_message(name, shipped_dir))


def _with_pairs_file(spec: TaskSpec, spec_file: Path) -> tuple[TaskSpec, Path | None, str]:
    return spec, (spec_file.parent / spec.pairs if spec.pairs is not None else None), str(spec_file)
