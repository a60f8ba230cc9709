"""`compare`: circuits of several runs on the same model and graph, side by side.

For every pair of runs: the Jaccard similarity of their circuits' units (edges, nodes, neurons
or features) and of the nodes they touch, the counts of shared and unique units, Spearman's rank
correlation of the scores over every unit both score (`circuitctl.metrics.faithfulness.spearman`)
and the units only one of the two has, with their scores in the other. For every run: f,
completeness, CPR and CMD from its faithfulness.json (computed into the output directory where a
run has none). Runs are read with `circuitctl.circuits.record.load_circuit_file` (any kind, either
schema version, MIB files); runs on different models, graphs or kinds of circuit are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from circuitctl.errors import UsageError
from circuitctl.io.escape import markdown_text

COMPARE_FILES = ("compare.json", "compare.md", "compare.png")
UNITS_OF_KIND = {  # the entries of a circuit file that hold a kind's units
    "edge": "edges",
    "positional_edge": "edges",
    "node": "nodes",
    "positional_node": "nodes",
    "feature": "nodes",
    "neuron": "neurons",
}
MODEL_KEYS = ("model_name", "n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab")
SPACE_NOISE = ("stats", "node_threshold", "edge_threshold")  # how a circuit was chosen, not what it is made of
LISTED = 20  # units only one run has, listed per pair in compare.md (compare.json has all)


@dataclass
class Run:
    label: str
    path: Path  # the circuit file
    record: dict
    source: str
    faithfulness: dict | None = None  # the run's faithfulness.json (None: not available)
    faithfulness_file: str | None = None

    @property
    def units(self) -> dict:
        return self.record.get(UNITS_OF_KIND[self.record["space"]["kind"]]) or {}

    @property
    def circuit(self) -> set[str]:
        return {name for name, entry in self.units.items() if entry["in_graph"]}

    @property
    def nodes(self) -> set[str]:
        return {name for name, entry in (self.record.get("nodes") or {}).items() if entry["in_graph"]}

    def score(self, name: str) -> float | None:
        entry = self.units.get(name)
        return None if entry is None else entry.get("score")


@dataclass
class CompareSummary:
    out_dir: Path
    record: dict
    files: list[str]
    notes: list[str] = field(default_factory=list)


def compare(paths: list[Path], out_dir: Path | None = None, force: bool = False, n_resamples: int = 1000) -> CompareSummary:
    """Compare the circuits of two or more runs; writes compare.json, compare.md and compare.png."""
    from circuitctl.io.files import refuse_overwrite, write_atomic, write_json

    if len(paths) < 2:
        raise UsageError("compare needs at least two runs (run directories or circuit files)")
    runs = load_runs(paths)
    check_comparable(runs)
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    targets = [out_dir / name for name in COMPARE_FILES]
    refuse_overwrite(targets, force)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out: '{out_dir}' exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = attach_faithfulness(runs, out_dir, force, n_resamples)
    notes += [n for n in (task_note(runs),) if n]
    record = comparison(runs)
    write_json(targets[0], record)
    write_atomic(targets[1], render_markdown(record))
    write_atomic(targets[2], plot_curves(runs))
    return CompareSummary(out_dir, record, [str(t) for t in targets], notes)


# ----------------------------------------------------------------------------------------------
# reading and checking
# ----------------------------------------------------------------------------------------------
def load_runs(paths: list[Path]) -> list[Run]:
    from circuitctl.circuits.record import circuit_path, load_circuit_file

    runs, seen = [], {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UsageError(f"'{path}' does not exist (give run directories or circuit files)")
        file = circuit_path(path)
        loaded = load_circuit_file(file)
        name = path.name if path.is_dir() else (file.parent.name if file.name == "circuit.json" else file.stem)
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name} ({seen[name]})"
        runs.append(Run(label, file, loaded.record, loaded.source))
    return runs


def check_comparable(runs: list[Run]) -> None:
    """Refuse runs on different models, graphs or kinds of circuit (UsageError, naming the difference)."""
    first = runs[0]
    for run in runs[1:]:
        for what, ours, theirs in (
            ("models", _model(first.record), _model(run.record)),
            ("graphs", first.record.get("graph") or {}, run.record.get("graph") or {}),
            ("kinds of circuit", _space(first.record), _space(run.record)),
        ):
            for key in sorted(set(ours) & set(theirs)):
                if ours[key] is not None and theirs[key] is not None and ours[key] != theirs[key]:
                    raise UsageError(
                        f"runs '{first.label}' and '{run.label}' are on different {what} ({key}: {ours[key]} vs {theirs[key]}); "
                        "compare runs on the same model and graph"
                    )


def _model(record: dict) -> dict:
    model = record.get("model") or {}
    return {key: model.get(key) for key in MODEL_KEYS if key in model}


def _space(record: dict) -> dict:
    return {key: value for key, value in record["space"].items() if key not in SPACE_NOISE}


def task_note(runs: list[Run]) -> str | None:
    tasks = {run.label: (run.record.get("task") or {}).get("name") for run in runs}
    named = {t for t in tasks.values() if t}
    if len(named) > 1:
        return "the runs are on different tasks (" + ", ".join(f"{k}: {v}" for k, v in tasks.items()) + "): f, CPR and CMD measure different behaviours"
    return None


def attach_faithfulness(runs: list[Run], out_dir: Path, force: bool, n_resamples: int) -> list[str]:
    """Each run's faithfulness.json, computed (into OUT/<label>/) from the config beside the circuit where missing."""
    notes = []
    for run in runs:
        beside = run.path.parent / "faithfulness.json"
        if beside.is_file():
            run.faithfulness, run.faithfulness_file = _read_json(beside), str(beside)
            continue
        config = run.path.parent / "config.yaml"
        if not config.is_file():
            notes.append(f"{run.label}: no faithfulness.json and no config.yaml beside {run.path} to compute it: f, CPR and CMD not shown")
            continue
        from circuitctl.config.load import load_config
        from circuitctl.evaluation import evaluate_faithfulness

        report_dir = out_dir / _safe_dir_name(run.label)
        report, files = evaluate_faithfulness(run.path, load_config(config), config.parent, report_dir, force, n_resamples=n_resamples)
        run.faithfulness, run.faithfulness_file = _read_json(files[0]), str(files[0])
        notes.append(f"{run.label}: faithfulness computed into {files[0]}")
    return notes


