"""`discover` for sparse feature circuits: SAEs -> feature circuit -> files in the run directory.

Called by `circuitctl.runner` for methods whose circuits are made of SAE features (`sfc`), whose
nodes, evaluation and files differ from the edge-level graph's.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from circuitctl.config.schema import RunConfig
from circuitctl.io.files import write_atomic


def discover_features(run_dir: Path, config: RunConfig, config_dir: Path | None, session, timings: dict[str, float], started: float):
    from circuitctl.io.feature_circuit import to_dot, write_feature_circuit
    from circuitctl.io.graphviz import write_drawing
    from circuitctl.methods.base import DiscoveryContext
    from circuitctl.methods.sfc import find_feature_circuit
    from circuitctl.models.sae_sites import SiteRunner
    from circuitctl.runner import DiscoverySummary, run_provenance
    from circuitctl.sae.evaluate import FeatureAblator, measure_circuit
    from circuitctl.sae.loading import resolve_saes

    adapter, settings = session.adapter, config.method
    found = resolve_saes(settings.saes, config_dir, adapter.model, adapter.device)
    saes = {site: sae for site, (sae, _) in found.items()}
    timings["load"] = time.perf_counter() - started

    context = DiscoveryContext(adapter, session.data, session.metric, config.ablation, config.seed, run_dir)
    t0 = time.perf_counter()
    circuit = find_feature_circuit(context, settings, saes, {site: source for site, (_, source) in found.items()})
    timings["discovery"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ablator = FeatureAblator(SiteRunner(adapter.model, saes), saes, session.data, session.metric, settings.batch_size, config.ablation.per_position)
    measured = measure_circuit(ablator, circuit, with_curve=False)
    timings["evaluation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    results = {
        "n_nodes_in_circuit": len(circuit.circuit_nodes),
        "n_features_in_circuit": circuit.n_features,
        "n_error_nodes_in_circuit": circuit.n_errors,
        "n_edges_scored": len(circuit.edges),
        "n_edges_in_circuit": len(circuit.circuit_edges),
        "evaluation_ablation": "mean",
        **{key: value for key, value in measured.items() if not key.startswith("curve")},
        "forward_passes": circuit.stats.get("forward_passes"),
    }
    provenance = run_provenance(config, session, timings, results)
    del provenance["selection"]  # feature circuits are selected by the method's own thresholds
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_plain(), sort_keys=False))
    write_feature_circuit(run_dir / "circuit.json", circuit, provenance)
    title = (
        f"{session.task.spec.name} | sfc | {len(circuit.circuit_nodes)} nodes, {len(circuit.circuit_edges)} edges"
        f" | f = {measured['faithfulness']:.3f}"
    )
    svg, note = write_drawing(run_dir / "circuit.dot", to_dot(circuit, title))
    files = ["config.yaml", "circuit.json", "circuit.dot"] + (["circuit.svg"] if svg else [])
    return DiscoverySummary(
        run_dir=run_dir,
        method=settings.name,
        n_edges_total=len(circuit.edges),
        n_edges_in_circuit=len(circuit.circuit_edges),
        n_nodes_in_circuit=len(circuit.circuit_nodes),
        faithfulness=measured["faithfulness"],
        m_full=measured["metric_full"],
        m_empty=measured["metric_empty"],
        m_circuit=measured["metric_circuit"],
        seconds=timings,
        files=files,
        notes=[note, f"feature circuit: {circuit.n_features} features + {circuit.n_errors} error nodes; "
               f"completeness f(complement) = {measured['completeness']:.3f} (mean ablation)"],
    )
