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


def estimate_plain(context, engine, tau: float, tests: int, sample: int) -> dict:
    """The plain version's time without running it: its clean / corrupt runs, then `sample`
    tests timed (each is one whole forward pass, whatever edge it removes), scaled to the
    `tests` + 1 metric evaluations the plain loop makes (its first value and one per test).
    A lower bound: the sampled tests remove one edge each, the real ones remove many more
    (more inputs to patch); at 4 layers it gave 117 s where the plain run took 150 s."""
    import torch

    value_of = plain_value_of(context, engine)
    graph = context.graph
    wall, cpu = time.perf_counter(), time.process_time()
    list(engine.states())  # the clean and corrupt runs, cached
    setup_wall, setup_cpu = time.perf_counter() - wall, time.process_time() - cpu
    edges = graph.edge_mask.nonzero().tolist()
    wall, cpu = time.perf_counter(), time.process_time()
    for u, v in edges[:: max(1, len(edges) // sample)][:sample]:  # spread over the layers
        removed = torch.zeros_like(graph.edge_mask)
        removed[u, v] = True
        value_of(removed)
    per_wall, per_cpu = (time.perf_counter() - wall) / sample, (time.process_time() - cpu) / sample
    return {"wall_s": setup_wall + (tests + 1) * per_wall, "cpu_s": setup_cpu + (tests + 1) * per_cpu}


def inner(variant: str, model_name: str, layers: int, batch: int, length: int, threads: int, extra: list[str]) -> dict:
    """One timed search. Everything after the model is built is timed, for every variant
    alike: the clean / corrupt runs (2 forward passes) and the search. `plain-estimate`
    (extra: sample size, the fast version's test count) times a sample of plain tests."""
    import torch
    from test_acdc import sequential_acdc  # imports tests/conftest.py, which sets 2 threads

    torch.set_num_threads(threads)

    from circuitctl.config.methods import AcdcSettings
    from circuitctl.methods import acdc

    context, tau = setup(model_name, layers, batch, length)
    cache_unembed_transpose(context.adapter.model)
    graph = context.graph
    if variant == "plain-estimate":
        sample, tests = (int(x) for x in extra)
        times = estimate_plain(context, context.engine(batch, keep_cache=True), tau, tests, sample)
        return {"variant": variant, "model": model_name, **times, "edges": graph.n_edges, "edges_tested": tests, "circuit": None}
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
    parser.add_argument("--inner", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=2, help="layers of the GPT-2-shaped model")
    parser.add_argument("--batch", type=int, default=8, help="prompt pairs (GPT-2-shaped model)")
    parser.add_argument("--length", type=int, default=16, help="tokens per prompt (GPT-2-shaped model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", action="store_true", help="also time the reference-style full forward per edge (slow)")
    parser.add_argument("--models", nargs="+", default=["gpt2-small-shape", "v_composition"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="only these variants (plain, the baseline, always runs)")
    parser.add_argument(
        "--estimate-plain", type=int, metavar="N",
        help="for deep models: do not run the plain version; time N of its tests and scale to the fast version's test count (marked estimated)",
    )
    args = parser.parse_args()
    if args.inner:
        variant, model_name, layers, batch, length, threads, *extra = args.inner
        print(json.dumps(inner(variant, model_name, int(layers), int(batch), int(length), int(threads), extra)))
        return
    from rich.console import Console
    from rich.table import Table

    variants = [v for v in VARIANTS if v != "reference-style" or args.reference]
    if args.variants:
        variants = [v for v in variants if v in args.variants or v == BASELINE or (args.estimate_plain and v == "fast")]
    rows = []
    for model_name in args.models:
        common = [model_name, str(args.layers), str(args.batch), str(args.length), str(args.threads)]
        runs = {v: run_inner(__file__, [v, *common]) for v in variants if not (args.estimate_plain and v == BASELINE)}
        if args.estimate_plain:  # the fast version first: the estimate needs its test count
            runs[BASELINE] = run_inner(__file__, ["plain-estimate", *common, str(args.estimate_plain), str(runs["fast"]["edges_tested"])])
        base = runs[BASELINE]
        for v in variants:
            r = runs[v]
            rows.append(
                {
                    "model": model_name + (f" ({args.layers} layers)" if model_name == "gpt2-small-shape" else ""),
                    "variant": v + (" (estimated)" if args.estimate_plain and v == BASELINE else ""),
                    "tau": TAUS[model_name],
                    "edges": r["edges"],
                    "edges_tested": r["edges_tested"],
                    "circuit_edges": len(r["circuit"] if r["circuit"] is not None else runs["fast"]["circuit"]),
                    "same_circuit_as_plain": None if base["circuit"] is None else r["circuit"] == base["circuit"],
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
            {True: "yes", False: "NO", None: "n/a"}[r["same_circuit_as_plain"]], f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
            f"{r['speedup_wall']:.1f}x", f"{r['speedup_cpu']:.1f}x",
        )
    Console(width=200).print(table)
    settings = {"layers": args.layers, "batch": args.batch, "length": args.length, "threads": args.threads, "estimate_plain": args.estimate_plain}
    print(f"wrote {write_results(f'acdc-{args.layers}layers-{args.threads}threads', {'settings': settings, 'rows': rows})}")


if __name__ == "__main__":
    main()
