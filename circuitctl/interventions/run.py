"""``circuitctl intervene``: ablate the units a spec names (or everything else) and measure what changes.

    parse the spec -> cheap checks (tasks, files, output and export directories, whether the edit
    can be baked) -> load the model and the config's task -> resolve the units -> measure the
    config's task (and its spurious answers, when its pairs name some) and every ``--tasks`` task
    -> the loss on ``--text`` -> write intervention.json/.md/.png -> ``--export`` the checkpoint.

Every task is measured with the config's ablation; a task's metric is its own (task.yaml
``metric:``) or else the config's. Under torchrun every rank computes and the main rank writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from circuitctl.config.schema import AblationConfig, RunConfig, TaskConfig
from circuitctl.errors import UsageError
from circuitctl.interventions.spec import AblationSpec, parse_spec

MODES = ("remove", "keep")
SPURIOUS_SUFFIX = " (spurious answers)"
# per-position spaces and per-position feature circuits depend on the task's positions
_TASK_DEPENDENT = ("positional_edge", "positional_node")


@dataclass
class InterventionResult:
    record: dict
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Task:
    name: str
    config: RunConfig  # the config with this task (and its metric)
    source: object  # TaskSource


def intervene(
    config: RunConfig,
    config_dir: Path | None,
    ablate: str,
    mode: str = "remove",
    tasks: list[str] | None = None,
    text: Path | None = None,
    export: Path | None = None,
    out: Path | None = None,
    force: bool = False,
) -> InterventionResult:
    """Run an intervention and write its files (see the module docstring)."""
    from circuitctl import distributed
    from circuitctl.batching import collect_notes
    from circuitctl.interventions import report
    from circuitctl.session import check_model_source, read_task_source

    if mode not in MODES:
        raise UsageError(f"--mode: '{mode}' is not a mode (remove: ablate the named units; keep: ablate every other unit)")
    spec = parse_spec(ablate)
    primary = _Task(_task_label(config), config, read_task_source(config, config_dir))
    extra = [_other_task(entry, config, config_dir) for entry in tasks or []]
    check_model_source(config, config_dir)
    if text is not None:
        _check_text(Path(text), _spec_kind(spec))
    if export is not None:
        _refuse_unbakeable(_spec_kind(spec), config.ablation, "--export")
        from circuitctl.interventions.weights import check_export_dir

        check_export_dir(Path(export), force)
    out_dir = Path(out) if out is not None else default_out_dir(config)
    paths = report.targets(out_dir, force)
    distributed.init_from_env(config.model.device)
    out_dir = Path(distributed.broadcast_from_main(str(out_dir)))
    paths = [out_dir / p.name for p in paths]
    with collect_notes() as notes:
        record, export_job = _compute(spec, mode, primary, extra, text, export, config_dir)
        record["notes"] = list(notes) + record["notes"]
    files: list[Path] = []
    if distributed.is_main():
        report.write(paths, record)
        files = list(paths)
        if export_job is not None:
            files += export_job()
    return InterventionResult(record, out_dir, files, record["notes"])


def default_out_dir(config: RunConfig) -> Path:
    from circuitctl.io.escape import path_component

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / path_component(f"{_task_label(config)}-intervene-{stamp}")  # a name, never a path


def _task_label(config: RunConfig) -> str:
    return config.task.name or Path(config.task.path or "task").stem


def _other_task(entry: str, config: RunConfig, config_dir: Path | None) -> _Task:
    """A ``--tasks`` entry: a shipped task or generator name, or a path (spec or JSONL)."""
    from circuitctl.session import read_task_source

    entry = entry.strip()
    if not entry:
        raise UsageError("--tasks: an empty task name in the list")
    path_like = "/" in entry or entry.endswith((".yaml", ".yml", ".jsonl")) or Path(entry).exists()
    task = TaskConfig(path=entry, n_pairs=config.task.n_pairs) if path_like else TaskConfig(name=entry, n_pairs=config.task.n_pairs)
    task_config = config.model_copy(update={"task": task})
    source = read_task_source(task_config, config_dir)
    if source.spec.metric is not None and source.spec.metric != config.metric:
        task_config = task_config.model_copy(update={"metric": source.spec.metric})
    return _Task(entry if path_like else source.spec.name, task_config, source)


def _spec_kind(spec: AblationSpec) -> str:
    """The kind of units a spec names, read without the model (for refusing early)."""
    if spec.run is None:
        return spec.kind or "node"
    if spec.group is not None:
        from circuitctl.interventions.units import one_kind, group_members

        return one_kind(group_members(spec.run_dir, spec.group), f"group '{spec.group}'")
    from circuitctl.circuits.record import load_circuit_file

    return load_circuit_file(spec.run).kind


def _check_text(path: Path, kind: str, per_position: bool = False) -> None:
    """--text measures SAE-feature edits, and head / MLP / neuron edits through weights that compute them."""
    if not path.is_file():
        raise UsageError(f"--text: '{path}' does not exist")
    if kind not in ("feature", "node", "neuron") or per_position:
        raise UsageError(
            f"--text: the loss on text is measured for SAE features (summed over positions), heads, MLPs and neurons; "
            f"not for {kind.replace('_', ' ')} units, which are tied to the task's prompts"
        )


def _refuse_unbakeable(kind: str, ablation, what: str) -> None:
    from circuitctl.interventions.weights import bake_refusal

    reason = bake_refusal(kind, ablation)
    if reason is not None:
        raise UsageError(f"{what}: the edit cannot be baked into a checkpoint: {reason}; nothing was written")


def _compute(spec, mode, primary: _Task, extra: list[_Task], text, export, config_dir):
    from circuitctl.interventions.measure import measure
    from circuitctl.interventions.units import resolve
    from circuitctl.session import open_session

    config = primary.config
    session = open_session(config, config_dir)
    batch_size = config.batch_size
    selection = resolve(spec, session, config_dir, batch_size)
    space = selection.space
    selected = selection.selected & space.mask
    keep = space.mask & ~selected if mode == "remove" else selected
    ablated = space.mask & ~keep
    notes: list[str] = []
    if mode == "keep" and space.kind == "node" and bool(ablated[space.graph.upstream_index["input"]]):
        notes.append("keep mode ablates the 'input' node (the embeddings) too, since it is not among the kept units")
    # everything that can fail is checked before the first measurement: tasks, text, export
    measured = [
        (task, origin, data, metric, _space_for_task(space, session, data, task))
        for task, origin, data, metric in _task_data(primary, session, extra)
    ]
    text_changes = _text_changes(Path(text), space, ablated, session, batch_size) if text is not None else None
    export_job = None
    if export is not None:
        _refuse_unbakeable(space.kind, config.ablation, "--export")
        export_job = _export_job(Path(export), space, ablated, session, batch_size, spec, mode, config_dir)

    tasks = {}
    for task, origin, data, metric, task_space in measured:
        effect = measure(task_space, keep, session.adapter, data, metric, config.ablation, batch_size, task, origin)
        tasks[_unique(task, tasks)] = effect.to_dict()
    text_effect = None
    if text is not None:
        from circuitctl.interventions.text import measure_text

        text_effect = measure_text(Path(text), space, keep, session, batch_size, text_changes).to_dict()

    record = _record(spec, mode, selection, ablated, tasks, text_effect, export, session, notes)
    return record, export_job


def _record(spec, mode: str, selection, ablated, tasks: dict, text_effect, export, session, notes: list[str]) -> dict:
    """intervention.json (see the README: `intervene`)."""
    from circuitctl.interventions.masks import names_of
    from circuitctl.interventions.report import FORMAT, MAX_LISTED, SCHEMA_VERSION

    config, space = session.config, selection.space
    selected = selection.selected & space.mask
    n_ablated = int(ablated.sum())
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.text,
        "mode": mode,
        "kind": space.kind,
        "unit": space.unit,
        "rule": selection.rule,
        "selected": names_of(space, selected),
        "ablated": names_of(space, ablated) if n_ablated <= MAX_LISTED else None,
        "n_ablated": n_ablated,
        "n_total": int(space.mask.sum()),
        "ablation": config.ablation.model_dump(mode="json"),
        "tasks": tasks,
        "text": text_effect,
        "export": {"dir": str(export)} if export is not None else None,
        "selection_details": selection.details,
        "model": {"name": config.model.name, "path": config.model.path, **session.adapter.describe()},
        "config": config.to_plain(),
        **_provenance(config),
        "notes": notes,
    }


def _provenance(config: RunConfig) -> dict:
    from circuitctl.versions import library_versions
    from circuitctl.config.load import config_hash

    return {"config_hash": config_hash(config), "seed": config.seed, "library_versions": library_versions()}


def _unique(name: str, taken: dict) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name} ({n})" in taken:
        n += 1
    return f"{name} ({n})"


def _task_data(primary: _Task, session, extra: list[_Task]):
    """(name, origin, TaskData, metric) of every measured task: the config's task (and its spurious
    answers when every pair names some), then each ``--tasks`` task (likewise)."""
    from circuitctl.interventions.spurious import has_spurious_answers, spurious_pairs
    from circuitctl.metrics.metrics import METRICS
    from circuitctl.session import tokenize_task
    from circuitctl.tasks.data import task_pairs

    for task in [primary, *extra]:
        config, source = task.config, task.source
        metric = session.metric if task is primary else METRICS.get(config.metric)
        pairs = task_pairs(source, session.adapter.tokenizer, config.task.n_pairs, config.seed, config.task.options)
        data = session.data if task is primary else tokenize_task(pairs, source, session.adapter, metric)
        yield task.name, source.origin, data, metric
        if has_spurious_answers(pairs):
            swapped = spurious_pairs(pairs, source.origin, metric)
            yield task.name + SPURIOUS_SUFFIX, source.origin, tokenize_task(swapped, source, session.adapter, metric), metric


def _space_for_task(space, session, data, task: str):
    """The space on another task's prompts: the same object, except for per-position units,
    which are rebuilt for the task's positions and must name the same units."""
    if space.kind not in _TASK_DEPENDENT and not (space.kind == "feature" and space.layout is not None):
        return space
    from circuitctl.circuits import space_for

    try:
        other = space_for(space.info(), session.adapter, data)
    except UsageError as exc:
        raise UsageError(f"--tasks {task}: a per-position circuit applies to tasks with the same positions: {exc}") from exc
    if other.unit_names() != space.unit_names():
        raise UsageError(f"--tasks {task}: its positions differ from the circuit's, so the per-position units do not carry over")
    return other


