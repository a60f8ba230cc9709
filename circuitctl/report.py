"""The faithfulness report of `evaluate faithfulness`: faithfulness.json and faithfulness_curve.png.

One builder for every kind of circuit (edges, nodes, neurons, per-position units, SAE
features): f(C), completeness and the curve of f over circuits of growing size, ranked by signed
score and by |score|; for the MIB percentages, CPR and CMD.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from circuitctl.io.files import refuse_overwrite, write_atomic, write_json

REPORT_FILES = ("faithfulness.json", "faithfulness_curve.png")


@dataclass
class FaithfulnessReport:
    circuit: str
    kind: str  # the circuit space: edge | node | neuron | positional_edge | positional_node | feature
    unit: str  # edges | nodes | neurons | features
    n_total: int
    n_in_circuit: int
    metric: str
    ablation: str
    metric_full: float
    metric_empty: float
    metric_circuit: float
    metric_complement: float
    faithfulness: float | None  # None: undefined (see faithfulness_undefined)
    completeness: float | None
    curve_rule: str  # how the curve's circuits were chosen: "mib" (MIB's exact rule) or "circuitctl"
    curve_sizes: list[int]  # units taken at each point of the curve (before MIB's pruning)
    percentages: list[float] | None  # the MIB percentages those sizes stand for (None: plain counts)
    curve_signed: list[float | None]
    curve_absolute: list[float | None]
    cpr: float | None
    cmd: float | None
    faithfulness_undefined: str | None = None
    known_circuit: dict | None = None
    # per-example f (quantiles, answer ranking, worst examples) and bootstrap intervals of f,
    # completeness, CPR and CMD (`circuitctl.analysis.per_example`)
    per_example: dict | None = None
    confidence: dict | None = None
    provenance: dict | None = None  # the config, its hash, the seed, library versions, time


def report_targets(out_dir: Path, force: bool) -> list[Path]:
    """The report's files in `out_dir` (JSON, PNG); refuses to replace earlier ones without force."""
    targets = [out_dir / name for name in REPORT_FILES]
    refuse_overwrite(targets, force)
    return targets


def curve_circuits(space, scores, rule: str):
    """(sizes, MIB percentages or None, circuits by signed score, circuits by |score|, the rule used).

    ``mib``: MIB's exact rule (`circuitctl.metrics.mib`) for edge and node circuits of ungrouped
    graphs; other kinds, and ``circuitctl``: the top-k units by a stable sort, k = ceil(p * n) >= 1."""
    import torch

    from circuitctl.metrics.faithfulness import top_edges
    from circuitctl.metrics.mib import FRACTIONS, mib_edge_circuits, mib_node_circuits

    builder = {"edge": mib_edge_circuits, "node": mib_node_circuits}.get(space.kind)
    if rule == "mib" and builder is not None and not space.graph.spec.grouped:
        sizes, signed = builder(space.graph, scores, absolute=False)
        _, absolute = builder(space.graph, scores, absolute=True)
        return sizes, [f * 100 for f in FRACTIONS], signed, absolute, "mib"
    sizes, percentages = space.curve_sizes(scores)
    signed, absolute = (torch.stack([top_edges(scores, space.mask, k, a) for k in sizes]) for a in (False, True))
    return sizes, percentages, signed, absolute, "circuitctl"


