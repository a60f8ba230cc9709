"""Cost of one edge-pruning step relative to one plain forward + backward on the same batch.

    python bench/bench_edge_pruning.py [--batch 8] [--length 16] [--shape gpt2-small-shape] [--threads 1]
    python bench/bench_edge_pruning.py --smoke        # a tiny model, seconds: checks that the script works

All variants run in one process on the same model and batch, taking turns in each of several
rounds after a warm-up; a ratio is the median over the rounds of that round's ratio (this
machine's speed drifts by 10 % and more within minutes, so timings minutes apart mislead):

  plain fwd+bwd (activations): blocks, final LayerNorm and unembedding at the answer position,
      KL to fixed reference logits, backward to the input embeddings with the weights frozen
      (the gradient work edge pruning needs: activations, not weights);
  plain fwd+bwd (params): the same with weight gradients, as a training step;
  edge-pruning step: sample the hard-concrete masks, the masked forward (every node recomputed,
      one mixing product per layer for all edges), KL + Lagrangian, backward to the log-alphas
      and the multipliers, AdamW step; the ablation run's outputs and the reference logits come
      from the cache filled before timing (as in training, where they are computed once).
Target (issue 15): the edge-pruning step within 2x of the activations baseline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, median, random_pairs, time_interleaved, write_results  # noqa: E402


def measure(shape: str, batch: int, length: int, repeats: int) -> dict:
    import torch

    from circuitctl.config.methods import EdgePruningSettings
    from circuitctl.config.schema import AblationConfig
    from circuitctl.methods import edge_pruning
    from circuitctl.methods.base import DiscoveryContext
    from circuitctl.methods.mask_training import TrainingData
    from circuitctl.metrics.metrics import METRICS
    from circuitctl.models.adapter import ModelAdapter

    model = build_model(shape)
    data = random_pairs(model.cfg.d_vocab, batch, length)
    adapter = ModelAdapter(model)
    graph = adapter.graph
    context = DiscoveryContext(adapter, data, METRICS.get("kl"), AblationConfig())
    settings = EdgePruningSettings(batch_size=batch, steps=1000, sparsity_warmup_steps=500)
    training = TrainingData(context, batch, cache_mib=1e9)
    kl = METRICS.get("kl")
    positions = data.answer_positions
    reference = adapter.run(data.clean, positions).logits

    def plain(with_params: bool):
        def step():
            model.requires_grad_(with_params)
            with torch.enable_grad():
                resid = adapter.embed(data.clean).detach().requires_grad_(not with_params)
                for block in model.blocks:
                    resid = block(resid)
                logits = adapter.unembed_at(resid, positions)
                kl(logits, data, reference).mean().backward()
            model.zero_grad(set_to_none=True)

        return step

    pruner = edge_pruning._Pruner(context, settings, torch.full((graph.n_upstream, graph.n_downstream), 10.0))
    edge_mask = graph.edge_mask
    counter = iter(range(10**9))

    def pruning_step():
        model.requires_grad_(False)
        row = edge_pruning._step(context, settings, training, pruner, next(counter) % 400 + 1, 0.9, 0.0, edge_mask)
        pruner.optimizer.step()
        return row

    times = time_interleaved(
        {"plain_fwd_bwd_activations": plain(False), "plain_fwd_bwd_params": plain(True), "edge_pruning_step": pruning_step},
        rounds=repeats,
    )
    model.requires_grad_(False)
    seconds = {name: median(values) for name, values in times.items()}

    def ratio(baseline: str) -> float:
        return median([step / base for step, base in zip(times["edge_pruning_step"], times[baseline])])

    return {
        "shape": shape,
        "batch": batch,
        "length": length,
        "n_edges": graph.n_edges,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "rounds": times,
        "ratio_vs_activations": ratio("plain_fwd_bwd_activations"),
        "ratio_vs_params": ratio("plain_fwd_bwd_params"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="gpt2-small-shape")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9, help="rounds, each variant once per round")
    parser.add_argument("--smoke", action="store_true", help="tiny model, batch 2, 8 tokens, 2 repeats")
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.batch, args.length, args.repeats = "tiny", 2, 8, 2
    import torch

    torch.set_num_threads(args.threads)
    result = measure(args.shape, args.batch, args.length, args.repeats)
    s = result["seconds"]
    print(f"{result['shape']}: {result['n_edges']} edges, batch {result['batch']} x {result['length']} tokens, {result['threads']} thread(s)")
    print(f"{'variant':32s} {'seconds':>9s} {'ratio':>7s}")
    for name, value in s.items():
        print(f"{name:32s} {value:9.4f} {value / s['plain_fwd_bwd_activations']:7.2f}")
    print(f"edge-pruning step / plain fwd+bwd: {result['ratio_vs_activations']:.2f}x (activations), {result['ratio_vs_params']:.2f}x (with weight gradients)")
    name = "edge_pruning_step_smoke" if args.smoke else "edge_pruning_step"
    print(f"wrote {write_results(name, result)}")


if __name__ == "__main__":
    main()
