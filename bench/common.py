"""Shared helpers for the benchmarks: model shapes, timing, peak memory, the measured steps,
result tables.

Each measurement of `run_all.py` runs in a fresh subprocess so its peak RSS is its own;
`gpu_check.py` runs its rows in one worker process and reads the GPU's peak per row.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    # GPT-2 small's shape with random weights: same cost as the real model, no download
    "gpt2-small-shape": dict(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024,
        act_fn="gelu_new", normalization_type="LN",
    ),
    "tiny": dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=64, n_ctx=32, act_fn="gelu", normalization_type="LN"),
    # Llama-3-8B's shape (grouped-query attention, gated SiLU MLPs, RMSNorm, rotary), random weights
    "llama-3-8b-shape": dict(
        n_layers=32, d_model=4096, n_heads=32, n_key_value_heads=8, d_head=128, d_mlp=14336, d_vocab=128256, n_ctx=2048,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=128, rotary_base=500000,
        gated_mlp=True, final_rms=True,
    ),
    "tiny-gqa": dict(
        n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=64, n_ctx=160,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8, gated_mlp=True, final_rms=True,
    ),
}

# Steps that are not discovery methods (`run_step`): what `circuitctl evaluate faithfulness` runs;
# for memory checks, the engine's state cached for every example (ACDC and the evaluation keep
# it), ACDC's state when its search starts, one patched pass of exact patching's K single edges
# and one of the evaluation's K circuits.
EVALUATION = "evaluation"
CACHE, ACDC_START, PATCHED, PATCHED_CIRCUITS = "engine_cache", "acdc_start", "patched_pass", "patched_circuits"


def build_model(shape: str, seed: int = 0, device: str | None = None, **overrides):
    """A HookedTransformer of a named shape with random weights. With `device`, the weights are
    created and initialised there (an 8B-parameter shape is built on the GPU in seconds)."""
    warnings.filterwarnings("ignore")
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    fields = {**SHAPES[shape], **overrides, "seed": seed}
    if device is None:
        return HookedTransformer(HookedTransformerConfig(**fields))
    with torch.device(device):
        return HookedTransformer(HookedTransformerConfig(**fields, device=str(device)))


def random_pairs(vocab: int, n: int, length: int, seed: int = 0):
    """IOI-shaped random prompt pairs: n clean and n corrupt prompts of `length` tokens, one
    answer and one wrong answer each, read at the last token (the same draws for every benchmark)."""
    import torch

    from circuitctl.tasks.data import TaskData

    g = torch.Generator().manual_seed(seed)

    def tokens(*shape):
        return torch.randint(0, vocab, shape, generator=g)

    return TaskData(tokens(n, length), tokens(n, length), torch.full((n,), length), tokens(n, 1), tokens(n, 1), {})


def synchronize(device) -> None:
    """Wait for the GPU's queued work (timings and memory peaks are read after it)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def forward_backward(adapter, data, batch: int) -> None:
    """A plain clean forward + backward to the input embeddings (parameters frozen), batched:
    the unit the benchmarks' ratios are measured in."""
    import torch

    for piece in data.batches(batch):
        piece = piece.to(adapter.device)
        resid = adapter.embed(piece.clean).detach().requires_grad_(True)
        with torch.enable_grad():
            for block in adapter.model.blocks:
                resid = block(resid)
            logits = adapter.unembed_at(resid, piece.answer_positions)
            (logits.gather(1, piece.answers[:, :1]) - logits.gather(1, piece.wrong[:, :1])).sum().backward()


def evaluation_step(context, batch: int) -> float:
    """What `evaluate faithfulness` runs: m(full), m(empty), and 2 + 2 x 10 circuits (f(C),
    completeness, the MIB curves) from one ranking. Returns forward-pass equivalents."""
    import torch

    from circuitctl.metrics.faithfulness import MIB_PERCENTAGES, n_edges_for_percentage, top_edges

    graph = context.graph
    engine = context.engine(batch, keep_cache=True)
    engine.full_and_empty()
    scores = torch.randn(graph.n_upstream, graph.n_downstream, generator=torch.Generator().manual_seed(0))
    keep = [top_edges(scores, graph.edge_mask, n_edges_for_percentage(p, graph.n_edges), absolute) for absolute in (False, True) for p in MIB_PERCENTAGES]
    circuit = keep[5]
    engine.circuit_values(torch.stack([circuit, graph.edge_mask & ~circuit, *keep]))
    return 2 + 1 + 2 + len(keep)  # clean, corrupt, empty, circuit, complement, curves


def run_step(context, step: str, batch: int, settings: dict | None = None, record: dict | None = None) -> float:
    """Run one benchmark step on `context` (a DiscoveryContext): a discovery method (with
    `settings` beside the defaults), the evaluation, or one of the memory steps above.
    Returns the forward-pass equivalents it reports; a method's own circuit size (ACDC) goes
    into `record["edges_kept"]`."""
    import torch

    from circuitctl.config.methods import METHODS

    adapter = context.adapter
    if step == CACHE:
        engine = context.engine(batch, keep_cache=True)
        return 2 * len(list(engine.states())) / max(1, -(-context.data.n // batch))
    if step == ACDC_START:  # what ACDC's incremental evaluator holds when its search starts
        from circuitctl.methods.acdc.nodes import NodeComputer
        from circuitctl.methods.acdc.incremental import IncrementalSearch

        IncrementalSearch(context.engine(batch, keep_cache=True), NodeComputer(adapter)).current_value()
        return 2.0
    if step in (PATCHED, PATCHED_CIRCUITS):
        graph = context.graph
        if step == PATCHED:  # exact patching's first patched pass: K single edges into layer 0
            from circuitctl.methods.exact import single_edge_chunks

            K = METHODS.get("exact").settings(name="exact").candidates_per_pass
            us, vs = (torch.tensor(x) for x in zip(*next(single_edge_chunks(graph, K))))
            masks = torch.zeros(len(us), graph.n_upstream, graph.n_downstream, dtype=torch.bool)
            masks[torch.arange(len(us)), us, vs] = True
        else:  # the evaluation's patched pass: K circuits with ablated edges in every layer
            from memory_table import EVALUATION_K

            masks = graph.edge_mask[None].repeat(EVALUATION_K, 1, 1)  # the empty circuit, K times
        engine = context.engine(batch)
        for state in engine.states():
            engine.patched_metric(state, masks)
        return 2.0 + len(masks)
    if step == EVALUATION:
        return evaluation_step(context, batch)
    from circuitctl.methods.base import run_method

    result = run_method(context, METHODS.get(step).settings(name=step, batch_size=batch, **(settings or {})))
    if record is not None and getattr(result, "membership", None) is not None:
        record["edges_kept"] = int(result.membership.sum())
    return result.stats["forward_passes"] if hasattr(result, "stats") else result.forward_passes  # sfc: a feature circuit


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_it(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def time_interleaved(fns: dict, rounds: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each `fns[name]()` over `rounds` rounds, the variants taking turns within a
    round: on a shared machine whose speed drifts, a ratio of two variants timed in the same
    rounds is steadier than one of timings taken minutes apart."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    """The middle value (the upper one of an even count): a timing that was really measured."""
    return sorted(values)[len(values) // 2]


def run_inner(script: str, args: list[str]) -> dict:
    """Run `script --inner ARGS` in a subprocess and parse the JSON it prints last."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, script, "--inner", *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
