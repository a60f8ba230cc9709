"""`discover`: config -> run directory, one path for every method and every kind of circuit.

    method (scores over a circuit space) -> select -> evaluate -> write -> draw

A method returns a `DiscoveryResult` (one circuit, or a sweep of circuits); the result's space
(`circuitctl.circuits`) supplies what depends on the kind of circuit. Returns a summary;
never prints.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import yaml

from circuitctl.config.load import config_hash
from circuitctl.config.schema import RunConfig
from circuitctl.errors import UsageError
from circuitctl.io.files import commit_staged, prepare_run_dir, remove_if_empty, staged_writes, write_atomic
from circuitctl.io.run_lock import RunLock
from circuitctl.checks import check_task_signal
from circuitctl.session import check_model_source, open_session, read_task_source


@dataclass
class DiscoverySummary:
    run_dir: Path
    method: str
    unit: str  # what the counts count: edges | nodes | neurons | features
    n_total: int
    n_in_circuit: int
    n_nodes_in_circuit: int
    faithfulness: float | None  # None: undefined (the ablation changes nothing)
    m_full: float
    m_empty: float
    m_circuit: float
    chosen_by: str  # the rule that chose the circuit (the method's own, or a selection by score)
    seconds: dict[str, float]
    files: list[str]
    notes: list[str] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)  # one row per circuit of a sweep (e.g. ACDC's taus)


@dataclass
class _Circuit:
    """One circuit of a run: the run's only one, or one point of a sweep."""

    label: str | None  # a sweep point's subdirectory
    params: dict
    scores: object  # tensor shaped like space.mask
    membership: object
    chosen_by: str
    forward_passes: float
    extra: dict
    m_circuit: float = 0.0


def default_run_dir(config: RunConfig) -> Path:
    from circuitctl.io.escape import path_component

    task = config.task.name or Path(config.task.path or "task").stem
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / path_component(f"{task}-{config.method.name}-{stamp}")  # a name, never a path


def discover(config: RunConfig, config_dir: Path | None = None, force: bool = False, resume: Path | None = None) -> DiscoverySummary:
    """Run discovery and write the run directory. Under torchrun (WORLD_SIZE > 1) every rank
    computes (the examples are split across ranks) and only the main rank writes files.
    `resume`: continue the interrupted run in that directory from its checkpoint."""
    from circuitctl import distributed

    timings: dict[str, float] = {}
    started = time.perf_counter()
    # Validate cheap things (task files, model path, output dir) before loading anything heavy.
    read_task_source(config, config_dir)
    check_model_source(config, config_dir)
    config = cap_batch_size(config)
    run_dir = Path(config.output.dir) if config.output.dir else default_run_dir(config)
    distributed.init_from_env(config.model.device)
    if resume is not None:
        if distributed.world_size() > 1:
            raise UsageError("--resume is not supported under torchrun; resume on one process")
        with RunLock(resume, "--resume"), staged_writes(resume):  # one process at a time; results land together
            return _discover_with_notes(check_resumable(resume, config), config, config_dir, timings, started, resume=True)
    if distributed.world_size() > 1:
        return _discover_on_ranks(run_dir, config, config_dir, force, timings, started)
    existed = run_dir.exists()
    try:
        with RunLock(run_dir, "output.dir"), staged_writes(run_dir):  # one process at a time; results land together
            run_dir = prepare_run_dir(run_dir, force)
            return _discover_with_notes(run_dir, config, config_dir, timings, started)
    except BaseException:
        if not existed:  # a failed run leaves no empty run directory behind
            remove_if_empty(run_dir)
        raise


def cap_batch_size(config: RunConfig) -> RunConfig:
    """Apply `max_batch_size` to the method's batch size, for every path (config.yaml records it)."""
    if config.batch_size == config.method.batch_size:
        return config
    return config.model_copy(update={"method": config.method.model_copy(update={"batch_size": config.batch_size})})


def check_resumable(run_dir: Path, config: RunConfig) -> Path:
    """The run directory of an interrupted run with a checkpoint written by this same config."""
    from circuitctl.checkpoint import Checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--resume: '{run_dir}' is not a directory")
    checkpoint = Checkpoint(run_dir, config_hash(config))
    if not checkpoint.exists:
        finished = " (it holds a finished run)" if (run_dir / "circuit.json").exists() else ""
        raise UsageError(f"--resume: '{run_dir}' has no checkpoint to resume{finished}")
    checkpoint.check()
    return run_dir