def faithfulness_report(
    circuit_path: Path,
    config,
    evaluator,
    scores,
    circuit,
    known_circuit: dict | None = None,
    curve_rule: str = "mib",
    n_resamples: int = 1000,
) -> FaithfulnessReport:
    """f(C), completeness and the curve of a circuit of `evaluator.space` (a `CircuitEvaluator`),
    with per-example faithfulness and `n_resamples` bootstrap resamples for confidence intervals.

    `circuit` is the circuit's membership (shaped like the space's mask); `scores` rank the
    units for the curve (signed for CPR, |score| for CMD), chosen by `curve_rule` (`curve_circuits`)."""
    import torch

    from circuitctl.metrics.faithfulness import cpr_cmd, normalized_faithfulness, undefined_reason
    from circuitctl.progress import bar

    space = evaluator.space
    mask = space.mask
    circuit = circuit & mask
    m_full, m_empty = evaluator.full_and_empty()
    complement = mask & ~circuit
    sizes, percentages, signed_circuits, absolute_circuits, rule = curve_circuits(space, scores, curve_rule)
    keep = torch.cat([circuit[None], complement[None], signed_circuits, absolute_circuits])
    rows = torch.zeros(keep.shape[0], evaluator.engine.data.n, dtype=torch.float64, device="cpu")  # every example's value
    with bar(f"evaluating {space.unit} circuits", evaluator.n_batches) as advance:
        values = evaluator.circuit_values(keep, on_batch=advance, per_example=rows).tolist()

    def f(m: float) -> float | None:
        return normalized_faithfulness(m, m_full, m_empty)

    n = len(sizes)
    signed, absolute = [f(m) for m in values[2 : 2 + n]], [f(m) for m in values[2 + n :]]
    cpr, cmd = cpr_cmd(signed, absolute, percentages) if percentages is not None else (None, None)
    from circuitctl.analysis.per_example import per_example_report

    per_example, confidence = per_example_report(evaluator, circuit, rows, n, percentages, n_resamples, config.seed)
    return FaithfulnessReport(
        circuit=str(circuit_path),
        kind=space.kind,
        unit=space.unit,
        n_total=space.n_total,
        n_in_circuit=int(circuit.sum()),
        metric=config.metric,
        ablation=config.ablation.type,
        metric_full=m_full,
        metric_empty=m_empty,
        metric_circuit=values[0],
        metric_complement=values[1],
        faithfulness=f(values[0]),
        completeness=f(values[1]),
        curve_rule=rule,
        curve_sizes=sizes,
        percentages=percentages,
        curve_signed=signed,
        curve_absolute=absolute,
        cpr=cpr,
        cmd=cmd,
        faithfulness_undefined=undefined_reason(m_full, m_empty),
        known_circuit=known_circuit,
        per_example=per_example,
        confidence=confidence,
        provenance=report_provenance(config),
    )


def report_provenance(config) -> dict:
    """What a report records of its run: the config and its hash, the seed, library versions, time."""
    from datetime import datetime, timezone

    from circuitctl.config.load import config_hash
    from circuitctl.versions import library_versions

    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_plain(),
        "config_hash": config_hash(config),
        "seed": config.seed,
        "library_versions": library_versions(),
    }


def write_report(targets: list[Path], record: dict, png: bytes) -> None:
    """Write the report's JSON record and PNG curve (the paths of `report_targets`)."""
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    write_json(targets[0], record)
    write_atomic(targets[1], png)


def render_png(draw: Callable) -> bytes:
    """A 6x4 inch PNG of the axes that `draw(ax)` fills (matplotlib, no display needed)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    draw(ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def plot_curve(report: FaithfulnessReport) -> bytes:
    """f of the circuits of the curve, by signed score and by |score| (the MIB curve where it applies)."""

    def draw(ax) -> None:
        xs = report.percentages if report.percentages is not None else report.curve_sizes
        points = lambda ys: [(x, y) for x, y in zip(xs, ys) if y is not None]  # noqa: E731
        signed = f" (CPR {report.cpr:.3f})" if report.cpr is not None else ""
        absolute = f" (CMD {report.cmd:.3f})" if report.cmd is not None else ""
        for ys, marker, label in ((report.curve_signed, "o", f"signed ranking{signed}"), (report.curve_absolute, "s", f"|score| ranking{absolute}")):
            kept = points(ys)
            if kept:
                ax.plot(*zip(*kept), marker=marker, label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel(f"{report.unit} kept (%)" if report.percentages is not None else f"{report.unit} kept")
        ax.set_ylabel("normalized faithfulness f")
        title = f"faithfulness curve ({report.metric}, {report.ablation} ablation)"
        if report.faithfulness_undefined:
            title += ": f undefined"
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)

    return render_png(draw)