def _safe_dir_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable faithfulness report ({exc})") from exc


# ----------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------
def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (two empty circuits: 1)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def pair(a: Run, b: Run) -> dict:
    import torch

    from circuitctl.metrics.faithfulness import spearman

    ca, cb = a.circuit, b.circuit
    scored = [n for n in a.units if a.score(n) is not None and b.score(n) is not None]
    rho = rho_abs = None
    if scored:
        sa = torch.tensor([a.score(n) for n in scored], dtype=torch.float64, device="cpu")
        sb = torch.tensor([b.score(n) for n in scored], dtype=torch.float64, device="cpu")
        rho, rho_abs = spearman(sa, sb), spearman(sa.abs(), sb.abs())

    def only(mine: Run, other: Run, names: set) -> list[dict]:
        rows = [{"unit": n, f"score_{'a' if mine is a else 'b'}": mine.score(n), f"score_{'b' if mine is a else 'a'}": other.score(n)} for n in names]
        return sorted(rows, key=lambda r: (-abs(mine.score(r["unit"]) or 0.0), r["unit"]))

    return {
        "a": a.label,
        "b": b.label,
        "jaccard": jaccard(ca, cb),
        "node_jaccard": jaccard(a.nodes, b.nodes),
        "n_shared": len(ca & cb),
        "n_only_a": len(ca - cb),
        "n_only_b": len(cb - ca),
        "spearman": rho,  # of the signed scores
        "spearman_abs": rho_abs,  # of |score| (the ranking circuits are usually selected by)
        "n_scored": len(scored),
        "only_a": only(a, b, ca - cb),
        "only_b": only(b, a, cb - ca),
    }


def comparison(runs: list[Run]) -> dict:
    kind = runs[0].record["space"]["kind"]
    counts: dict[str, list[str]] = {}
    for run in runs:
        for name in run.circuit:
            counts.setdefault(name, []).append(run.label)
    unique = [
        {"unit": name, "run": owners[0], "scores": {run.label: run.score(name) for run in runs}}
        for name, owners in sorted(counts.items())
        if len(owners) == 1
    ]
    return {
        "kind": kind,
        "unit": UNITS_OF_KIND[kind],
        "runs": [_run_row(run) for run in runs],
        "pairs": [pair(a, b) for i, a in enumerate(runs) for b in runs[i + 1 :]],
        "unique": unique,  # units in exactly one run's circuit, with every run's score
    }


def _run_row(run: Run) -> dict:
    record, report = run.record, run.faithfulness or {}
    method = (record.get("method") or {}).get("name")
    return {
        "label": run.label,
        "circuit": str(run.path),
        "source": run.source,
        "method": method,
        "task": (record.get("task") or {}).get("name"),
        "n_in_circuit": len(run.circuit),
        "n_nodes_in_circuit": len(run.nodes),
        "n_total": len(run.units),
        "faithfulness": report.get("faithfulness"),
        "completeness": report.get("completeness"),
        "cpr": report.get("cpr"),
        "cmd": report.get("cmd"),
        "faithfulness_file": run.faithfulness_file,
    }


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def _number(value, digits: int = 3) -> str:
    from circuitctl.metrics.faithfulness import format_f

    return format_f(value, digits) if isinstance(value, (int, float)) or value is None else str(value)


