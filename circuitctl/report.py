"""The faithfulness report of `evaluate faithfulness`: faithfulness.json and faithfulness_curve.png.

One builder for every kind of circuit: edge circuits (circuitctl.evaluation), node, neuron and
per-position circuits (circuitctl.unit_circuits) measure f(C), completeness and the MIB curve
(CPR / CMD) with `faithfulness_report`; feature circuits (circuitctl.sae.evaluate) have their
own curve but the same files, provenance and plotting through `report_targets`,
`report_provenance`, `write_report` and `render_png`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from circuitctl.io.files import refuse_overwrite, write_atomic, write_json
from circuitctl.metrics.faithfulness import MIB_PERCENTAGES

REPORT_FILES = ("faithfulness.json", "faithfulness_curve.png")


@dataclass
class FaithfulnessReport:
    circuit: str
    n_edges_total: int
    n_edges_in_circuit: int
    metric: str
    ablation: str
    metric_full: float
    metric_empty: float
    metric_circuit: float
    metric_complement: float
    faithfulness: float
    completeness: float
    percentages: list[float]
    curve_signed: list[float]
    curve_absolute: list[float]
    cpr: float
    cmd: float
    known_circuit: dict | None = None
    provenance: dict | None = None  # the config, its hash, the seed, library versions, time


def report_targets(out_dir: Path, force: bool) -> list[Path]:
    """The report's files in `out_dir` (JSON, PNG); refuses to replace earlier ones without force."""
    targets = [out_dir / name for name in REPORT_FILES]
    refuse_overwrite(targets, force)
    return targets


def faithfulness_report(
    circuit_path: Path,
    config,
    evaluator,
    n_prompts: int,
    mask,
    n_total: int,
    scores,
    circuit,
    progress: str,
    known_circuit: dict | None = None,
) -> FaithfulnessReport:
    """f(C), completeness and the MIB curve of a circuit over `mask`'s units (edges, nodes, neurons...).

    `evaluator` (a PatchingEngine or a UnitEvaluator) gives m(M) and m(empty) with
    `full_and_empty()` and the metric of circuits (bool masks shaped like `mask`) with
    `circuit_values`; `circuit` is the circuit's membership within `mask`, `scores` rank the
    units for the curve (signed for CPR, |score| for CMD)."""
    import torch

    from circuitctl.metrics.faithfulness import cpr_cmd, n_edges_for_percentage, normalized_faithfulness, top_edges
    from circuitctl.progress import bar

    m_full, m_empty = evaluator.full_and_empty()
    complement = mask & ~circuit
    ks = [n_edges_for_percentage(p, n_total) for p in MIB_PERCENTAGES]
    curves = [torch.stack([top_edges(scores, mask, k, absolute) for k in ks]) for absolute in (False, True)]
    keep = torch.cat([circuit[None], complement[None], *curves])
    with bar(progress, -(-n_prompts // evaluator.batch_size)) as advance:
        values = evaluator.circuit_values(keep, on_batch=advance).tolist()

    def f(m: float) -> float:
        return normalized_faithfulness(m, m_full, m_empty)

    n = len(MIB_PERCENTAGES)
    signed, absolute = [f(m) for m in values[2 : 2 + n]], [f(m) for m in values[2 + n :]]
    cpr, cmd = cpr_cmd(signed, absolute)
    return FaithfulnessReport(
        circuit=str(circuit_path),
        n_edges_total=n_total,
        n_edges_in_circuit=int(circuit.sum()),
        metric=config.metric,
        ablation=config.ablation.type,
        metric_full=m_full,
        metric_empty=m_empty,
        metric_circuit=values[0],
        metric_complement=values[1],
        faithfulness=f(values[0]),
        completeness=f(values[1]),
        percentages=list(MIB_PERCENTAGES),
        curve_signed=signed,
        curve_absolute=absolute,
        cpr=cpr,
        cmd=cmd,
        known_circuit=known_circuit,
        provenance=report_provenance(config),
    )


def report_provenance(config) -> dict:
    """What a report records of its run: the config and its hash, the seed, library versions, time."""
    from datetime import datetime, timezone

    from circuitctl.config.load import config_hash
    from circuitctl.io.circuit_file import library_versions

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
    """The MIB curve: f of the top-k% units, by signed score and by |score|."""

    def draw(ax) -> None:
        xs = report.percentages
        ax.plot(xs, report.curve_signed, marker="o", label=f"signed ranking (CPR {report.cpr:.3f})")
        ax.plot(xs, report.curve_absolute, marker="s", label=f"|score| ranking (CMD {report.cmd:.3f})")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("edges kept (%)")
        ax.set_ylabel("normalized faithfulness f")
        ax.set_title(f"faithfulness curve ({report.metric}, {report.ablation} ablation)")
        ax.legend()

    return render_png(draw)
