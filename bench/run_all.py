"""Every discovery method and the evaluation, timed on the same data: one table, one JSON file.

    python bench/run_all.py                   # the default plan (about 10 minutes on 2 CPU cores)
    python bench/run_all.py --examples 200    # the published setting for the fast methods
    python bench/run_all.py --methods eap exact --models gpt2-small-shape

Models: GPT-2 small's shape with random weights (same cost as the real model, no download)
on IOI-shaped inputs (random tokens, 15-token prompts, one answer and one wrong token), and
a planted model with a known circuit (its own prompt pairs). Methods that need one patched
(or decomposed) pass per edge, source or path (exact, ACDC, CD-T, path patching) run on the
first `--slow-layers` layers of the GPT-2 shape with `--slow-examples` examples by default;
the table labels every such row. `--memory` checks the README's memory formulas instead
(bench/memory_table.py) and `--markdown` prints the README's table from the last results file.

Each row runs in a fresh subprocess (its peak RSS is its own) that first times a plain forward
+ backward pass (activation gradients, parameters frozen) over the same examples with the same
batch size, then the method: the ratio method / (forward + backward) is measured within one
process, minutes apart at most, so it survives a noisy shared machine better than absolute
times. Cheap runs are repeated and the fastest kept (noise from other processes only adds
time). Columns: wall time, the ratio, forward-pass equivalents reported by the method, peak
RSS, and on a GPU the CUDA peak allocated. `sfc` needs trained SAEs and is listed, not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ACDC_START,
    CACHE,
    EVALUATION,
    PATCHED,
    PATCHED_CIRCUITS,
    build_model,
    forward_backward,
    peak_rss_mb,
    random_pairs,
    run_step,
    synchronize,
    timed,
    write_results,
)

# CACHE, ACDC_START, PATCHED and PATCHED_CIRCUITS are for the memory check only (--memory)
# one patched (or decomposed) pass per edge, source or path: on a reduced model by default
SLOW = ("exact", "acdc", "cdt", "path_patching")
PUBLISHED = "published, IOI on GPT-2 small, 200 examples, one H100: EAP 21 s, ACDC 18,783 s (targets: EAP < 5 s, ACDC < 10 min)"


# ----------------------------------------------------------------------------------------
# One measurement (runs in its own subprocess)
# ----------------------------------------------------------------------------------------
def _data(model_name: str, layers: int | None, examples: int, length: int, seed: int = 0):
    """(model, TaskData) for a benchmark model."""
    if model_name.startswith("planted:"):
        from dataclasses import replace

        from circuitctl.testing.planted import build
        from circuitctl.testing.planted import build_model as build_planted
        from circuitctl.tasks.data import tokenize_pairs
        from circuitctl.tasks.records import pair_from_record

        pc = build(model_name.split(":", 1)[1])
        pc = replace(pc, pairs=pc.pairs[:examples])
        model = build_planted(pc)
        pairs = [pair_from_record(r, f"pair {i}") for i, r in enumerate(pc.pairs)]
        return model, tokenize_pairs(pairs, None, model.cfg.d_vocab, None, model_name)
    model = build_model(model_name, seed=seed, **({"n_layers": layers} if layers else {}))
    return model, random_pairs(model.cfg.d_vocab, examples, length, seed)


def inner(model_name: str, layers: int, method: str, examples: int, length: int, batch: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from circuitctl.config.schema import AblationConfig
    from circuitctl.methods.base import DiscoveryContext
    from circuitctl.metrics.metrics import METRICS
    from circuitctl.models.adapter import ModelAdapter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, data = _data(model_name, layers or None, examples, length)
    model = model.to(device)
    adapter = ModelAdapter(model)
    metric = METRICS.get("kl" if method == "acdc" else "logit_diff")  # ACDC's default metric; EAP refuses KL
    context = DiscoveryContext(adapter, data, metric, AblationConfig())

    def baseline():
        forward_backward(adapter, data, batch)
        synchronize(device)

    first = timed(baseline)  # warm-up
    fwd_bwd = min(timed(baseline) for _ in range(max(2, min(20, int(2 / max(first, 1e-3))))))
    rss_baseline = peak_rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    forward_passes = []

    def run():
        forward_passes.append(run_step(context, method, batch))
        synchronize(device)

    seconds = timed(run)
    if seconds < 5:  # cheap: repeat, keep the fastest
        seconds = min([seconds] + [timed(run) for _ in range(2 if seconds > 1 else 5)])
    return {
        "seconds": seconds,
        "fwd_bwd_seconds": fwd_bwd,
        "ratio": seconds / fwd_bwd,
        "forward_passes": forward_passes[0],
        "peak_rss_mb": round(peak_rss_mb()),
        "rss_after_baseline_mb": round(rss_baseline),
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
        "n_edges": adapter.graph.n_edges,
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
    }


# ----------------------------------------------------------------------------------------
# The plan and the table
# ----------------------------------------------------------------------------------------
def plan(args) -> list[dict]:
    """Rows to measure: (model, layers, method, examples, label note)."""
    from circuitctl.config.methods import METHODS

    names = METHODS.names()
    methods = [m for m in names + [EVALUATION] if not args.methods or m in args.methods]
    rows = []
    for model in args.models:
        planted = model.startswith("planted:")
        for method in methods:
            row = {"model": model, "layers": 0, "method": method, "examples": args.examples, "note": ""}
            if method == "sfc":
                row["skip"] = "needs trained SAEs (method.saes): not timed"
            elif planted:
                row["examples"] = args.examples  # at most that many of the model's own pairs
            elif method in SLOW and not args.full_slow:
                row.update(layers=args.slow_layers, examples=args.slow_examples)
                row["note"] = f"first {args.slow_layers} of 12 layers, {args.slow_examples} examples (--full-slow for all)"
            rows.append(row)
    return rows


def run_row(row: dict, args, extra_env: dict | None = None) -> dict:
    if "skip" in row:
        return {**row, "status": row["skip"]}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    argv = [sys.executable, __file__, "--inner", row["model"], str(row["layers"]), row["method"], str(row["examples"]), str(args.length), str(args.batch)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=args.budget, check=False)
    except subprocess.TimeoutExpired:
        return {**row, "status": f"stopped after the {args.budget} s budget (--budget)"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {**row, "status": f"failed: {last[:160]}"}
    return {**row, "status": "ok", **json.loads(out.stdout.strip().splitlines()[-1])}


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def print_table(results: list[dict], args, meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"discovery methods and evaluation ({meta['device']}, {args.length}-token prompts, batch {args.batch})")
    for column in ("model", "method", "examples", "wall s", "fwd+bwd s", "ratio", "fwd-pass eq.", "peak RSS MB", "CUDA peak MB", "note"):
        table.add_column(column)
    for r in results:
        model = r["model"].replace("planted:", "planted ")
        if r["status"] != "ok":
            table.add_row(model, r["method"], str(r["examples"]), "-", "-", "-", "-", "-", "-", r["status"])
            continue
        table.add_row(
            model, r["method"], str(r["examples"]), _seconds(r["seconds"]), _seconds(r["fwd_bwd_seconds"]), f"{r['ratio']:.1f}x",
            f"{r['forward_passes']:.0f}", str(r["peak_rss_mb"]), str(r["cuda_peak_mb"] or "-"), r["note"],
        )
    console = Console(width=200)
    console.print(table)
    console.print("ratio = wall time / one plain forward + backward over the same examples (same process, fastest of repeats).")
    console.print(f"total {meta['total_seconds']:.0f} s; load average at start {', '.join(f'{x:.1f}' for x in meta['load_average_at_start'])}")
    console.print(PUBLISHED)


def markdown(payload: dict) -> str:
    """The README's table from a results file (`--markdown`)."""
    meta, args = payload["meta"], payload["meta"]["args"]
    lines = [
        f"{meta['device']}, torch {meta['torch']}, {args['length']}-token prompts, batch {args['batch']}, "
        f"{meta['total_seconds'] / 60:.0f} min in all (load average at start {meta['load_average_at_start'][0]:.1f}).",
        "",
        "| model | method | examples | wall s | ratio to fwd+bwd | fwd-pass eq. | peak RSS MB | CUDA peak MB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        model = r["model"].replace("planted:", "planted ")
        if r["status"] != "ok":
            note = r["status"] + (f"; {r['note']}" if r.get("note") else "")
            lines.append(f"| {model} | {r['method']} | {r['examples']} | - | - | - | - | - | {note} |")
            continue
        lines.append(
            f"| {model} | {r['method']} | {r['examples']} | {_seconds(r['seconds'])} | {r['ratio']:.1f}x | {r['forward_passes']:.0f} | "
            f"{r['peak_rss_mb']} | {r['cuda_peak_mb'] or '-'} | {r['note']} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Memory: measured peak RSS against the README's formulas (bench/memory_table.py)
# ----------------------------------------------------------------------------------------
def memory_check(args) -> list[dict]:
    """Peak RSS of each memory-bound step at two sizes, in fresh processes: the slope per example
    against `bench/memory_table.py`'s formulas (the README's table) on the GPT-2-small shape,
    float32. EAP and EAP-IG (one step per pass, as on a CPU): all examples in one batch. The
    engine's cached state and ACDC's state at the start of its search: batches of 4, and enough
    examples for them to outgrow the forward + backward measured first in the same process. One
    patched pass of exact patching (K = 32 single edges into layer 0) and one of the evaluation
    (K = 8 circuits with ablated edges in every layer): all examples in one batch. A fixed
    glibc mmap threshold makes freed large blocks go back to the OS, so peak RSS follows the live
    tensors (glibc's adaptive threshold otherwise keeps freed blocks in the heap and inflates the peak)."""
    import memory_table as mt

    from common import SHAPES

    sh = mt.Shape.from_cfg("gpt2-small-shape", SHAPES["gpt2-small-shape"])
    P, s = args.length, 4
    predicted = {
        "eap": mt.per_example(mt.eap, sh, P, s),
        "eap_ig": mt.per_example(mt.eap_ig, sh, P, s, 1),
        CACHE: mt.per_example(mt.engine_state, sh, P, s),
        ACDC_START: mt.per_example(mt.engine_state, sh, P, s) + mt.per_example(mt.acdc_tables, sh, P, s),
        PATCHED: mt.per_example(mt.patched_pass, sh, P, s, mt.EXACT_K, False),
        PATCHED_CIRCUITS: mt.per_example(mt.patched_pass, sh, P, s, mt.EVALUATION_K, True),
    }
    counts = {"eap": args.memory_batches, "eap_ig": args.memory_batches, CACHE: args.memory_examples,
              ACDC_START: args.memory_examples, PATCHED: args.memory_patched, PATCHED_CIRCUITS: args.memory_patched}
    rows = []
    for method in args.memory_methods or list(predicted):
        peaks, baselines = {}, {}
        for examples in counts[method]:
            batch = 4 if method in (CACHE, ACDC_START) else examples
            row = {"model": "gpt2-small-shape", "layers": 0, "method": method, "examples": examples}
            result = run_row(row, argparse.Namespace(**{**vars(args), "batch": batch, "budget": 900}), {"MALLOC_MMAP_THRESHOLD_": "131072"})
            if result["status"] != "ok":
                raise RuntimeError(f"{method} with {examples} examples: {result['status']}")
            peaks[examples] = result["peak_rss_mb"]
            baselines[examples] = result["rss_after_baseline_mb"]
            print(f"  {method}, {examples} examples (batch {batch}): peak RSS {peaks[examples]} MB "
                  f"(after the forward + backward: {baselines[examples]} MB)", file=sys.stderr, flush=True)
        lo, hi = min(peaks), max(peaks)
        measured = (peaks[hi] - peaks[lo]) / (hi - lo)
        rows.append({
            "method": method, "peak_rss_mb": peaks, "rss_after_baseline_mb": baselines, "measured_mb_per_example": measured,
            "predicted_mb_per_example": predicted[method] / 2**20,
            # the slope only measures the step if its peak is above the forward + backward's at both sizes
            "above_baseline": all(peaks[n] > baselines[n] for n in peaks),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--examples", type=int, default=4, help="examples for the fast methods and the evaluation (published: 200)")
    parser.add_argument("--slow-examples", type=int, default=2, help="examples for exact patching and ACDC")
    parser.add_argument("--slow-layers", type=int, default=2, help="GPT-2-shape layers for exact patching and ACDC")
    parser.add_argument("--full-slow", action="store_true", help="run exact and ACDC on the whole model with --examples")
    parser.add_argument("--length", type=int, default=15, help="prompt length in tokens (IOI prompts are about 15)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", nargs="*", help="only these methods (and/or 'evaluation')")
    parser.add_argument("--models", nargs="+", default=["gpt2-small-shape", "planted:layernorm_mlp"], help="gpt2-small-shape, tiny, planted:NAME")
    parser.add_argument("--budget", type=int, default=150, help="seconds one row may take before it is stopped")
    parser.add_argument("--out", default="all", help="results file name under bench/results/")
    parser.add_argument("--markdown", action="store_true", help="print the README table of bench/results/OUT.json (runs nothing)")
    parser.add_argument("--memory", action="store_true", help="check the README's memory formulas (bench/memory_table.py) by peak RSS")
    parser.add_argument("--memory-batches", nargs=2, type=int, default=[2, 8], metavar=("N1", "N2"), help="--memory: batch sizes for EAP and EAP-IG")
    parser.add_argument("--memory-examples", nargs=2, type=int, default=[16, 48], metavar=("N1", "N2"), help="--memory: examples the engine and ACDC cache")
    parser.add_argument("--memory-patched", nargs=2, type=int, default=[2, 8], metavar=("N1", "N2"), help="--memory: batch sizes for the patched passes")
    parser.add_argument("--memory-methods", nargs="*", help=f"--memory: only these of eap, eap_ig, {CACHE}, {ACDC_START}, {PATCHED}, {PATCHED_CIRCUITS}")
    args = parser.parse_args()
    if args.inner:
        model, layers, method, examples, length, batch = args.inner
        print(json.dumps(inner(model, int(layers), method, int(examples), int(length), int(batch))))
        return
    if args.markdown:
        from common import RESULTS

        print(markdown(json.loads((RESULTS / f"{args.out}.json").read_text())))
        return
    if args.memory:
        rows = memory_check(args)
        for r in rows:
            print(
                f"{r['method']}: peak RSS {r['peak_rss_mb']} MB; per example measured {r['measured_mb_per_example']:.1f} MB, "
                f"predicted {r['predicted_mb_per_example']:.1f} MB ({args.length} tokens, GPT-2-small shape, float32)"
            )
        command = "python bench/run_all.py " + " ".join(sys.argv[1:])
        print(f"wrote {write_results('memory', {'rows': rows, 'length': args.length, 'command': command})}")
        return
    import torch

    meta = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "args": vars(args),
        "published": PUBLISHED,
    }
    started = time.perf_counter()
    results = []
    for row in plan(args):
        result = run_row(row, args)
        results.append(result)
        status = f"{_seconds(result['seconds'])} s ({result['ratio']:.1f}x fwd+bwd)" if result["status"] == "ok" else result["status"]
        print(f"  {row['model']} {row['method']}: {status}", file=sys.stderr, flush=True)
    meta["total_seconds"] = time.perf_counter() - started
    print_table(results, args, meta)
    print(f"wrote {write_results(args.out, {'meta': meta, 'rows': results})}")


if __name__ == "__main__":
    main()
