"""The offline MIB-style leaderboard: every edge method on the shipped toy GPT's IOI and induction tasks.

    python bench/leaderboard.py               # every method, both tasks (about 15-30 minutes on one CPU thread)
    python bench/leaderboard.py --smoke       # 8 pairs, a few steps: checks that every row runs (a few minutes)
    python bench/leaderboard.py --markdown    # print the README table from the last results file
    python bench/leaderboard.py --curve circuitctl   # CPR / CMD by circuitctl's own curve rule

Each row is a real `circuitctl discover` run (the library call, into bench/results/leaderboard_runs/)
followed by `circuitctl evaluate faithfulness` (`circuitctl.evaluation.evaluate_faithfulness`) on
the run's `circuit.mib.json`, the file MIB's leaderboard takes (for path patching, the projection
of its per-position circuit onto the edge graph), with resample ablation and the logit
difference, so every number comes from the code paths users run:

* CPR: area under f over MIB's edge budgets (0.1 % ... 100 %), edges ranked by signed score
  (higher is better); CMD: area under |1 - f| with edges ranked by |score| (lower is better).
  The curve's circuits follow MIB's exact rule by default (`--curve mib`: int(fraction x n)
  edges, MIB's sort and pruning; `circuitctl.metrics.mib`), or circuitctl's (`--curve circuitctl`:
  at least one edge per point, a stable sort, no pruning); each row records the rule used;
* f: faithfulness of the circuit at the run's default selection (the method's own circuit for
  ACDC, path patching, CD-T and edge pruning; the top 100 edges otherwise), with its size;
* seconds: wall time of the discovery alone (loading and evaluation excluded), one CPU thread.

Settings per method are listed in METHODS below; the README explains the choices.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("toy-ioi", "toy-induction")
ENSEMBLE_MEMBERS = ["eap", {"name": "eap_ig", "steps": 5}, {"name": "eap_ig", "variant": "activations", "steps": 5}]
EDGE_PRUNING = {"name": "edge_pruning", "edges": 20, "steps": 1500, "sparsity_warmup_steps": 1000, "lr_warmup_steps": 100, "lr": 0.1, "lambda_lr": 0.1}

# row label -> method settings (the smoke run shortens the long ones, see `smoke_settings`)
METHODS = {
    "exact": {"name": "exact"},
    "eap": {"name": "eap"},
    "eap_ig (inputs, 5 steps)": {"name": "eap_ig", "steps": 5},
    "eap_ig (activations, 5 steps)": {"name": "eap_ig", "variant": "activations", "steps": 5},
    "acdc (tau 0.01)": {"name": "acdc", "tau": 0.01},
    "path_patching": {"name": "path_patching"},
    "cdt (decompose_qk)": {"name": "cdt", "decompose_qk": True},
    "edge_pruning (20 edges)": EDGE_PRUNING,
    "ifr": {"name": "ifr"},
    "ensemble (mean_rank)": {"name": "ensemble", "members": ENSEMBLE_MEMBERS, "combine": "mean_rank"},
    "ensemble (mean_normalized)": {"name": "ensemble", "members": ENSEMBLE_MEMBERS, "combine": "mean_normalized"},
}


def smoke_settings(settings: dict) -> dict:
    if settings["name"] == "edge_pruning":
        return {**settings, "steps": 30, "sparsity_warmup_steps": 20, "lr_warmup_steps": 5}
    return settings


def run_row(label: str, settings: dict, task: str, n_pairs: int | None, out: Path, batch_size: int, curve: str) -> dict:
    from circuitctl.config.load import validate_config
    from circuitctl.evaluation import evaluate_faithfulness
    from circuitctl.runner import discover

    data = {
        "model": {"path": str(ROOT / "models/toy-gpt"), "device": "cpu"},
        "task": {"name": task, **({"n_pairs": n_pairs} if n_pairs else {})},
        "method": {**settings, "batch_size": batch_size},
        "ablation": "resample",
        "metric": "logit_diff",
        "output": {"dir": str(out)},
        "seed": 0,
    }
    config = validate_config(data, f"leaderboard row '{label}'")
    summary = discover(config, ROOT, force=True)
    report, _ = evaluate_faithfulness(out / "circuit.mib.json", config, ROOT, out, force=True, curve_rule=curve)
    assert report.unit == "edges", report.unit
    return {
        "task": task,
        "method": label,
        "settings": settings,
        "seconds": summary.seconds["discovery"],
        "curve_rule": report.curve_rule,
        "cpr": report.cpr,
        "cmd": report.cmd,
        "faithfulness": report.faithfulness,  # None when undefined (the ablation changes nothing)
        "n_edges_in_circuit": report.n_in_circuit,
        "n_edges_total": report.n_total,
    }


def table(rows: list[dict]) -> str:
    from circuitctl.metrics.faithfulness import format_f

    rules = sorted({r.get("curve_rule", "?") for r in rows})
    lines = [
        "| task | method | CPR (higher better) | CMD (lower better) | f (default selection) | edges | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['method']} | {format_f(r['cpr'], 2)} | {format_f(r['cmd'], 2)} | {format_f(r['faithfulness'], 2)} | "
            f"{r['n_edges_in_circuit']} / {r['n_edges_total']} | {r['seconds']:.1f} |"
        )
    lines.append(f"\nCPR and CMD by the curve rule: {', '.join(rules)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="8 pairs per task and short learned-mask runs")
    parser.add_argument("--methods", nargs="*", help="row labels to run (default: all)")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--markdown", action="store_true", help="print the table of the last results file and exit")
    parser.add_argument(
        "--curve", choices=("mib", "circuitctl"), default="mib",
        help="the curve's circuits for CPR / CMD: MIB's exact rule (default) or circuitctl's (evaluate faithfulness --curve)",
    )
    args = parser.parse_args()
    name = ("leaderboard_smoke" if args.smoke else "leaderboard") + ("" if args.curve == "mib" else f"_{args.curve}")
    if args.markdown:
        print(table(json.loads((RESULTS / f"{name}.json").read_text())["rows"]))
        return
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch

    from circuitctl.metrics.faithfulness import format_f

    torch.set_num_threads(args.threads)
    labels = args.methods or list(METHODS)
    unknown = [label for label in labels if label not in METHODS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(METHODS)}")
    runs = RESULTS / f"{name}_runs"
    # rows of an earlier run (other tasks or methods) are kept; each finished row is saved at once
    previous = RESULTS / f"{name}.json"
    rows = json.loads(previous.read_text())["rows"] if previous.exists() and (args.methods or args.tasks != list(TASKS)) else []
    rows = [r for r in rows if r.get("curve_rule") == args.curve]  # never mix rows of two curve rules
    load = os.getloadavg()[0]
    for task in args.tasks:
        for label in labels:
            settings = smoke_settings(METHODS[label]) if args.smoke else METHODS[label]
            slug = label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
            row = run_row(label, settings, task, 8 if args.smoke else None, runs / task / slug, args.batch_size, args.curve)
            row["load_average_at_start"] = load
            rows = [r for r in rows if (r["task"], r["method"]) != (task, label)] + [row]
            print(f"{task:14s} {label:32s} CPR {format_f(row['cpr'], 2):>6s}  CMD {format_f(row['cmd'], 2):>5s}  f {format_f(row['faithfulness'], 2):>5s}  "
                  f"edges {row['n_edges_in_circuit']:3d}/{row['n_edges_total']}  {row['seconds']:7.1f} s", flush=True)
            write_results(name, {"smoke": args.smoke, "curve": args.curve, "threads": args.threads, "batch_size": args.batch_size, "rows": rows})
    order = {(t, m): i for i, (t, m) in enumerate((t, m) for t in TASKS for m in METHODS)}
    rows.sort(key=lambda r: order.get((r["task"], r["method"]), len(order)))
    print(table(rows))
    print(f"wrote {write_results(name, {'smoke': args.smoke, 'curve': args.curve, 'threads': args.threads, 'batch_size': args.batch_size, 'rows': rows})}")
    if args.smoke:
        shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
