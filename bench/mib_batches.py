"""Batch sizes of the MIB configs (`configs/mib/`), from the memory table's formulas.

    python bench/mib_batches.py                  # the table in the README (IOI, 1000 pairs, 76 GiB)
    python bench/mib_batches.py --gpu-gib 38 --length 64

The rule, per model (its shape below, its dtype as in the config):

1. Memory: `--gpu-gib` (76: an 80 GB card less the CUDA context), less the weights, times
   `--margin` (0.8: room for what the formulas of `bench/memory_table.py` leave out).
2. Prompts: `--length` tokens (24: IOI prompts are 14-20 GPT-2 tokens plus BOS; other
   tokenizers may split a word more).
3. Discovery (`method.batch_size`): the largest batch for which EAP-IG (5 steps, stacked per
   pass as on a GPU) fits, at most `--cap` (256: a GPU pass of 256 x 24 tokens is already
   large, a step stack shrinks beyond 64 / 5 rows anyway, and EAP-IG saves its progress after
   each batch) and at most the pairs. EAP-IG keeps nothing per example, so all `--pairs`
   (1000, MIB's IOI attribution set) are used.
4. Evaluation (`circuitctl evaluate faithfulness` reuses every pair's clean and ablation
   activations, then runs patched passes of K = 8 circuits per batch): every pair, since the
   engine's batch cache keeps on the GPU only up to `cache_gib` (default: half the GPU's free
   memory once the weights are loaded) and the rest on the host or recomputed; the batch is the
   largest for which that device cache and one patched pass fit (at most `--cap`). Pass it as
   an override: `evaluate faithfulness RUN_DIR method.batch_size=B`.

Gemma-2-2B normalises attention outputs after the heads are summed (TransformerLens's
`use_normalization_before_and_after`), which the adapter refuses today (edges are not additive):
its row is here for when that is supported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_table as mt  # noqa: E402

# TransformerLens's configs of the MIB circuit-track models (transformer_lens/loading_from_pretrained.py)
MIB_MODELS = {
    "gpt2": (mt.MODELS[0], "float32"),
    "Qwen/Qwen2.5-0.5B": (mt.Shape("Qwen2.5-0.5B", 24, 14, 2, 896, 64, 4864, 151936, gated_mlp=True, layer_norm=False), "bfloat16"),
    "google/gemma-2-2b": (mt.Shape("Gemma-2-2B", 26, 8, 4, 2304, 256, 9216, 256000, gated_mlp=True, layer_norm=False), "bfloat16"),
    "meta-llama/Llama-3.1-8B": (mt.Shape("Llama-3.1-8B", 32, 32, 8, 4096, 128, 14336, 128256, gated_mlp=True, layer_norm=False), "bfloat16"),
}
EAP_IG_STEPS = 5


def evaluation(sh: mt.Shape, n: int, batch: int, P: int, s: int, cache: float) -> float:
    """`circuitctl evaluate faithfulness` on the GPU: the pairs' engine state up to the device
    cache's budget `cache` (bytes; the rest waits on the host), plus one patched pass."""
    return min(mt.engine_state(sh, n, P, s), cache) + mt.patched_pass(sh, min(batch, n), P, s, mt.EVALUATION_K, True)


def eap_ig(sh: mt.Shape, batch: int, P: int, s: int) -> float:
    return mt.eap_ig(sh, batch, P, s, mt.eap_ig_steps_per_pass(EAP_IG_STEPS, batch, gpu=True))


def choose(sh: mt.Shape, dtype: str, pairs: int, length: int, gpu_gib: float, margin: float, cap: int) -> dict:
    """Discovery batch, evaluation pairs and evaluation batch for one model (the module docstring)."""
    s = mt.BYTES[dtype]
    weights = mt.n_parameters(sh) * s
    budget = (gpu_gib * mt.GIB - weights) * margin
    batch = min(cap, pairs, mt._largest(lambda b: eap_ig(sh, b, length, s), budget))
    cache = (gpu_gib * mt.GIB - weights) / 2  # cache_gib's default: half the free memory after the weights
    eval_pairs = pairs  # what the device cache cannot hold waits on the host or is recomputed
    eval_batch = min(cap, eval_pairs, mt._largest(lambda b: evaluation(sh, eval_pairs, b, length, s, cache), budget))
    return {
        "dtype": dtype,
        "weights_gib": weights / mt.GIB,
        "budget_gib": budget / mt.GIB,
        "batch": batch,
        "eap_ig_gib": eap_ig(sh, batch, length, s) / mt.GIB,
        "eval_pairs": eval_pairs,
        "eval_batch": eval_batch,
        "evaluation_gib": evaluation(sh, eval_pairs, eval_batch, length, s, cache) / mt.GIB,
    }


def table(pairs: int, length: int, gpu_gib: float, margin: float, cap: int) -> str:
    lines = [
        f"{length}-token prompts, {pairs} pairs, EAP-IG {EAP_IG_STEPS} steps; planned memory = ({gpu_gib:g} GiB - weights) x {margin:g}; "
        "GiB beyond the weights.",
        "",
        "| model | dtype | weights GiB | discover: batch | EAP-IG GiB | evaluate: pairs | evaluate: batch | evaluation GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (sh, dtype) in MIB_MODELS.items():
        c = choose(sh, dtype, pairs, length, gpu_gib, margin, cap)
        lines.append(
            f"| {name} | {dtype} | {c['weights_gib']:.1f} | {c['batch']} | {c['eap_ig_gib']:.1f} | {c['eval_pairs']} | "
            f"{c['eval_batch']} | {c['evaluation_gib']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000, help="prompt pairs (MIB's IOI attribution set: 1000)")
    parser.add_argument("--length", type=int, default=24, help="prompt length in tokens, BOS included")
    parser.add_argument("--gpu-gib", type=float, default=76, help="GPU memory (80 GB card less the CUDA context)")
    parser.add_argument("--margin", type=float, default=0.8, help="fraction of the memory left after the weights to plan for")
    parser.add_argument("--cap", type=int, default=256, help="largest batch size considered")
    args = parser.parse_args()
    print(table(args.pairs, args.length, args.gpu_gib, args.margin, args.cap))


if __name__ == "__main__":
    main()