def _changes_for(space, ablated, session, batch_size: int, ablation: AblationConfig) -> dict:
    """The weight edits that compute the ablation of `ablated` with `ablation` (zero or position-independent mean)."""
    from circuitctl.interventions.weights import ablation_means, weight_changes
    from circuitctl.patching.engine import PatchingEngine

    engine = PatchingEngine(session.adapter, session.data, session.metric, ablation, batch_size)
    return weight_changes(space, ablated, session.adapter.model, ablation_means(space, engine))


def _export_job(path: Path, space, ablated, session, batch_size: int, spec, mode: str, config_dir: Path | None):
    """Compute the edit now (so that an edit that cannot be baked stops before anything is
    written); return the function that writes the checkpoint."""
    from circuitctl.interventions.masks import names_of
    from circuitctl.interventions.weights import export_checkpoint
    from circuitctl.resources import resolve_path

    config = session.config
    changes = _changes_for(space, ablated, session, batch_size, config.ablation)
    source_dir = resolve_path(config.model.path, config_dir) if config.model.path else None
    edit = {
        "format": "circuitctl.edit",
        "source_model": config.model.path or config.model.name,
        "spec": spec.text,
        "mode": mode,
        "ablation": config.ablation.model_dump(mode="json"),
        "ablated": names_of(space, ablated),
        "tensors": sorted(changes),
    }
    return lambda: export_checkpoint(path, session.adapter.model, changes, source_dir, edit)


def _text_changes(path: Path, space, ablated, session, batch_size: int) -> dict | None:
    """Check --text for this edit; the weight edits that compute it on text (None for SAE features)."""
    from circuitctl.interventions.text import check_text_source

    _check_text(path, space.kind, getattr(space, "layout", None) is not None)
    check_text_source(path, session.adapter)
    if space.kind == "feature":
        return None
    kind = "mean" if session.config.ablation.type == "mean" else "zero"
    try:
        return _changes_for(space, ablated, session, batch_size, AblationConfig(type=kind, per_position=False))
    except UsageError as exc:
        raise UsageError(f"--text: {exc}") from exc
