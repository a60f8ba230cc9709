"""ACDC: the fast implementation against plain sequential ones, on the same model and data.

    python bench/bench_acdc.py [--layers 2] [--metric kl] [--tau T] [--repeat 2] [--batch 8] [--length 16]
                               [--threads 1] [--reference] [--variants ...] [--estimate-plain N]

Every variant runs in this one process, on the same model and data, interleaved: round r runs
every variant once (the order reversed every other round, so that a change of the machine's
load hits both ends alike), and the speed-up of round r is plain's time / the variant's time
in that round. The table shows the median over the rounds and their range.

Variants (same data, same tau):
  plain           THE BASELINE of the ratios: the plain sequential ACDC of
                  tests/ground_truth/test_acdc.py, one candidate edge at a time, each test one
                  whole patched forward pass from the embeddings (corrupt activations cached
                  once, as the reference caches them; logits at the answer positions only; no
                  TransformerLens split-qkv flags).
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
                  read at, and only the logits the metric reads (`circuitctl.metrics.readout`);
                  candidates batched with speculative replay.
Every variant must find the same circuit (checked). TransformerLens's unembedding copies W_U.T
on every call; all variants get the copy made once (`cache_unembed_transpose`), so that the
table compares the search algorithms, not that copy. Times are wall and CPU seconds from the
built model to the circuit (the clean / corrupt runs included), for every variant alike.

--estimate-plain N (for deep models): the plain version is not run; each round times N of its
tests (each one whole forward pass, whatever edge it removes) and scales them to the number of
tests the fast version made (marked estimated; a lower bound, see `estimate_plain`).

Models: GPT-2 small's shape (d_model 768, 12 heads, d_mlp 3072, vocab 50257; random weights)
cut to --layers layers, with --metric (KL by default, ACDC's); and the tiny planted model
`v_composition` with its logit difference.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "ground_truth"))
from common import build_model, write_results  # noqa: E402

VARIANTS = ("plain", "sequential", "reference-style", "layerwise", "fast")
BASELINE = "plain"
# tau per (model, metric): for the GPT-2 shape, circuits of 0.2-1.5% of the edges
TAUS = {("gpt2-small-shape", "kl"): 0.002, ("gpt2-small-shape", "logit_diff"): 0.01, ("gpt2-small-shape", "prob_diff"): 1e-5}
PLANTED_TAU = 1.0  # v_composition, logit difference


def cache_unembed_transpose(model) -> None:
    """TransformerLens's Unembed copies W_U.T into a contiguous tensor on every call (0.1 s for
    GPT-2's vocabulary, more than a layer); do it once, for every variant alike. Same result."""
    import torch.nn.functional as F

    unembed = model.unembed
    weight = unembed.W_U.T.contiguous()
    unembed.forward = lambda residual: unembed.hook_out(F.linear(unembed.hook_in(residual), weight, unembed.b_U))


def setup(model_name: str, layers: int, batch: int, length: int, metric: str = "kl"):
    """The DiscoveryContext of a model: random tokens for the GPT-2 shape with `metric`, the
    planted pairs (and their logit difference) otherwise."""
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
        context = DiscoveryContext(ModelAdapter(model), data, METRICS.get(metric), AblationConfig())
    else:
        from helpers import planted_context

        _, context = planted_context(model_name)
    cache_unembed_transpose(context.adapter.model)
    return context


def plain_value_of(context, engine):
    """Metric of a circuit by one whole patched forward (every layer) per batch."""
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


