"""`discover`: config -> circuit files in a run directory. Returns a summary; never prints."""

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
from circuitctl.io.files import prepare_run_dir, remove_if_empty, write_atomic
from circuitctl.session import check_model_source, open_session, read_task_source


@dataclass
class DiscoverySummary:
    run_dir: Path
    method: str
    n_edges_total: int
    n_edges_in_circuit: int
    n_nodes_in_circuit: int
    faithfulness: float
    m_full: float
    m_empty: float
    m_circuit: float
    seconds: dict[str, float]
    files: list[str]
    notes: list[str] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)  # one row per circuit of a sweep (e.g. ACDC's taus)


def default_run_dir(config: RunConfig) -> Path:
    task = config.task.name or Path(config.task.path or "task").stem
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{task}-{config.method.name}-{stamp}"


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
        return _discover_with_notes(check_resumable(resume, config), config, config_dir, timings, started, resume=True)
    if distributed.world_size() > 1:
        return _discover_on_ranks(run_dir, config, config_dir, force, timings, started)
    existed = run_dir.exists()
    run_dir = prepare_run_dir(run_dir, force)
    try:
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
    session = open_session(config, config_dir)
    timings["load"] = time.perf_counter() - started
    from circuitctl.config.methods import SfcSettings

    if isinstance(config.method, SfcSettings):  # SAE feature circuits: their own nodes, evaluation and files
        from circuitctl.sae.pipeline import discover_features

        return discover_features(run_dir, config, config_dir, session, timings, started)

    from circuitctl.checkpoint import Checkpoint
    from circuitctl.methods.base import DiscoveryContext, run_method

    adapter = session.adapter
    checkpoint = Checkpoint(run_dir, config_hash(config))
    context = DiscoveryContext(adapter, session.data, session.metric, config.ablation, config.seed, run_dir, checkpoint, resume)
    t0 = time.perf_counter()
    result = run_method(context, config.method)
    timings["discovery"] = time.perf_counter() - t0
    summary = _write_results(run_dir, config, session, context, result, timings, started)
    checkpoint.clear()  # the run is complete: nothing to resume
    return summary


def _write_results(run_dir: Path, config: RunConfig, session, context, result, timings: dict[str, float], started: float) -> DiscoverySummary:
    """Select, evaluate and write the circuit(s) of a finished method run."""
    from circuitctl.graph.selection import nodes_in, select
    from circuitctl.io.circuit_file import write_circuit, write_mib
    from circuitctl.io.graphviz import to_dot, write_drawing
    from circuitctl.metrics.faithfulness import normalized_faithfulness

    adapter, graph = session.adapter, session.adapter.graph
    if "units" in result.extra:  # node, neuron or per-position circuits: their own selection, evaluation and files
        from circuitctl.unit_circuits import finish_discovery

        write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_plain(), sort_keys=False))
        return finish_discovery(run_dir, config, session, result, timings, started)
    check_result(result, graph, config.method.name)
    if result.sweep:  # one circuit per sweep point, each in its own subdirectory
        return write_sweep(run_dir, config, session, context, result, timings, started)

    membership = select(result.scores, graph, config.selection, result.membership)
    t0 = time.perf_counter()
    engine = context.engine(config.method.batch_size, keep_cache=True)
    m_full, m_empty = engine.full_and_empty()
    m_circuit = float(engine.circuit_values(membership[None])[0])
    faithfulness = normalized_faithfulness(m_circuit, m_full, m_empty)
    timings["evaluation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    results = {
        "n_edges_total": graph.n_edges,
        "n_edges_in_circuit": int(membership.sum()),
        "metric_full": m_full,
        "metric_empty": m_empty,
        "metric_circuit": m_circuit,
        "faithfulness": faithfulness,
        "forward_passes": result.forward_passes,
        **result.extra,
    }
    provenance = run_provenance(config, session, timings, results)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_plain(), sort_keys=False))
    write_circuit(run_dir / "circuit.json", graph, result.scores, membership, provenance)
    write_mib(run_dir / "circuit.mib.json", graph, result.scores, membership, adapter.cfg.d_model)
    title = f"{session.task.spec.name} | {config.method.name} | {int(membership.sum())} edges | f = {faithfulness:.3f}"
    svg, note = write_drawing(run_dir / "circuit.dot", to_dot(graph, result.scores, membership, title))
    files = ["config.yaml", "circuit.json", "circuit.mib.json", "circuit.dot"] + (["circuit.svg"] if svg else [])
    files += write_method_files(run_dir, result.files)
    return DiscoverySummary(
        run_dir=run_dir,
        method=config.method.name,
        n_edges_total=graph.n_edges,
        n_edges_in_circuit=int(membership.sum()),
        n_nodes_in_circuit=len(nodes_in(membership, graph)),
        faithfulness=faithfulness,
        m_full=m_full,
        m_empty=m_empty,
        m_circuit=m_circuit,
        seconds=timings,
        files=files,
        notes=[note],
    )


