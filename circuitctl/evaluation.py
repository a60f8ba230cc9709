"""`evaluate faithfulness`: f(C), completeness and the faithfulness curve of a circuit file of any kind.

The file is read once (`circuitctl.circuits.record.load_circuit_file`: ours of either schema
version, or MIB's); its ``space`` entry rebuilds the circuit space for the config's model and
task, and the one evaluator and report builder do the rest.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from circuitctl.config.schema import RunConfig
from circuitctl.report import FaithfulnessReport, faithfulness_report, plot_curve, report_targets, write_report

__all__ = ["FaithfulnessReport", "evaluate_faithfulness"]


def evaluate_faithfulness(
    circuit_path: Path,
    config: RunConfig,
    config_dir: Path | None,
    out_dir: Path,
    force: bool = False,
    known: list[str] | None = None,
    curve_rule: str = "mib",
    n_resamples: int = 1000,
) -> tuple[FaithfulnessReport, list[Path]]:
    """Evaluate a circuit file and write faithfulness.json and its curve (PNG) to `out_dir`;
    `n_resamples` bootstrap resamples of the examples give the confidence intervals (0: none)."""
    from circuitctl.circuits import space_for
    from circuitctl.circuits.evaluator import CircuitEvaluator
    from circuitctl.circuits.record import load_circuit_file
    from circuitctl.session import open_session

    loaded = load_circuit_file(circuit_path)
    targets = report_targets(out_dir, force)
    session = open_session(config, config_dir)
    check_graph(loaded, session.adapter.graph)
    space = space_for(loaded.record["space"], session.adapter, session.data)
    scores, membership = space.read(loaded.record, loaded.origin)
    evaluator = CircuitEvaluator(
        space, session.adapter, session.data, session.metric, config.ablation, config.batch_size, config.cache_gib
    )
    known_report = against_known_units(known, space, scores, membership) if known is not None else None
    report = faithfulness_report(circuit_path, config, evaluator, scores, membership, known_report, curve_rule, n_resamples)
    write_report(targets, asdict(report), plot_curve(report))
    return report, targets + refresh_viewer_beside(circuit_path, out_dir)


def refresh_viewer_beside(circuit_path: Path, out_dir: Path) -> list[Path]:
    """Rewrite the run directory's circuit.html when the report was written beside its
    circuit.json, so the page shows the curve; returns the page written. A viewer problem is a
    note (`circuitctl.batching.note`), never a failed evaluation."""
    from circuitctl.batching import note
    from circuitctl.circuits.record import circuit_path as circuit_file
    from circuitctl.viewer import refresh_viewer

    circuit = circuit_file(circuit_path)
    if circuit.name != "circuit.json" or circuit.parent.resolve() != Path(out_dir).resolve():
        return []
    page, problem = refresh_viewer(out_dir)
    if problem:
        note(problem)
    return [page] if page is not None else []


def check_graph(loaded, graph) -> None:
    """Refuse a circuit made for a model of another shape."""
    from circuitctl.errors import UsageError

    spec = loaded.record.get("graph") or {}
    theirs = (spec.get("n_layers"), spec.get("n_heads"))
    ours = (graph.spec.n_layers, graph.spec.n_heads)
    if None not in theirs and theirs != ours:
        raise UsageError(
            f"{loaded.origin}: the circuit was made for a model with {theirs[0]} layers x {theirs[1]} heads, "
            f"but this model has {ours[0]} x {ours[1]}"
        )


def against_known_units(known: list[str], space, scores, membership) -> dict:
    """Precision, recall and ROC AUC of the circuit's units against a list of true unit names."""
    from circuitctl.errors import UsageError
    from circuitctl.metrics.faithfulness import against_known

    names = space.unit_names()
    unknown = sorted(set(known) - set(names))
    if unknown:
        raise UsageError(f"--known names {len(unknown)} {space.unit} that this circuit's space does not have (e.g. '{unknown[0]}')")
    index = space.mask.nonzero()
    flat_scores = scores[tuple(index.T)].tolist()
    flat_member = membership[tuple(index.T)].tolist()
    return against_known(known, names, flat_scores, {n for n, m in zip(names, flat_member) if m})
