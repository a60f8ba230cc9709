"""What EAP, EAP-IG, ACDC and exact patching hold in memory, from the model's shape: the README's table.

    python bench/memory_table.py                       # batch 8, 128 tokens, bfloat16 weights, ACDC on 100 examples
    python bench/memory_table.py --dtype float32 --length 15 --batch 1 --examples 1   # per example, float32

Prints markdown. The formulas follow what the code allocates (float32 scores and difference
buffers whatever the model's dtype; s = bytes per element of the model's dtype):

* U = 1 + L (H + 1) upstream nodes (input, every query head, every MLP); with grouped-query
  attention the k / v *inputs* are per KV head, the outputs stay per head (`circuitctl/graph/graph.py`).
* EAP (`methods/eap.py`, `ModelAdapter.input_gradients`), per batch: the ablation run's node
  outputs and the clean run's ([U, B, P, d], s each) and their float32 difference (4), the
  activations kept for the per-layer input gradients (resid_pre, q/k/v, mlp_in, mlp_out), the
  gradients at hook_q/k/v / mlp_in, and one layer's per-input gradients (about 2 copies of
  [H + 2G + 1, B, P, d]). Before that buffer exists, autograd's saved activations (approximate:
  12 d + 3 d_mlp (4 when gated) + 2 H P per token and layer) sit beside the ablation outputs.
* EAP-IG, inputs variant (`methods/eap_ig.py`): the same plus the clean run's residual streams
  [L + 1, B, P, d]; k stacked steps multiply the gradient pass (not the [U, B, P, d] buffers).
  One step at a time on the CPU, min(steps, 64 / B) on a GPU.
* The patching engine's state for a batch (`patching/engine.py`): clean node outputs, clean
  residual streams and ablation outputs, (2U + L + 1) [B, P, d] tables, and the clean logits at
  the answer positions. ACDC and the evaluation keep it for *every example* (keep_cache).
* One patched pass of K circuits (`ModelAdapter.patched_logits`): every recomputed node's
  difference [K, B, P, d] is kept for the later layers' inputs and, when those have ablated
  edges too, concatenated once more to be read: about 2 K (U - 1) [B, P, d] tables when the
  first ablated edge is in layer 0 (K (U - 1) for exact patching's single edges).
* ACDC (`methods/acdc.py`): the engine state for all N examples, plus, with the incremental
  evaluator (models without grouped-query attention), the clean-minus-ablation and current-circuit
  tables (2 more [U, N, P, d]) and their answer-position copies; as it runs, it also caches current
  node inputs (at most [V, N, P, d], V downstream inputs; not in the table). Grouped-query models
  use the layerwise evaluator: one patched pass of K = 16 trials per batch.
* Exact patching (`methods/exact.py`): the engine state of one batch and patched passes of
  K = 32 single-edge circuits.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


def _defaults() -> tuple[int, int, int, int]:
    """The code's own constants: EAP-IG's stacked rows per GPU pass, exact patching's and ACDC's
    candidates_per_pass, and the engine's circuits per patched pass (`metric_values` chunk)."""
    import inspect

    from circuitctl.config.methods import AcdcSettings, ExactSettings
    from circuitctl.methods.eap_ig import ROWS_PER_PASS_GPU
    from circuitctl.patching.engine import PatchingEngine

    chunk = inspect.signature(PatchingEngine.metric_values).parameters["chunk"].default
    exact_k = ExactSettings.model_fields["candidates_per_pass"].default
    acdc_k = AcdcSettings.model_fields["candidates_per_pass"].default
    return ROWS_PER_PASS_GPU, exact_k, acdc_k, chunk


ROWS_PER_PASS_GPU, EXACT_K, ACDC_K, EVALUATION_K = _defaults()


