"""ACDC: the fast implementation against plain sequential ones, on the same model and data.

    python bench/bench_acdc.py [--layers 2] [--batch 8] [--length 16] [--threads 1] [--reference]

Variants (each in its own subprocess, same data, same tau):
  plain           THE BASELINE of the ratios: the plain sequential ACDC of tests/test_acdc.py, one
                  candidate edge at a time, each test one whole patched forward pass from the
                  embeddings (corrupt activations cached once, as the reference caches them;
                  logits at the answer positions only; no TransformerLens split-qkv flags).
  sequential      the same loop with each test started at the tested input's layer from cached
                  clean activations (`PatchingEngine.metric_values`): one of the speed-ups, shown
                  separately.
  reference-style (--reference) the same loop with every test a full TransformerLens forward
                  with use_split_qkv_input / use_attn_result (corrupt activations cached), which
                  is what the reference implementation runs per edge.
  layerwise       circuitctl's ACDC with evaluator=layerwise: candidates batched (K masks per
                  `metric_values` call) with speculative replay.
  fast            circuitctl's ACDC default (evaluator=incremental): only the tested node and its
                  descendants in the current circuit are recomputed, at the positions they are
                  read at; candidates batched with speculative replay.
Every variant must find the same circuit (checked). TransformerLens's unembedding copies W_U.T
on every call; all variants get the copy made once (`cache_unembed_transpose`), so that the
table compares the search algorithms, not that copy. Times are wall and CPU seconds from the
built model to the circuit (the clean / corrupt runs included), for every variant alike.

Models: GPT-2 small's shape (d_model 768, 12 heads, d_mlp 3072, vocab 50257; random weights)
cut to --layers layers, KL metric (ACDC's default); and the tiny planted model `v_composition`
with the logit difference. Target (issue 3): fast >= 10x faster than plain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import build_model, run_inner, write_results  # noqa: E402

VARIANTS = ("plain", "sequential", "reference-style", "layerwise", "fast")
BASELINE = "plain"
TAUS = {"gpt2-small-shape": 0.002, "v_composition": 1.0}


def cache_unembed_transpose(model) -> None:
    """TransformerLens's Unembed copies W_U.T into a contiguous tensor on every call (0.1 s for
    GPT-2's vocabulary, more than a layer); do it once, for every variant alike. Same result."""
    import torch.nn.functional as F

    unembed = model.unembed
    weight = unembed.W_U.T.contiguous()
    unembed.forward = lambda residual: unembed.hook_out(F.linear(unembed.hook_in(residual), weight, unembed.b_U))


def setup(model_name: str, layers: int, batch: int, length: int):
    """(context, tau) for a model: random tokens for the GPT-2 shape, the planted pairs otherwise."""
    import torch

    from circuitctl.config.schema import AblationConfig
    from circuitctl.methods.base import DiscoveryContext
    from circuitctl.metrics.metrics import METRICS
    from circuitctl.models.adapter import ModelAdapter
    from circuitctl.tasks.data import TaskData

    if model_name == "gpt2-small-shape":
        model = build_model(model_name, n_layers=layers)
        vocab = model.cfg.d_vocab
        g = torch.Generator().manual_seed(0)
        tokens = [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(2)]
        answers = torch.randint(0, vocab, (batch, 2), generator=g)
        data = TaskData(tokens[0], tokens[1], torch.full((batch,), length), answers[:, :1], answers[:, 1:], {})
        context = DiscoveryContext(ModelAdapter(model), data, METRICS.get("kl"), AblationConfig())
    else:
        from helpers import planted_context

        _, context = planted_context(model_name)
    return context, TAUS[model_name]


def plain_value_of(context, engine):
    """Metric of a circuit by one whole patched forward (every layer) per batch."""
    import torch

    adapter = context.adapter

    def value_of(removed):
        total = 0.0
        for state in engine.local_states():
            logits = adapter.patched_logits(state.clean, state.ablation_outputs, removed[None], state.batch.answer_positions, from_layer=0)[0]
            total += float(engine.metric_of_logits(logits, state).double().sum())
        return total / context.data.n

    return value_of


def reference_value_of(context):
    """Metric of a circuit by one full TransformerLens forward with the reference's hook flags."""
    import torch
    from reference_patching import ReferencePatcher

    data, graph = context.data, context.graph
    patcher = ReferencePatcher(context.adapter.model)
    ablation = patcher.node_outputs(data.corrupt)  # cached once, as the reference caches its corrupt run
    rows = torch.arange(data.n)
    clean = patcher.run(data.clean, [], ablation_outputs=ablation)[rows, data.answer_positions]

    def value_of(removed):
        logits = patcher.run(data.clean, graph.mask_to_edges(removed), ablation_outputs=ablation)
        return float(context.metric(logits[rows, data.answer_positions], data, clean).double().mean())

    return value_of


