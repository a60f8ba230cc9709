"""`circuitctl evaluate faithfulness CIRCUIT [--config CONFIG]`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from circuitctl.cli.app import app
from circuitctl.errors import UsageError

console = Console(highlight=False)
evaluate_app = typer.Typer(help="Evaluate circuits.", no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")


@evaluate_app.command("faithfulness")
def faithfulness(
    circuit: Path = typer.Argument(..., help="circuit.json (ours or MIB format) or a run directory"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="run config; default: config.yaml beside the circuit"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides for the config"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write faithfulness.json/.png (default: beside the circuit)"),
    known: Optional[Path] = typer.Option(None, "--known", help="a text file of the true units (edge, node, neuron or feature names, one per line) for precision/recall/ROC AUC"),
    force: bool = typer.Option(False, "--force", help="replace earlier evaluation files"),
    curve: str = typer.Option(
        "mib", "--curve", help="how the curve's circuits are chosen: mib (MIB's exact rule, for comparison with the leaderboard) or circuitctl (at least one unit per point, stable ranking, no pruning)"
    ),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="resamples of the examples for the 95% confidence intervals of f, completeness, CPR and CMD (0: none)"),
) -> None:
    """Normalized faithfulness, completeness and the MIB curve (CPR, CMD) of a circuit."""
    from circuitctl.config.load import load_config

    if not circuit.exists():
        raise UsageError(f"circuit '{circuit}' does not exist (give a circuit.json or a run directory)")
    circuit_dir = circuit if circuit.is_dir() else circuit.parent
    config = config or circuit_dir / "config.yaml"
    if not config.is_file():
        raise UsageError(f"no config given and '{config}' does not exist; pass --config CONFIG")
    run_config = load_config(config, overrides or [])
    known_edges = None
    if known is not None:
        if not known.is_file():
            raise UsageError(f"--known: '{known}' does not exist")
        known_edges = [line.strip() for line in known.read_text().splitlines() if line.strip() and not line.startswith("#")]
    from circuitctl.batching import collect_notes
    from circuitctl.evaluation import evaluate_faithfulness

    if curve not in ("mib", "circuitctl"):
        raise UsageError(f"--curve: '{curve}' is not a curve rule (mib or circuitctl)")
    with collect_notes() as notes:
        report, files = evaluate_faithfulness(
            circuit, run_config, config.parent, out or circuit_dir, force, known_edges, curve_rule=curve, n_resamples=bootstrap
        )
    console.print(report_table(report, files))
    if report.per_example and report.per_example["worst"]:
        console.print(worst_examples_table(report.per_example))
    for note in notes:
        console.print(f"note: {note}", soft_wrap=True)


def report_table(report, files) -> Table:
    from circuitctl.metrics.faithfulness import format_f

    table = Table(title=f"faithfulness ({report.kind} circuit)", show_header=False)
    table.add_row(f"{report.unit} in circuit", f"{report.n_in_circuit} of {report.n_total}")
    table.add_row("metric full / empty", f"{report.metric_full:.4f} / {report.metric_empty:.4f}  ({report.ablation} ablation)")
    table.add_row("faithfulness f(C)", format_f(report.faithfulness))
    table.add_row("completeness f(complement)", format_f(report.completeness))
    if report.cpr is not None:
        table.add_row("CPR (higher is better)", f"{report.cpr:.4f}  ({report.curve_rule} curve)")
        table.add_row("CMD (lower is better)", f"{report.cmd:.4f}")
    else:
        curve = ", ".join(f"{n}: {format_f(f, 3)}" for n, f in zip(report.curve_sizes, report.curve_absolute))
        table.add_row(f"curve ({report.unit} by |score|: f)", curve)
    for name, value in per_example_rows(report):
        table.add_row(name, value)
    if report.known_circuit:
        k = report.known_circuit
        table.add_row("precision / recall / ROC AUC", f"{k['precision']:.3f} / {k['recall']:.3f} / {k['roc_auc']:.3f}")
    if report.faithfulness_undefined:
        table.add_row("note", report.faithfulness_undefined)
    table.add_row("written", ", ".join(str(f) for f in files))
    return table


def _interval(values) -> str:
    return "n/a" if values is None else f"[{values[0]:.4f}, {values[1]:.4f}]"


def per_example_rows(report) -> list[tuple[str, str]]:
    """Table rows: per-example quantiles and answer ranking, bootstrap intervals."""
    rows = []
    per = report.per_example
    if per:
        if per["quantiles"] is not None:
            q = per["quantiles"]
            rows.append(("per-example f: 5/25/50/75/95 %", " / ".join(f"{q[k]:.3f}" for k in ("5", "25", "50", "75", "95"))))
        if per["n_undefined"]:
            rows.append(("per-example f undefined", f"{per['n_undefined']} of {per['n_examples']} examples ({per['undefined_rule']})"))
        ranking = per["ranking"]
        if ranking["fraction"] is not None:
            rows.append((
                "circuit ranks the answer first",
                f"{ranking['n_both_right']} of the {ranking['n_model_right']} examples the model ranks right ({100 * ranking['fraction']:.1f} %)",
            ))
        else:
            rows.append(("circuit ranks the answer first", ranking.get("note") or "n/a (the model ranks no example right)"))
    ci = report.confidence
    if ci:
        level = f"{100 * ci['level']:.0f} % CI ({ci['n_resamples']} resamples)"
        rows.append((f"{level}: f / completeness", f"{_interval(ci['faithfulness'])} / {_interval(ci['completeness'])}"))
        if report.cpr is not None:
            rows.append((f"{level}: CPR / CMD", f"{_interval(ci['cpr'])} / {_interval(ci['cmd'])}"))
    return rows


def worst_examples_table(per_example: dict) -> Table:
    from rich.markup import escape

    table = Table(title=f"the {len(per_example['worst'])} examples with the lowest per-example f")
    for column in ("example", "f", "m(full) / m(empty) / m(circuit)", "prompt", "answer / wrong"):
        table.add_column(column)
    for row in per_example["worst"]:
        prompt = row.get("prompt", row.get("tokens"))
        answers = f"{', '.join(map(str, row['answers']))} / {', '.join(map(str, row['wrong_answers']))}"
        metrics = f"{row['metric_full']:.3f} / {row['metric_empty']:.3f} / {row['metric_circuit']:.3f}"
        table.add_row(str(row["index"]), f"{row['f']:.3f}", metrics, escape(str(prompt)), escape(answers))
    return table
