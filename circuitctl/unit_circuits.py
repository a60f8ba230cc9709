"""Node, neuron and per-position circuits through `discover` and `evaluate faithfulness`.

A method that scores such units records ``extra["units"] = {"granularity", "positions"}``;
the runner hands the result here. Selection follows the run config's `selection` section
(top_n / threshold / fraction of the units, by |score| unless ``absolute: false``; tree-shaking
applies to per-position edge circuits), faithfulness ablates every unit outside the circuit,
and the circuit file records the units (``granularity``, ``positions``, ``nodes``, ``neurons``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from circuitctl.config.schema import SelectionConfig
from circuitctl.graph.selection import DEFAULT_TOP_N
from circuitctl.graph.units import view_for
from circuitctl.metrics.faithfulness import normalized_faithfulness, top_edges


def select_units(scores: torch.Tensor, view, selection: SelectionConfig) -> torch.Tensor:
    """Bool membership over the view's units (same rules as edge selection)."""
    mask = view.mask
    if selection.threshold is not None:
        key = scores.abs() if selection.absolute else scores
        membership = (key >= selection.threshold) & mask
    else:
        if selection.fraction is not None:
            k = math.ceil(selection.fraction * view.n_total)
        else:
            k = selection.top_n or DEFAULT_TOP_N
        membership = top_edges(scores, mask, min(k, view.n_total), selection.absolute)
    return view.prune(membership) if selection.prune else membership


def _evaluator(view, session, config, batch_size: int):
    from circuitctl.patching.units import UnitEvaluator

    return UnitEvaluator(view, session.adapter, session.data, session.metric, config.ablation, batch_size)


def finish_discovery(run_dir: Path, config, session, result, timings: dict, started: float):
    """Select, evaluate and write a unit circuit; returns the runner's DiscoverySummary."""
    from circuitctl.io.circuit_file import write_unit_circuit, write_unit_mib
    from circuitctl.io.graphviz import write_drawing
    from circuitctl.io.unit_drawing import unit_dot
    from circuitctl.runner import DiscoverySummary, run_provenance, write_method_files

    adapter = session.adapter
    view = view_for(result.extra["units"], adapter, session.data)
    scores = result.scores.float().cpu()
    if tuple(scores.shape) != tuple(view.mask.shape):
        raise RuntimeError(f"method '{config.method.name}' returned scores of shape {tuple(scores.shape)}, expected {tuple(view.mask.shape)}")
    if not bool(torch.isfinite(scores[view.mask]).all()):
        from circuitctl.errors import UsageError

        raise UsageError(
            f"method '{config.method.name}' produced NaN or infinite {view.unit} scores; the model's activations or "
            "gradients overflow: check the weights, or use model.dtype: float32"
        )
    if config.selection.is_default and result.membership is not None:  # the method's own circuit (subnetwork probing)
        membership = result.membership.cpu() & view.mask
    else:
        membership = select_units(scores, view, config.selection)
    t0 = time.perf_counter()
    evaluator = _evaluator(view, session, config, config.method.batch_size)
    m_full, m_empty = evaluator.full_and_empty()
    m_circuit = float(evaluator.circuit_values(membership[None])[0])
    faithfulness = normalized_faithfulness(m_circuit, m_full, m_empty)
    timings["evaluation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    n_in = int(membership.sum())
    results = {
        "unit": view.unit,
        f"n_{view.unit}_total": view.n_total,
        f"n_{view.unit}_in_circuit": n_in,
        "metric_full": m_full,
        "metric_empty": m_empty,
        "metric_circuit": m_circuit,
        "faithfulness": faithfulness,
        "forward_passes": result.forward_passes,
        **result.extra,
    }
    provenance = run_provenance(config, session, timings, results)
    write_unit_circuit(run_dir / "circuit.json", adapter.graph, view, scores, membership, provenance)
    files = ["config.yaml", "circuit.json"]
    if write_unit_mib(run_dir / "circuit.mib.json", adapter.graph, view, scores, membership, adapter.cfg.d_model):
        files.append("circuit.mib.json")
    title = f"{session.task.spec.name} | {config.method.name} | {n_in} {view.unit} | f = {faithfulness:.3f}"
    svg, note = write_drawing(run_dir / "circuit.dot", unit_dot(view, scores, membership, title))
    files += ["circuit.dot"] + (["circuit.svg"] if svg else [])
    files += write_method_files(run_dir, result.files)
    return DiscoverySummary(
        run_dir=run_dir,
        method=config.method.name,
        n_edges_total=view.n_total,
        n_edges_in_circuit=n_in,
        n_nodes_in_circuit=len(view.nodes_in(membership)),
        faithfulness=faithfulness,
        m_full=m_full,
        m_empty=m_empty,
        m_circuit=m_circuit,
        seconds=timings,
        files=files,
        notes=[f"{view.kind.replace('_', ' ')} circuit: the counts are {view.unit}", note],
    )


def evaluate_circuit(circuit_path: Path, record: dict, config, config_dir, out_dir: Path, force: bool, known, batch_size):
    """`evaluate faithfulness` for a unit circuit file: f(C), completeness and the curve over units."""
    from circuitctl.metrics.faithfulness import against_known
    from circuitctl.report import faithfulness_report, plot_curve, report_targets, write_report
    from circuitctl.session import open_session

    targets = report_targets(out_dir, force)
    session = open_session(config, config_dir)
    view = view_for(record, session.adapter, session.data)
    scores, membership = view.read(record, str(circuit_path))
    evaluator = _evaluator(view, session, config, batch_size or config.method.batch_size)
    circuit = membership & view.mask
    known_report = None
    if known is not None:
        names, flat_scores, flat_member = _unit_names(view, scores, circuit)
        known_report = against_known(known, names, flat_scores, {nm for nm, m in zip(names, flat_member) if m})
    report = faithfulness_report(
        circuit_path, config, evaluator, session.data.n, view.mask, view.n_total, scores, circuit, f"evaluating {view.unit} circuits", known_report
    )
    write_report(targets, {**asdict(report), "unit": view.unit, "granularity": record.get("granularity")}, plot_curve(report))
    return report, targets


def _unit_names(view, scores: torch.Tensor, membership: torch.Tensor):
    """(names, scores, membership) of every unit of a view, for precision/recall/ROC AUC."""
    from circuitctl.graph.units import neuron_name

    names, flat_scores, flat_member = [], [], []
    for index in view.mask.nonzero().tolist():
        if view.kind == "node":
            name = view.graph.upstream[index[0]]
        elif view.kind == "neuron":
            name = neuron_name(*index)
        elif view.kind == "positional_node":
            name = view.pgraph.upstream_name(*index)
        else:
            name = view.pgraph.edge_name(*index)
        names.append(name)
        flat_scores.append(float(scores[tuple(index)]))
        flat_member.append(bool(membership[tuple(index)]))
    return names, flat_scores, flat_member