def write_sweep(run_dir: Path, config: RunConfig, session, context, result, timings: dict[str, float], started: float) -> DiscoverySummary:
    """A sweep's circuits: RUN_DIR/<label>/circuit.json, circuit.mib.json, circuit.dot (.svg) per
    point, plus config.yaml and sweep.json (edges kept and faithfulness per point) at the top."""
    import torch

    from circuitctl.graph.selection import nodes_in, select
    from circuitctl.io.circuit_file import write_circuit, write_mib
    from circuitctl.io.files import write_json
    from circuitctl.io.graphviz import to_dot, write_drawing
    from circuitctl.metrics.faithfulness import normalized_faithfulness

    graph = session.adapter.graph
    t0 = time.perf_counter()
    memberships = [select(p.scores, graph, config.selection, p.membership) for p in result.sweep]
    engine = context.engine(config.method.batch_size, keep_cache=True)
    m_full, m_empty = engine.full_and_empty()
    m_circuits = engine.circuit_values(torch.stack(memberships)).tolist()
    timings["evaluation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_plain(), sort_keys=False))
    rows, notes = [], []
    for point, membership, m_circuit in zip(result.sweep, memberships, m_circuits):
        faithfulness = normalized_faithfulness(m_circuit, m_full, m_empty)
        n_edges = int(membership.sum())
        results = {
            "n_edges_total": graph.n_edges,
            "n_edges_in_circuit": n_edges,
            "metric_full": m_full,
            "metric_empty": m_empty,
            "metric_circuit": m_circuit,
            "faithfulness": faithfulness,
            "forward_passes": point.forward_passes,
            "sweep": point.params,
            **point.extra,
        }
        out = run_dir / point.label
        out.mkdir(exist_ok=True)
        write_circuit(out / "circuit.json", graph, point.scores, membership, run_provenance(config, session, timings, results))
        write_mib(out / "circuit.mib.json", graph, point.scores, membership, session.adapter.cfg.d_model)
        title = f"{session.task.spec.name} | {config.method.name} {point.label} | {n_edges} edges | f = {faithfulness:.3f}"
        _, note = write_drawing(out / "circuit.dot", to_dot(graph, point.scores, membership, title))
        notes.append(note)
        rows.append(
            {
                "label": point.label,
                **point.params,
                "n_edges_in_circuit": n_edges,
                "n_nodes_in_circuit": len(nodes_in(membership, graph)),
                "metric_circuit": m_circuit,
                "faithfulness": faithfulness,
            }
        )
    write_json(run_dir / "sweep.json", {"method": config.method.name, "metric_full": m_full, "metric_empty": m_empty, "points": rows})
    first = rows[0]
    return DiscoverySummary(
        run_dir=run_dir,
        method=config.method.name,
        n_edges_total=graph.n_edges,
        n_edges_in_circuit=first["n_edges_in_circuit"],
        n_nodes_in_circuit=first["n_nodes_in_circuit"],
        faithfulness=first["faithfulness"],
        m_full=m_full,
        m_empty=m_empty,
        m_circuit=first["metric_circuit"],
        seconds=timings,
        files=["config.yaml", "sweep.json"] + [f"{row['label']}/" for row in rows] + write_method_files(run_dir, result.files),
        notes=sorted(set(notes)),
        sweep=rows,
    )


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


def check_result(result, graph, method: str) -> None:
    """A method's scores must be a finite [U, V] tensor: NaN would make circuit.json invalid JSON."""
    import torch

    shape = (graph.n_upstream, graph.n_downstream)
    if tuple(result.scores.shape) != shape:
        raise RuntimeError(f"method '{method}' returned scores of shape {tuple(result.scores.shape)}, expected {shape}")
    bad = ~torch.isfinite(result.scores) & graph.edge_mask.to(result.scores.device)
    if bool(bad.any()):
        u, v = bad.nonzero()[0].tolist()
        raise UsageError(
            f"method '{method}' produced {int(bad.sum())} NaN or infinite edge scores (e.g. {graph.edge_name(u, v)}); "
            "the model's activations or gradients overflow: check the weights, or use model.dtype: float32"
        )


def run_provenance(config: RunConfig, session, timings: dict[str, float], results: dict) -> dict:
    """What every circuit file records: model, task, method, config and its hash, versions, seed, timings, results."""
    from circuitctl.io.circuit_file import library_versions

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
