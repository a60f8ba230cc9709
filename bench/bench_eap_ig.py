"""EAP-IG time over EAP time on the same batch (and peak memory).

    python bench/bench_eap_ig.py [--layers 4] [--batch 8] [--length 16] [--steps 5] [--threads 2]

Model: GPT-2 small's shape (d_model 768, 12 heads, d_mlp 3072, vocab 50257) cut to --layers
layers, random weights; random prompt pairs. Every measurement runs in its own subprocess with
--threads torch threads; times are medians of 3 runs after a warm-up of the whole method
(`eap_ig.discover` / `eap.discover`, one batch). On a machine shared with other jobs set
OMP_WAIT_POLICY=PASSIVE (or use --threads 1): busy-waiting OpenMP threads on oversubscribed
cores made every time here 5-10x longer and the ratios meaningless.

Rows: EAP; EAP-IG inputs one step per pass (the CPU default) and with all steps stacked along
the batch (the GPU default, up to 64 rows); EAP-IG activations (m passes per layer component,
each from its layer on). Expected ratio for the inputs variant: about the number of steps
(EAP = ablation forward + clean forward/backward; EAP-IG = ablation forward + clean forward +
m forward/backward passes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, peak_rss_mb, random_pairs, run_inner, time_it, write_results  # noqa: E402

KINDS = {  # EAP-IG settings (None: EAP); "stacked" puts all steps in one forward/backward
    "eap": None,
    "eap_ig_inputs": {"variant": "inputs", "steps_per_pass": 1},
    "eap_ig_inputs_stacked": {"variant": "inputs", "steps_per_pass": None},
    "eap_ig_activations": {"variant": "activations", "steps_per_pass": 1},
}


def inner(kind: str, layers: int, batch: int, length: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from circuitctl.config.methods import EapIgSettings, EapSettings
    from circuitctl.config.schema import AblationConfig
    from circuitctl.methods import eap, eap_ig
    from circuitctl.methods.base import DiscoveryContext
    from circuitctl.metrics.metrics import METRICS
    from circuitctl.models.adapter import ModelAdapter

    model = build_model("gpt2-small-shape", n_layers=layers)
    data = random_pairs(model.cfg.d_vocab, batch, length)
    context = DiscoveryContext(ModelAdapter(model), data, METRICS.get("logit_diff"), AblationConfig())
    rss_before = peak_rss_mb()
    if KINDS[kind] is None:
        settings = EapSettings(batch_size=batch)
        seconds = time_it(lambda: eap.discover(context, settings))
    else:
        options = {**KINDS[kind], "steps_per_pass": KINDS[kind]["steps_per_pass"] or steps}
        settings = EapIgSettings(batch_size=batch, steps=steps, **options)
        seconds = time_it(lambda: eap_ig.discover(context, settings))
    return {"kind": kind, "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner", nargs=6, metavar=("KIND", "LAYERS", "BATCH", "LENGTH", "STEPS", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.inner:
        kind, layers, batch, length, steps, threads = args.inner
        print(json.dumps(inner(kind, int(layers), int(batch), int(length), int(steps), int(threads))))
        return
    from rich.console import Console
    from rich.table import Table

    shape = [str(args.layers), str(args.batch), str(args.length), str(args.steps), str(args.threads)]
    runs = {kind: run_inner(__file__, [kind, *shape]) for kind in KINDS}
    eap_seconds = runs["eap"]["seconds"]
    rows = [
        {
            "method": kind,
            "seconds": r["seconds"],
            "ratio_vs_eap": r["seconds"] / eap_seconds,
            "peak_rss_mb": round(r["peak_rss_mb"]),
            "rss_before_mb": round(r["rss_before_mb"]),
        }
        for kind, r in runs.items()
    ]
    title = (
        f"EAP-IG vs EAP, GPT-2-small shape with {args.layers} layers, batch {args.batch}, "
        f"{args.length} tokens, {args.steps} steps, CPU ({args.threads} threads)"
    )
    table = Table(title=title)
    for column in ("method", "time (s)", "time / EAP", "peak RSS MB", "RSS after model MB"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["method"], f"{r['seconds']:.3f}", f"{r['ratio_vs_eap']:.2f}x", str(r["peak_rss_mb"]), str(r["rss_before_mb"]))
    Console().print(table)
    payload = {
        "model": "gpt2-small-shape", "layers": args.layers, "batch": args.batch, "length": args.length,
        "steps": args.steps, "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows,
    }
    print(f"wrote {write_results('eap_ig', payload)}")


if __name__ == "__main__":
    main()