@dataclass(frozen=True)
class Shape:
    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    gated_mlp: bool = False
    layer_norm: bool = True  # LayerNorm (weight + bias); False: RMSNorm (weight)
    n_ctx_learned: int = 0  # learned positional embeddings (GPT-2), 0 for rotary

    @classmethod
    def from_cfg(cls, name: str, cfg) -> "Shape":
        """From a HookedTransformerConfig (or the dict of its fields)."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, default=None: getattr(cfg, k, default))
        d_model, n_heads = get("d_model"), get("n_heads")
        return cls(
            name=name,
            n_layers=get("n_layers"),
            n_heads=n_heads,
            n_kv_heads=get("n_key_value_heads") or n_heads,
            d_model=d_model,
            d_head=get("d_head") or d_model // n_heads,
            d_mlp=get("d_mlp"),
            d_vocab=get("d_vocab"),
            gated_mlp=bool(get("gated_mlp", False)),
            layer_norm=get("normalization_type", "LN") in ("LN", "LNPre"),
            n_ctx_learned=get("n_ctx") if get("positional_embedding_type", "standard") == "standard" else 0,
        )

    @property
    def grouped(self) -> bool:
        return self.n_kv_heads != self.n_heads

    @property
    def incremental_acdc(self) -> bool:
        """ACDC's incremental evaluator (else layerwise); see `circuitctl.methods.acdc.make_search`."""
        return not self.grouped


MODELS = [
    Shape("GPT-2 small", 12, 12, 12, 768, 64, 3072, 50257, n_ctx_learned=1024),
    Shape("Llama-3-8B shape", 32, 32, 8, 4096, 128, 14336, 128256, gated_mlp=True, layer_norm=False),
    Shape("Qwen-2.5-7B shape", 28, 28, 4, 3584, 128, 18944, 152064, gated_mlp=True, layer_norm=False),
]


# ----------------------------------------------------------------------------------------
# The graph and the weights
# ----------------------------------------------------------------------------------------
def graph_sizes(sh: Shape) -> dict:
    """Upstream nodes, downstream inputs and edges, as `circuitctl.graph.graph.Graph` builds them."""
    L, H, G = sh.n_layers, sh.n_heads, sh.n_kv_heads
    U = 1 + L * (H + 1)
    V = L * (H + 2 * G + 1) + 1
    # a layer's q/k/v inputs read every node before the layer, its MLP also the layer's heads,
    # the logits read everything
    edges = sum((H + 2 * G) * (1 + l * (H + 1)) + (1 + l * (H + 1) + H) for l in range(L)) + U
    return {"U": U, "V": V, "edges": edges}


def n_parameters(sh: Shape) -> int:
    """HookedTransformer's parameters (untied embed / unembed, every bias TransformerLens creates)."""
    d, H, G, dh, m = sh.d_model, sh.n_heads, sh.n_kv_heads, sh.d_head, sh.d_mlp
    norm = 2 * d if sh.layer_norm else d
    attn = d * dh * (H + 2 * G) + H * dh * d + dh * (H + 2 * G) + d
    mlp = d * m * (3 if sh.gated_mlp else 2) + m + d
    layer = attn + mlp + 2 * norm
    return sh.n_layers * layer + 2 * sh.d_vocab * d + sh.d_vocab + sh.n_ctx_learned * d + norm


# ----------------------------------------------------------------------------------------
# Per-method memory (bytes), beyond the weights
# ----------------------------------------------------------------------------------------
def _saved_activations(sh: Shape, P: int) -> int:
    """Approximate elements autograd saves per token for one layer's forward."""
    extra = 2 * sh.n_heads * sh.d_head if sh.grouped else 0  # keys / values repeated per head
    return 12 * sh.d_model + (4 if sh.gated_mlp else 3) * sh.d_mlp + 2 * sh.n_heads * P + extra