def _discover_with_notes(
    run_dir: Path, config: RunConfig, config_dir: Path | None, timings: dict[str, float], started: float, resume: bool = False
) -> DiscoverySummary:
    """`_discover_into`, with the resource notes raised on the way (e.g. a batch halved after an
    out-of-memory error) added to the summary's notes for the CLI to print."""
    from circuitctl.batching import collect_notes

    with collect_notes() as notes:
        summary = _discover_into(run_dir, config, config_dir, timings, started, resume)
    summary.notes = notes + list(summary.notes)
    return summary


def _discover_on_ranks(
    run_dir: Path, config: RunConfig, config_dir: Path | None, force: bool, timings: dict[str, float], started: float
) -> DiscoverySummary:
    """torchrun: the main rank prepares and writes the run directory; the other ranks run the
    same computation (every sum is all-reduced, so they must) into a scratch directory that is
    removed afterwards, and return the same summary without files."""
    from circuitctl import distributed

    run_dir = Path(distributed.broadcast_from_main(str(run_dir)))  # one name, even for default time-stamped ones
    existed = run_dir.exists()
    error = None
    if distributed.is_main():
        try:
            prepare_run_dir(run_dir, force)
        except UsageError as exc:
            error = exc
    message = distributed.broadcast_from_main(str(error) if error else None)
    if message is not None:  # every rank stops with the main rank's message
        raise error or UsageError(message)
    if distributed.is_main():
        try:
            return _discover_with_notes(run_dir, config, config_dir, timings, started)
        except BaseException:
            if not existed:
                remove_if_empty(run_dir)
            raise
    with tempfile.TemporaryDirectory(prefix=f"circuitctl-rank{distributed.rank()}-") as scratch:
        summary = _discover_with_notes(Path(scratch), config, config_dir, timings, started)
    return replace(summary, run_dir=run_dir, files=[])


def _discover_into(
    run_dir: Path, config: RunConfig, config_dir: Path | None, timings: dict[str, float], started: float, resume: bool = False
) -> DiscoverySummary:
    from circuitctl.checkpoint import Checkpoint
    from circuitctl.methods.base import DiscoveryContext, run_method

    session = open_session(config, config_dir)
    session.task_signal = check_task_signal(session, config)  # refuses a task without signal before the method runs
    timings["load"] = time.perf_counter() - started
    checkpoint = Checkpoint(run_dir, config_hash(config))
    context = DiscoveryContext(
        session.adapter, session.data, session.metric, config.ablation, config.seed, run_dir, checkpoint, resume, config_dir, config.cache_gib
    )
    t0 = time.perf_counter()
    result = run_method(context, config.method)
    timings["discovery"] = time.perf_counter() - t0
    summary = finish(run_dir, config, session, result, timings, started)
    checkpoint.clear()  # the run is complete: nothing to resume
    return summary