def estimate_plain(context, batch: int, tests: int, sample: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the plain version without running it: its clean / corrupt runs,
    then `sample` tests timed (each is one whole forward pass, whatever edge it removes),
    scaled to the `tests` + 1 metric evaluations the plain loop makes (its first value and one
    per test). A lower bound: the sampled tests remove one edge each, the real ones remove many
    more (more inputs to patch); at 4 layers it gave 117 s where the plain run took 150 s."""
    import torch

    engine = context.engine(batch, keep_cache=True)
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
    return setup_wall + (tests + 1) * per_wall, setup_cpu + (tests + 1) * per_cpu


def run_variant(variant: str, context, tau: float, batch: int) -> dict:
    """One timed search. Everything after the model is built is timed, for every variant
    alike: the clean / corrupt runs (2 forward passes) and the search."""
    from test_acdc import sequential_acdc

    from circuitctl.config.methods import AcdcSettings
    from circuitctl.methods import acdc

    graph = context.graph
    gc.collect()
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
    return {"wall_s": wall, "cpu_s": cpu, "edges_tested": tests, "circuit": graph.mask_to_edges(membership)}


def load() -> str:
    """The machine's load averages (1, 5, 15 minutes), noted with every measurement."""
    import os

    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(model_name: str, variants: list[str], args) -> list[dict]:
    """Rounds of every variant on one model, interleaved; one table row per variant."""
    metric = args.metric if model_name == "gpt2-small-shape" else "logit_diff"
    tau = args.tau if args.tau is not None else TAUS.get((model_name, metric), PLANTED_TAU)
    context = setup(model_name, args.layers, args.batch, args.length, metric)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    loads = [load()]
    for round_ in range(args.repeat):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for v in order:
            if v == BASELINE and args.estimate_plain:
                continue
            runs[v].append(run_variant(v, context, tau, args.batch))
        if args.estimate_plain:  # after the fast version: the estimate needs its test count
            tests = runs["fast"][-1]["edges_tested"]
            wall, cpu = estimate_plain(context, args.batch, tests, args.estimate_plain)
            runs[BASELINE].append({"wall_s": wall, "cpu_s": cpu, "edges_tested": tests, "circuit": None})
        loads.append(load())
    base = runs[BASELINE]
    rows = []
    for v in variants:
        r = runs[v]
        first = r[0]
        reference_circuit = base[0]["circuit"]
        circuit = first["circuit"] if first["circuit"] is not None else runs["fast"][0]["circuit"]
        same = None if reference_circuit is None else all(x["circuit"] == reference_circuit for x in r)
        speedups = [b["wall_s"] / x["wall_s"] for b, x in zip(base, r)]
        speedups_cpu = [b["cpu_s"] / x["cpu_s"] for b, x in zip(base, r)]
        rows.append(
            {
                "model": model_name + (f" ({args.layers} layers)" if model_name == "gpt2-small-shape" else ""),
                "metric": metric,
                "variant": v + (" (estimated)" if args.estimate_plain and v == BASELINE else ""),
                "tau": tau,
                "edges": context.graph.n_edges,
                "edges_tested": first["edges_tested"],
                "circuit_edges": len(circuit),
                "same_circuit_as_plain": same,
                "wall_s": [round(x["wall_s"], 3) for x in r],
                "cpu_s": [round(x["cpu_s"], 3) for x in r],
                "speedup_wall": [round(x, 2) for x in speedups],
                "speedup_cpu": [round(x, 2) for x in speedups_cpu],
                "load": loads,
            }
        )
    return rows


def _span(values: list[float], unit: str = "") -> str:
    """median (min-max) of a list."""
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.2f}{unit}"
    return f"{middle:.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="layers of the GPT-2-shaped model")
    parser.add_argument("--metric", default="kl", choices=["kl", "logit_diff", "prob_diff"], help="metric on the GPT-2-shaped model")
    parser.add_argument("--tau", type=float, help="threshold (default: per model and metric, see TAUS)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of every variant (interleaved)")
    parser.add_argument("--batch", type=int, default=8, help="prompt pairs (GPT-2-shaped model)")
    parser.add_argument("--length", type=int, default=16, help="tokens per prompt (GPT-2-shaped model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", action="store_true", help="also time the reference-style full forward per edge (slow)")
    parser.add_argument("--models", nargs="+", default=["gpt2-small-shape", "v_composition"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="only these variants (plain, the baseline, always runs)")
    parser.add_argument(
        "--estimate-plain", type=int, metavar="N",
        help="for deep models: do not run the plain version; time N of its tests per round and scale to the fast version's test count (marked estimated)",
    )
    args = parser.parse_args()

    import torch
    import test_acdc  # noqa: F401  (imports tests/conftest.py, which sets 2 threads: set ours after it)

    torch.set_num_threads(args.threads)
    from rich.console import Console
    from rich.table import Table

    variants = [v for v in VARIANTS if v != "reference-style" or args.reference]
    if args.variants:
        variants = [v for v in variants if v in args.variants or v == BASELINE or (args.estimate_plain and v == "fast")]
    rows = [row for model_name in args.models for row in measure(model_name, variants, args)]
    title = (
        f"ACDC search time, CPU, {args.threads} thread(s), {args.repeat} interleaved round(s): median (range); "
        f"GPT-2 shape: {args.batch} pairs x {args.length} tokens"
    )
    table = Table(title=title)
    for column in ("model", "metric", "variant", "tau", "edges (tested)", "circuit", "same", "wall s", "CPU s", "speed-up wall", "speed-up CPU", "load"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["model"], r["metric"], r["variant"], f"{r['tau']:g}", f"{r['edges']} ({r['edges_tested']})", str(r["circuit_edges"]),
            {True: "yes", False: "NO", None: "n/a"}[r["same_circuit_as_plain"]], _span(r["wall_s"]), _span(r["cpu_s"]),
            _span(r["speedup_wall"], "x"), _span(r["speedup_cpu"], "x"), " / ".join(x.split()[0] for x in r["load"]),
        )
    Console(width=220).print(table)
    settings = {
        "layers": args.layers, "metric": args.metric, "batch": args.batch, "length": args.length, "threads": args.threads,
        "repeat": args.repeat, "estimate_plain": args.estimate_plain,
    }
    name = f"acdc-{args.layers}layers-{args.metric}-{args.threads}threads"
    print(f"wrote {write_results(name, {'settings': settings, 'rows': rows})}")


if __name__ == "__main__":
    main()
