"""`evaluate faithfulness`: f(C), completeness and the MIB curve (CPR / CMD) for a circuit file."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from circuitctl.config.schema import RunConfig
from circuitctl.report import FaithfulnessReport, faithfulness_report, plot_curve, report_targets, write_report
from circuitctl.session import open_session

__all__ = ["FaithfulnessReport", "evaluate_faithfulness"]


def evaluate_faithfulness(
    circuit_path: Path,
    config: RunConfig,
    config_dir: Path | None,
    out_dir: Path,
    force: bool = False,
    known_edges: list[str] | None = None,
    batch_size: int | None = None,
) -> tuple[FaithfulnessReport, list[Path]]:
    from circuitctl.io.feature_circuit import is_feature_circuit

    if is_feature_circuit(circuit_path):  # SAE feature circuits: nodes mean-ablated, curve over node thresholds
        from circuitctl.errors import UsageError
        from circuitctl.sae.evaluate import evaluate_feature_circuit

        if known_edges is not None:
            raise UsageError("--known lists edges of the head/MLP graph; it does not apply to a feature circuit")
        return evaluate_feature_circuit(circuit_path, config, config_dir, out_dir, force, batch_size)
    from circuitctl.io.circuit_file import unit_circuit_record

    unit_record = unit_circuit_record(circuit_path)
    if unit_record is not None:  # node, neuron or per-position circuits: their units are ablated
        from circuitctl.unit_circuits import evaluate_circuit

        return evaluate_circuit(circuit_path, unit_record, config, config_dir, out_dir, force, known_edges, batch_size)
    targets = report_targets(out_dir, force)
    session = open_session(config, config_dir)

    from circuitctl.io.circuit_file import read_circuit
    from circuitctl.patching.engine import PatchingEngine

    graph = session.adapter.graph
    loaded = read_circuit(circuit_path, graph)
    engine = PatchingEngine(
        session.adapter, session.data, session.metric, config.ablation, batch_size or config.method.batch_size, keep_cache=True
    )
    circuit = loaded.membership & graph.edge_mask
    known = None
    if known_edges is not None:
        from circuitctl.metrics.faithfulness import against_known

        names = graph.edge_names()
        scores = [float(loaded.scores[graph.edge_index(e)]) for e in names]
        known = against_known(known_edges, names, scores, set(graph.mask_to_edges(circuit)))
    report = faithfulness_report(
        circuit_path, config, engine, session.data.n, graph.edge_mask, graph.n_edges, loaded.scores, circuit, "evaluating circuits", known
    )
    write_report(targets, asdict(report), plot_curve(report))
    return report, targets