# ----------------------------------------------------------------------------------------------
# select -> evaluate -> write -> draw
# ----------------------------------------------------------------------------------------------
def finish(run_dir: Path, config: RunConfig, session, result, timings: dict[str, float], started: float) -> DiscoverySummary:
    """Select, evaluate, write and draw the circuit(s) of a finished method run."""
    from circuitctl.circuits.edges import EdgeSpace
    from circuitctl.circuits.evaluator import CircuitEvaluator
    from circuitctl.circuits.selection import ignored_rule_note, select

    space = result.space if result.space is not None else EdgeSpace(session.adapter.graph)
    method = config.method.name
    points = result.sweep or [result]
    circuits = []
    for point in points:
        check_scores(point.scores, space, method)
        scores = point.scores.float().cpu()
        membership, chosen_by = select(scores, space, config.selection, point.membership, method)
        label = getattr(point, "label", None)
        params = getattr(point, "params", {})
        circuits.append(_Circuit(label, params, scores, membership, chosen_by, point.forward_passes, point.extra))

    t0 = time.perf_counter()
    evaluator = CircuitEvaluator(space, session.adapter, session.data, session.metric, config.ablation, config.method.batch_size, config.cache_gib)
    m_full, m_empty = evaluator.full_and_empty()
    import torch

    values = evaluator.circuit_values(torch.stack([c.membership for c in circuits])).tolist()
    for circuit, value in zip(circuits, values):
        circuit.m_circuit = value
    timings["evaluation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_plain(), sort_keys=False))
    files, notes, rows = ["config.yaml"], [], []
    for circuit in circuits:
        out = run_dir / circuit.label if circuit.label else run_dir
        out.mkdir(exist_ok=True)
        written, note = write_circuit(out, config, session, space, circuit, m_full, m_empty, timings)
        notes.append(note)
        if circuit.label:
            rows.append(_sweep_row(circuit, space, m_full, m_empty))
        else:
            files += written
    if result.sweep:
        from circuitctl.io.files import write_json

        write_json(run_dir / "sweep.json", {"method": method, "metric_full": m_full, "metric_empty": m_empty, "points": rows})
        files += ["sweep.json"] + [f"{row['label']}/" for row in rows]
    files += write_method_files(run_dir, result.files)
    commit_staged()  # the results are whole: put them in place before the steps that read them
    explained, explain_notes = explain_step(run_dir, config, session, timings)  # after sweep.json: a sweep's circuits read it
    files, notes = files + explained, notes + explain_notes
    commit_staged()  # the page embeds the explanation: it reads explanation.json back
    rule_note = ignored_rule_note(config.selection, method) if any(p.membership is not None for p in points) else None
    from circuitctl.metrics.faithfulness import normalized_faithfulness, undefined_reason

    page_files, page_notes = write_viewer_pages(run_dir, [circuit.label for circuit in circuits])
    files += page_files
    notes += page_notes
    first = circuits[0]
    return DiscoverySummary(
        run_dir=run_dir,
        method=method,
        unit=space.unit,
        n_total=space.n_total,
        n_in_circuit=int(first.membership.sum()),
        n_nodes_in_circuit=len(space.nodes_in(first.membership)),
        faithfulness=normalized_faithfulness(first.m_circuit, m_full, m_empty),
        m_full=m_full,
        m_empty=m_empty,
        m_circuit=first.m_circuit,
        chosen_by=first.chosen_by,
        seconds=timings,
        files=files,
        notes=[n for n in (rule_note, undefined_reason(m_full, m_empty)) if n] + sorted(set(notes)),
        sweep=rows,
    )


def explain_step(run_dir: Path, config: RunConfig, session, timings: dict[str, float]) -> tuple[list[str], list[str]]:
    """`explain: true`: explain the circuit(s) just written (explanation.json/.md, labels in
    circuit.dot, circuit.grouped.dot) on the main rank. A failure here never fails the finished
    discovery: it becomes a note. Returns (files written, relative to run_dir; notes)."""
    from circuitctl import distributed
    from circuitctl.explain.report import remove_explanations

    if not distributed.is_main():
        return [], []
    remove_explanations(run_dir)  # a --force rerun: an earlier run's explanation describes another circuit
    if not config.explain:
        return [], []
    t0 = time.perf_counter()
    try:
        from circuitctl.explain.pipeline import explain_discovered

        files, notes = explain_discovered(run_dir, session, config)
    except Exception as exc:  # noqa: BLE001 - the circuit is written; the explanation is extra
        files, notes = [], [f"the circuit was not explained ({type(exc).__name__}: {exc}); rerun `circuitctl explain {run_dir} --force`"]
    timings["explain"] = time.perf_counter() - t0
    return [f for f in files if "/" not in f], notes  # a sweep's files are listed by their directories


def write_circuit(out: Path, config: RunConfig, session, space, circuit: _Circuit, m_full: float, m_empty: float, timings) -> tuple[list[str], str]:
    """circuit.json, circuit.mib.json (where the format has such circuits), circuit.dot (+ .svg)."""
    from circuitctl.circuits.record import circuit_record, write_circuit_file
    from circuitctl.io.files import write_json
    from circuitctl.io.graphviz import write_drawing
    from circuitctl.metrics.faithfulness import format_f, normalized_faithfulness, undefined_reason

    faithfulness = normalized_faithfulness(circuit.m_circuit, m_full, m_empty)
    n_in = int(circuit.membership.sum())
    results = {
        f"n_{space.unit}_total": space.n_total,
        f"n_{space.unit}_in_circuit": n_in,
        "metric_full": m_full,
        "metric_empty": m_empty,
        "metric_circuit": circuit.m_circuit,
        "faithfulness": faithfulness,
        "forward_passes": circuit.forward_passes,
        **({"sweep": circuit.params} if circuit.label else {}),
        **circuit.extra,
        "unit": space.unit,
        "chosen_by": circuit.chosen_by,
    }
    reason = undefined_reason(m_full, m_empty)
    if reason:
        results["faithfulness_undefined"] = reason
    adapter = session.adapter
    body = space.entries(circuit.scores, circuit.membership)
    record = circuit_record(run_provenance(config, session, timings, results), adapter.graph.spec.to_dict(), space.info(), body)
    write_circuit_file(out / "circuit.json", record)
    files = ["circuit.json"]
    mib = space.mib(circuit.scores, circuit.membership, adapter.cfg.d_model)
    if mib is not None:
        write_json(out / "circuit.mib.json", mib)
        files.append("circuit.mib.json")
    label = f" {circuit.label}" if circuit.label else ""
    title = f"{session.task.spec.name} | {config.method.name}{label} | {n_in} {space.unit} | f = {format_f(faithfulness, 3)}"
    svg, note = write_drawing(out / "circuit.dot", space.dot(circuit.scores, circuit.membership, title))
    files += ["circuit.dot"] + (["circuit.svg"] if svg else [])
    return files, note


def write_viewer_pages(run_dir: Path, labels: list[str | None]) -> tuple[list[str], list[str]]:
    """circuit.html (the interactive viewer) beside every circuit written: run_dir, or each sweep
    point's run_dir/<label>. Runs last, so the page shows every file written before it. Returns
    (files written, notes); a viewer problem is a note, never a failed run."""
    from circuitctl.viewer import refresh_viewer

    files, notes = [], []
    for label in labels:
        page, problem = refresh_viewer(run_dir / label if label else run_dir)
        if page is not None:
            files.append(f"{label}/{page.name}" if label else page.name)
        if problem:
            notes.append(problem)
    return files, notes


def _sweep_row(circuit: _Circuit, space, m_full: float, m_empty: float) -> dict:
    from circuitctl.metrics.faithfulness import normalized_faithfulness

    return {
        "label": circuit.label,
        **circuit.params,
        "n_in_circuit": int(circuit.membership.sum()),
        "n_nodes_in_circuit": len(space.nodes_in(circuit.membership)),
        "metric_circuit": circuit.m_circuit,
        "faithfulness": normalized_faithfulness(circuit.m_circuit, m_full, m_empty),
    }


def write_method_files(run_dir: Path, method_files: dict) -> list[str]:
    """Write a method's extra files (`DiscoveryResult.files`); returns their names."""
    from circuitctl.io.files import write_json
    from circuitctl.io.graphviz import write_drawing

    written = []
    for name, content in method_files.items():
        path = run_dir / name
        if name.endswith(".dot"):
            svg, _ = write_drawing(path, content)
            written += [name] + ([svg.name] if svg else [])
            continue
        if isinstance(content, (dict, list)):
            write_json(path, content)
        else:
            write_atomic(path, content)
        written.append(name)
    return written


def check_scores(scores, space, method: str) -> None:
    """A method's scores must be finite and shaped like its space: NaN would make circuit.json invalid JSON."""
    import torch

    if tuple(scores.shape) != tuple(space.mask.shape):
        raise RuntimeError(f"method '{method}' returned scores of shape {tuple(scores.shape)}, expected {tuple(space.mask.shape)}")
    bad = ~torch.isfinite(scores.float().cpu()) & space.mask
    if bool(bad.any()):
        example = space.unit_names()[int(bad[space.mask].nonzero()[0])]
        raise UsageError(
            f"method '{method}' produced {int(bad.sum())} NaN or infinite {space.unit.removesuffix('s')} scores (e.g. {example}); "
            "the model's activations or gradients overflow: check the weights, or use model.dtype: float32"
        )


def run_provenance(config: RunConfig, session, timings: dict[str, float], results: dict) -> dict:
    """What every circuit file records: model, task, method, config and its hash, versions, seed, timings, results."""
    from circuitctl.versions import library_versions

    adapter = session.adapter
    model_info = {"name": config.model.name, "path": config.model.path, **adapter.describe()}
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_info,
        "task": {
            "name": session.task.spec.name,
            "version": session.task.spec.version,
            "origin": session.task.origin,
            "n_pairs": session.data.n,
        },
        "task_signal": session.task_signal,
        "method": config.method.model_dump(mode="json"),
        "metric": config.metric,
        "ablation": config.ablation.model_dump(mode="json"),
        "selection": config.selection.model_dump(mode="json"),
        "seed": config.seed,
        "config": config.to_plain(),
        "config_hash": config_hash(config),
        "library_versions": library_versions(),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "results": results,
    }