def eap(sh: Shape, B: int, P: int, s: int) -> float:
    L, d = sh.n_layers, sh.d_model
    U, V = graph_sizes(sh)["U"], graph_sizes(sh)["V"]
    qkv = (sh.n_heads + 2 * sh.n_kv_heads) * sh.d_head  # hook_q/k/v elements per token and layer
    n_in = sh.n_heads + 2 * sh.n_kv_heads + 1  # downstream inputs per layer
    kept = L * (3 * d + qkv) * s  # resid_pre, q, k, v, mlp_in, mlp_out
    grads = (L * (qkv + d) + d) * s
    layer = 2 * n_in * d * s + (n_in * d * 4 if s != 4 else 0)  # one layer's input gradients (about 2 copies)
    after = U * d * (2 * s + 4) + kept + grads + layer
    during = U * d * s + L * sh.n_heads * d * s + L * _saved_activations(sh, P) * s + grads
    return B * P * max(after, during) + 2 * U * V * 4  # + the [U, V] score sums


def eap_ig_steps_per_pass(steps: int, B: int, gpu: bool) -> int:
    return max(1, min(steps, ROWS_PER_PASS_GPU // max(1, B))) if gpu else 1


def eap_ig(sh: Shape, B: int, P: int, s: int, k: int = 1) -> float:
    """Inputs variant, k interpolation steps stacked in one pass."""
    L, d = sh.n_layers, sh.d_model
    U, V = graph_sizes(sh)["U"], graph_sizes(sh)["V"]
    qkv = (sh.n_heads + 2 * sh.n_kv_heads) * sh.d_head
    n_in = sh.n_heads + 2 * sh.n_kv_heads + 1
    clean = U * d * s + (L + 1) * d * s  # the clean run's node outputs and residual streams
    kept = L * (2 * d + qkv) * s  # resid_pre, q, k, v, mlp_in
    grads = (L * (qkv + d) + d) * s
    layer = 2 * n_in * d * s + (n_in * d * 4 if s != 4 else 0)
    after = clean + U * d * (s + 4) + k * (kept + grads + layer) + n_in * d * 4  # + the float32 step sum
    during = clean + U * d * s + k * (L * _saved_activations(sh, P) * s + grads)
    return B * P * max(after, during) + B * sh.d_vocab * s + 2 * U * V * 4


def engine_state(sh: Shape, N: int, P: int, s: int) -> float:
    """The patching engine's cached state for N examples (resample ablation)."""
    U, L = graph_sizes(sh)["U"], sh.n_layers
    return N * (P * (2 * U + L + 1) * sh.d_model * s + sh.d_vocab * s)


def acdc_tables(sh: Shape, N: int, P: int, s: int) -> float:
    """The incremental evaluator's own tables, made when the search starts (0 for layerwise)."""
    if not sh.incremental_acdc:
        return 0
    U = graph_sizes(sh)["U"]
    return N * (2 * P + 4) * U * sh.d_model * s  # clean - ablation, current; 4 answer-position copies


def patched_pass(sh: Shape, B: int, P: int, s: int, K: int, circuits: bool = True) -> float:
    """One patched forward of K circuits whose first ablated edge is in layer 0 (the worst case).

    Every recomputed node's difference [K, B, P, d] is kept for later layers; when later layers
    have ablated edges too (`circuits`: the evaluation, ACDC's layerwise trials) they are also
    concatenated once more to be read. Exact patching's single edges into one layer: no copy."""
    U, d = graph_sizes(sh)["U"], sh.d_model
    # the differences (and their concatenation); the layer's patched q inputs (subtraction and
    # LayerNorm, H x K); the forward's own activations of one layer
    tables = (2 if circuits else 1) * K * (U - 1) + 1 + 2 * K * sh.n_heads
    forward = K * (6 * d + 2 * sh.d_mlp) + K * 2 * sh.n_heads * P
    return B * P * (tables * d + forward) * s


def acdc(sh: Shape, N: int, B: int, P: int, s: int) -> float:
    """Engine state and evaluator tables for all N examples, and one trial pass of K = 16 on a batch
    (incremental: at most every node recomputed once, as a single-layer patched pass)."""
    trial = patched_pass(sh, min(B, N), P, s, ACDC_K, circuits=not sh.incremental_acdc)
    return engine_state(sh, N, P, s) + acdc_tables(sh, N, P, s) + trial


def exact(sh: Shape, B: int, P: int, s: int) -> float:
    return engine_state(sh, B, P, s) + patched_pass(sh, B, P, s, EXACT_K, circuits=False)


def per_example(fn, sh: Shape, *rest) -> float:
    """Bytes per example of a memory function `fn(shape, batch or examples, *rest)` (linear in it)."""
    return fn(sh, 2, *rest) - fn(sh, 1, *rest)


# ----------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GIB:,.1f}" if x >= 0.95 * GIB else f"{x / GIB:.2f}"


def _largest(fn, budget: float, limit: int = 4096) -> int:
    """The largest n in 1..limit with fn(n) <= budget (fn increasing), 0 if none."""
    best = 0
    lo, hi = 1, limit
    while lo <= hi:
        mid = (lo + hi) // 2
        if fn(mid) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def table(B: int, P: int, N: int, dtype: str, steps: int, gpu_gib: float) -> str:
    s = BYTES[dtype]
    k_gpu = eap_ig_steps_per_pass(steps, B, gpu=True)
    lines = [
        f"Batch {B}, {P}-token prompts, {dtype} weights and activations, float32 scores and differences, "
        f"resample ablation, {steps} EAP-IG steps; GiB beyond the weights.",
        "",
        "| model | U upstream / V downstream / edges | weights | one [B, P, U, d] table | EAP | EAP-IG, 1 step per pass | "
        f"EAP-IG, {k_gpu} steps stacked (GPU default) | exact (K = {EXACT_K}) | ACDC per example | ACDC, {N} examples |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sh in MODELS:
        g = graph_sizes(sh)
        cells = [
            sh.name,
            f"{g['U']:,} / {g['V']:,} / {g['edges']:,}",
            f"{_gib(n_parameters(sh) * s)} ({n_parameters(sh) / 1e9:.2f} B params)",
            _gib(g["U"] * B * P * sh.d_model * s),
            _gib(eap(sh, B, P, s)),
            _gib(eap_ig(sh, B, P, s, 1)),
            _gib(eap_ig(sh, B, P, s, k_gpu)),
            _gib(exact(sh, B, P, s)),
            _gib(engine_state(sh, 1, P, s) + acdc_tables(sh, 1, P, s)) + (" (incremental)" if sh.incremental_acdc else " (layerwise)"),
            _gib(acdc(sh, N, B, P, s)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"The largest batch (examples for ACDC) that fits in {gpu_gib:g} GiB of GPU memory, weights included "
        f"({P}-token prompts; the engine and the attribution loops halve the batch on out-of-memory errors by themselves):",
        "",
        "| model | EAP: batch | EAP-IG, stacked steps: batch | exact: batch | ACDC: examples (its trials halved to batch 1) |",
        "|---|---|---|---|---|",
    ]
    for sh in MODELS:
        budget = gpu_gib * GIB - n_parameters(sh) * s
        cells = [
            sh.name,
            _largest(lambda b: eap(sh, b, P, s), budget),
            _largest(lambda b: eap_ig(sh, b, P, s, eap_ig_steps_per_pass(steps, b, gpu=True)), budget),
            _largest(lambda b: exact(sh, b, P, s), budget),
            _largest(lambda n: acdc(sh, n, 1, P, s), budget, 100_000),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--examples", type=int, default=100, help="examples ACDC caches")
    parser.add_argument("--dtype", choices=sorted(BYTES), default="bfloat16")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    parser.add_argument("--gpu-gib", type=float, default=76, help="GPU memory for the 'what fits' table (80 GB H100 less context)")
    args = parser.parse_args()
    print(table(args.batch, args.length, args.examples, args.dtype, args.steps, args.gpu_gib))


if __name__ == "__main__":
    main()