def inner(variant: str, model_name: str, layers: int, batch: int, length: int, threads: int) -> dict:
    """One timed search. Everything after the model is built is timed, for every variant
    alike: the clean / corrupt runs (2 forward passes) and the search."""
    import torch
    from test_acdc import sequential_acdc  # imports tests/conftest.py, which sets 2 threads

    torch.set_num_threads(threads)

    from circuitctl.config.methods import AcdcSettings
    from circuitctl.methods import acdc

    context, tau = setup(model_name, layers, batch, length)
    cache_unembed_transpose(context.adapter.model)
    graph = context.graph
    wall, cpu = time.perf_counter(), time.process_time()
    if variant in ("plain", "sequential", "reference-style"):
        engine = context.engine(batch, keep_cache=True)
        value_of = {"plain": plain_value_of(context, engine), "reference-style": reference_value_of(context)}.get(variant)
        membership, changes = sequential_acdc(engine, tau, context.metric.importance_sign, value_of=value_of)
        tests = len(changes)
    else:
        evaluator = "incremental" if variant == "fast" else "layerwise"
        result = acdc.discover(context, AcdcSettings(tau=tau, batch_size=batch, evaluator=evaluator))
        membership, tests = result.membership, result.extra["edges_tested"]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "variant": variant,
        "model": model_name,
        "wall_s": wall,
        "cpu_s": cpu,
        "edges": graph.n_edges,
        "edges_tested": tests,
        "circuit": graph.mask_to_edges(membership),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=2, help="layers of the GPT-2-shaped model")
    parser.add_argument("--batch", type=int, default=8, help="prompt pairs (GPT-2-shaped model)")
    parser.add_argument("--length", type=int, default=16, help="tokens per prompt (GPT-2-shaped model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", action="store_true", help="also time the reference-style full forward per edge (slow)")
    parser.add_argument("--models", nargs="+", default=["gpt2-small-shape", "v_composition"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="only these variants (plain, the baseline, always runs)")
    args = parser.parse_args()
    if args.inner:
        variant, model_name, layers, batch, length, threads = args.inner
        print(json.dumps(inner(variant, model_name, int(layers), int(batch), int(length), int(threads))))
        return
    from rich.console import Console
    from rich.table import Table

    variants = [v for v in VARIANTS if v != "reference-style" or args.reference]
    if args.variants:
        variants = [v for v in variants if v in args.variants or v == BASELINE]
    rows = []
    for model_name in args.models:
        runs = {v: run_inner(__file__, [v, model_name, str(args.layers), str(args.batch), str(args.length), str(args.threads)]) for v in variants}
        base = runs[BASELINE]
        for v in variants:
            r = runs[v]
            rows.append(
                {
                    "model": model_name + (f" ({args.layers} layers)" if model_name == "gpt2-small-shape" else ""),
                    "variant": v,
                    "tau": TAUS[model_name],
                    "edges": r["edges"],
                    "edges_tested": r["edges_tested"],
                    "circuit_edges": len(r["circuit"]),
                    "same_circuit_as_plain": r["circuit"] == base["circuit"],
                    "wall_s": round(r["wall_s"], 3),
                    "cpu_s": round(r["cpu_s"], 3),
                    "speedup_wall": round(base["wall_s"] / r["wall_s"], 2),
                    "speedup_cpu": round(base["cpu_s"] / r["cpu_s"], 2),
                }
            )
    title = f"ACDC search time, CPU, {args.threads} thread(s); GPT-2 shape: {args.batch} pairs x {args.length} tokens, KL"
    table = Table(title=title)
    for column in ("model", "variant", "tau", "edges (tested)", "circuit", "same", "wall s", "CPU s", "speed-up wall", "speed-up CPU"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["model"], r["variant"], f"{r['tau']:g}", f"{r['edges']} ({r['edges_tested']})", str(r["circuit_edges"]),
            "yes" if r["same_circuit_as_plain"] else "NO", f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
            f"{r['speedup_wall']:.1f}x", f"{r['speedup_cpu']:.1f}x",
        )
    Console(width=200).print(table)
    settings = {"layers": args.layers, "batch": args.batch, "length": args.length, "threads": args.threads}
    print(f"wrote {write_results(f'acdc-{args.layers}layers-{args.threads}threads', {'settings': settings, 'rows': rows})}")


if __name__ == "__main__":
    main()