def render_markdown(record: dict) -> str:
    """compare.md: every name (run labels, methods, units) escaped; numbers as formatted here."""
    unit = record["unit"]
    lines = [f"# Comparison of {len(record['runs'])} runs ({markdown_text(record['kind'])} circuits)", ""]
    lines.append(
        _table(
            ["run", "method", f"{unit} in circuit", "nodes", "f", "completeness", "CPR", "CMD"],
            [
                [markdown_text(r["label"]), markdown_text(r["method"] or "-"), f"{r['n_in_circuit']} of {r['n_total']}", str(r["n_nodes_in_circuit"])]
                + [_number(r[k]) if r["faithfulness_file"] else "n/a" for k in ("faithfulness", "completeness", "cpr", "cmd")]
                for r in record["runs"]
            ],
        )
    )
    lines += ["", "f undefined is shown as 'undefined'; 'n/a': the run has no faithfulness report.", "", "## Pairs", ""]
    lines.append(
        _table(
            ["a", "b", f"Jaccard ({unit})", "Jaccard (nodes)", "shared", "only a", "only b", "Spearman: scores / \\|scores\\|", f"{unit} scored by both"],
            [
                [markdown_text(p["a"]), markdown_text(p["b"]), f"{p['jaccard']:.3f}", f"{p['node_jaccard']:.3f}", str(p["n_shared"]),
                 str(p["n_only_a"]), str(p["n_only_b"]), f"{_rho(p['spearman'])} / {_rho(p['spearman_abs'])}", str(p["n_scored"])]
                for p in record["pairs"]
            ],
        )
    )
    for p in record["pairs"]:
        for side, other in (("a", "b"), ("b", "a")):
            rows = p[f"only_{side}"]
            if not rows:
                continue
            lines += ["", f"### {unit} only {markdown_text(p[side])} has (vs {markdown_text(p[other])})", ""]
            lines.append(
                _table(
                    [unit, f"score in {markdown_text(p[side])}", f"score in {markdown_text(p[other])}"],
                    [[markdown_text(r["unit"]), _score(r[f"score_{side}"]), _score(r[f"score_{other}"])] for r in rows[:LISTED]],
                )
            )
            if len(rows) > LISTED:
                lines += ["", f"... and {len(rows) - LISTED} more (compare.json lists them all)"]
    if len(record["runs"]) > 2 and record["unique"]:
        labels = [r["label"] for r in record["runs"]]
        lines += ["", f"## {unit} in exactly one run's circuit", ""]
        lines.append(
            _table(
                [unit, "in", *[f"score in {markdown_text(label)}" for label in labels]],
                [[markdown_text(u["unit"]), markdown_text(u["run"]), *[_score(u["scores"][label]) for label in labels]] for u in record["unique"]],
            )
        )
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table of cells already escaped (names) or formatted (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _rho(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _score(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def plot_curves(runs: list[Run]) -> bytes:
    """Every run's faithfulness curve: signed ranking solid, |score| ranking dashed, one colour per run."""
    from circuitctl.report import render_png

    def draw(ax) -> None:
        drawn = False
        for i, run in enumerate(runs):
            report = run.faithfulness or {}
            xs = report.get("percentages") or report.get("curve_sizes") or report.get("curve_n_nodes")
            if not xs:
                continue
            colour = f"C{i % 10}"
            for key, style, suffix in (("curve_signed", "-", "signed"), ("curve_absolute", "--", "|score|")):
                ys = report.get(key) or (report.get("curve_faithfulness") if key == "curve_absolute" else None)
                points = [(x, y) for x, y in zip(xs, ys or []) if y is not None]
                if points:
                    ax.plot(*zip(*points), style, marker="o", ms=3, color=colour, label=f"{run.label} ({suffix})")
                    drawn = True
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        percent = all((run.faithfulness or {}).get("percentages") for run in runs)
        unit = UNITS_OF_KIND[runs[0].record["space"]["kind"]]
        ax.set_xlabel(f"{unit} kept (%)" if percent else f"{unit} kept (% for edge and node circuits, else a count)")
        ax.set_ylabel("normalized faithfulness f")
        ax.set_title("faithfulness curves" if drawn else "faithfulness curves: no run has a faithfulness report")
        if drawn:
            ax.legend(fontsize=7)

    return render_png(draw)
