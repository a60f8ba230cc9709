"""Faithfulness and completeness of feature circuits, as in Marks et al. (2024).

The model runs with every site replaced by decode(f') + e', where f' and e' keep the clean
value of the nodes inside the circuit and take their mean over the task's prompts outside it
(mean ablation; sites are recomputed in forward order, so an ablation upstream changes the
features downstream). With m(C) the metric of circuit C:

    faithfulness f(C) = (m(C) - m(empty)) / (m(M) - m(empty)),   completeness = f(M minus C)

where M keeps every node (the model itself) and `empty` ablates every node. The curve repeats
this for circuits chosen by a range of node thresholds (by number of nodes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from circuitctl.errors import UsageError
from circuitctl.metrics.faithfulness import normalized_faithfulness
from circuitctl.models.sae_sites import SiteRunner
from circuitctl.progress import bar
from circuitctl.sae.circuit import FeatureCircuit
from circuitctl.sae.sae import SparseAutoencoder
from circuitctl.graph.naming import Site, parse_feature_node
from circuitctl.tasks.data import TaskData

Keep = dict[Site, tuple[torch.Tensor, torch.Tensor]]  # site -> (features [P, d_sae], error [P]) bool
CURVE_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class FeatureAblator:
    """Metric values of feature circuits with the nodes outside them mean-ablated."""

    def __init__(self, runner: SiteRunner, saes: dict[Site, SparseAutoencoder], data: TaskData, metric, batch_size: int, per_position: bool = True):
        from circuitctl.methods.sfc import mean_states

        self.runner, self.saes, self.data, self.metric, self.batch_size = runner, saes, data, metric, batch_size
        self.means = mean_states(runner, saes, data, batch_size, per_position)
        self.P = data.clean.shape[1]

    def keep(self, nodes, positions: list[str] | None) -> Keep:
        """Masks of the nodes to keep (node names; summed nodes cover every position)."""
        by_name = {s.name: s for s in self.saes}
        index = {label: i for i, label in enumerate(positions or [])}
        masks = {s: (torch.zeros(self.P, sae.d_sae, dtype=torch.bool), torch.zeros(self.P, dtype=torch.bool)) for s, sae in self.saes.items()}
        for name in nodes:
            node = parse_feature_node(name)
            if node.site not in by_name:
                raise UsageError(f"node '{name}': the circuit has no SAE at site {node.site}")
            features, error = masks[by_name[node.site]]
            rows = slice(None) if node.position is None else index.get(node.position)
            if rows is None:
                raise UsageError(f"node '{name}': unknown position '{node.position}' (known: {', '.join(positions or [])})")
            if node.is_error:
                error[rows] = True
            elif node.feature >= features.shape[1]:
                raise UsageError(f"node '{name}': the SAE at {node.site} has {features.shape[1]} features")
            else:
                features[rows, node.feature] = True
        return masks

    def everything(self) -> Keep:
        return {s: (torch.ones(self.P, sae.d_sae, dtype=torch.bool), torch.ones(self.P, dtype=torch.bool)) for s, sae in self.saes.items()}

    def nothing(self) -> Keep:
        return {s: (torch.zeros(self.P, sae.d_sae, dtype=torch.bool), torch.zeros(self.P, dtype=torch.bool)) for s, sae in self.saes.items()}

    @staticmethod
    def complement(keep: Keep) -> Keep:
        return {s: (~f, ~e) for s, (f, e) in keep.items()}

    def values(self, circuits: list[Keep], chunk: int = 8, advance=None) -> list[float]:
        """Mean metric over the dataset for each circuit."""
        device = self.runner.model.W_U.device
        totals = [0.0] * len(circuits)
        for batch in self.data.batches(self.batch_size):
            batch = batch.to(device)
            with torch.no_grad():
                clean_logits = self.runner.forward(batch.clean, batch.answer_positions)
                for lo in range(0, len(circuits), chunk):
                    group = circuits[lo : lo + chunk]
                    K = len(group)
                    edits = {site: self._edit(site, [c[site] for c in group], batch.n) for site in self.saes}
                    logits = self.runner.forward(batch.clean.repeat(K, 1), batch.answer_positions.repeat(K), edits)
                    for k in range(K):
                        part = logits[k * batch.n : (k + 1) * batch.n]
                        totals[lo + k] += float(self.metric(part, batch, clean_logits).sum())
            if advance:
                advance()
        return [t / self.data.n for t in totals]

    def _edit(self, site: Site, masks: list[tuple[torch.Tensor, torch.Tensor]], B: int):
        sae = self.saes[site]
        mean_f, mean_e = self.means[site]
        device = mean_f.device
        keep_f = torch.stack([m[0] for m in masks]).to(device)[:, None]  # [K, 1, P, d_sae]
        keep_e = torch.stack([m[1] for m in masks]).to(device)[:, None, :, None]  # [K, 1, P, 1]

        def edit(x: torch.Tensor) -> torch.Tensor:
            K, P = keep_f.shape[0], x.shape[1]
            f = sae.encode(x)
            e = x - sae.decode(f)
            f = torch.where(keep_f[:, :, :P], f.view(K, B, P, -1), mean_f[:, :P])
            e = torch.where(keep_e[:, :, :P], e.view(K, B, P, -1), mean_e[:, :P])
            return sae.decode(f.flatten(0, 1)) + e.flatten(0, 1)

        return edit


def curve_thresholds(circuit: FeatureCircuit) -> list[tuple[float, list[str]]]:
    """(threshold, nodes with |score| >= it) for circuits of CURVE_SIZES nodes (and all saved)."""
    ranked = sorted(circuit.nodes.items(), key=lambda item: -abs(item[1]))
    ranked = [(n, s) for n, s in ranked if s != 0.0]
    sizes = sorted({n for n in CURVE_SIZES if n < len(ranked)} | {len(ranked)})
    result = []
    for size in sizes:
        threshold = abs(ranked[size - 1][1])
        result.append((threshold, [n for n, s in ranked if abs(s) >= threshold]))
    return result


@dataclass
class FeatureFaithfulnessReport:
    circuit: str
    n_nodes_in_circuit: int
    n_features_in_circuit: int
    n_errors_in_circuit: int
    metric: str
    ablation: str
    metric_full: float
    metric_empty: float
    metric_circuit: float
    metric_complement: float
    faithfulness: float
    completeness: float
    node_threshold: float
    curve_thresholds: list[float]
    curve_n_nodes: list[int]
    curve_faithfulness: list[float]
    curve_completeness: list[float]
    provenance: dict | None = None  # the config, its hash, the seed, library versions, time

    def table_rows(self) -> list[tuple[str, str]]:
        return [
            ("nodes in circuit", f"{self.n_nodes_in_circuit} ({self.n_features_in_circuit} features, {self.n_errors_in_circuit} error nodes)"),
            ("metric full / empty", f"{self.metric_full:.4f} / {self.metric_empty:.4f}  (mean ablation)"),
            ("faithfulness f(C)", f"{self.faithfulness:.4f}"),
            ("completeness f(complement)", f"{self.completeness:.4f}"),
            ("curve (nodes: f)", ", ".join(f"{n}: {f:.3f}" for n, f in zip(self.curve_n_nodes, self.curve_faithfulness))),
        ]


def measure_circuit(ablator: FeatureAblator, circuit: FeatureCircuit, with_curve: bool = True) -> dict:
    """m(M), m(empty), m(C), m(complement) and, optionally, the threshold curve."""
    keep = ablator.keep(circuit.circuit_nodes, circuit.positions)
    circuits = [ablator.everything(), ablator.nothing(), keep, ablator.complement(keep)]
    curve = curve_thresholds(circuit) if with_curve else []
    for _, nodes in curve:
        k = ablator.keep(nodes, circuit.positions)
        circuits += [k, ablator.complement(k)]
    n_batches = -(-ablator.data.n // ablator.batch_size)
    with bar("evaluating feature circuits", n_batches) as advance:
        values = ablator.values(circuits, advance=advance)
    full, empty = values[0], values[1]

    def f(m: float) -> float:
        return normalized_faithfulness(m, full, empty)

    return {
        "metric_full": full,
        "metric_empty": empty,
        "metric_circuit": values[2],
        "metric_complement": values[3],
        "faithfulness": f(values[2]),
        "completeness": f(values[3]),
        "curve_thresholds": [t for t, _ in curve],
        "curve_n_nodes": [len(nodes) for _, nodes in curve],
        "curve_faithfulness": [f(v) for v in values[4::2]],
        "curve_completeness": [f(v) for v in values[5::2]],
    }


def evaluate_feature_circuit(
    circuit_path: Path,
    config,
    config_dir: Path | None,
    out_dir: Path,
    force: bool = False,
    batch_size: int | None = None,
) -> tuple[FeatureFaithfulnessReport, list[Path]]:
    """`evaluate faithfulness` for a feature-circuit file: JSON report and PNG curve."""
    from circuitctl.io.feature_circuit import read_feature_circuit
    from circuitctl.methods.sfc import position_labels
    from circuitctl.report import report_provenance, report_targets, write_report
    from circuitctl.sae.loading import resolve_saes
    from circuitctl.session import open_session

    targets = report_targets(out_dir, force)
    circuit, _ = read_feature_circuit(circuit_path)
    session = open_session(config, config_dir)
    adapter = session.adapter
    missing = [site for site in circuit.sites if not circuit.sae_sources.get(site)]
    if missing:
        raise UsageError(f"{circuit_path}: no SAE source recorded for site(s) {', '.join(missing)}")
    found = resolve_saes({site: circuit.sae_sources[site] for site in circuit.sites}, None, adapter.model, adapter.device)
    saes = {site: sae for site, (sae, _) in found.items()}
    if circuit.positions is not None and position_labels(session.data) != circuit.positions:
        raise UsageError(f"{circuit_path}: the circuit's token positions do not match this task's prompts")
    runner = SiteRunner(adapter.model, saes)
    ablator = FeatureAblator(runner, saes, session.data, session.metric, batch_size or config.method.batch_size, config.ablation.per_position)
    measured = measure_circuit(ablator, circuit)
    report = FeatureFaithfulnessReport(
        circuit=str(circuit_path),
        n_nodes_in_circuit=len(circuit.circuit_nodes),
        n_features_in_circuit=circuit.n_features,
        n_errors_in_circuit=circuit.n_errors,
        metric=config.metric,
        ablation="mean",
        node_threshold=circuit.node_threshold,
        **measured,
        provenance=report_provenance(config),
    )
    write_report(targets, asdict(report), plot_curve(report))
    return report, targets


def plot_curve(report: FeatureFaithfulnessReport) -> bytes:
    """Faithfulness and completeness of the circuits of the curve, by their number of nodes."""
    from circuitctl.report import render_png

    def draw(ax) -> None:
        xs = report.curve_n_nodes
        ax.plot(xs, report.curve_faithfulness, marker="o", label="faithfulness f(C)")
        ax.plot(xs, report.curve_completeness, marker="s", label="completeness f(M \\ C)")
        if report.n_nodes_in_circuit:
            ax.axvline(report.n_nodes_in_circuit, color="grey", lw=0.8, ls=":", label=f"circuit (threshold {report.node_threshold:g})")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("nodes in circuit (features + error nodes)")
        ax.set_ylabel("normalized metric")
        ax.set_title(f"feature circuit over node thresholds ({report.metric}, mean ablation)")
        ax.legend(fontsize=8)

    return render_png(draw)
