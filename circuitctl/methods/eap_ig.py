"""EAP with integrated gradients (EAP-IG; Hanna et al. 2024), at edge, node or neuron level.

score(u -> v) = (z_u(ablated) - z_u(clean)) . (1/m) sum_k dm/d(input_v) at point alpha_k, summed over
positions and d_model and averaged over examples, where the m points lie on the straight line
from the ablation to the clean run (alpha = weight of the clean end):

* ``points: auto`` (default) does what the EAP-IG reference does: ``left`` for the inputs
  variant's edge (and neuron) scores, alpha_k = k/m, k = 0..m-1, starting at the ablation point
  (``range(0, steps)`` in its ``get_scores_eap_ig``); ``right`` for the activations variant and
  node scores, alpha_k = k/m, k = 1..m, ending at the clean point (``range(1, steps + 1)``).
  With m = 1, ``right`` is exactly EAP. ``midpoint`` ((k + 1/2)/m) is also available.
* ``variant: inputs``: the input embeddings are interpolated; every node is recomputed.
* ``variant: activations``: the outputs of one layer component at a time (the input, the heads
  of layer L together, the MLP of layer L, as the reference) are interpolated and everything
  after it is recomputed; an edge u -> v takes its gradients from the runs that interpolate u's
  component. (The reference adds every run's gradients to every edge and divides by the number
  of runs; scoring each edge on its own upstream component's path instead makes a node's score
  the sum of its outgoing edges' scores, i.e. the integrated gradient of that node.)

Node level: a node's score is delta_out . gradient at its output, which equals the sum of its
outgoing edges' scores (an output's gradient is the sum of the gradients of the inputs reading
it). Neuron level: delta of each MLP neuron's activation (``hook_post``) times the integrated
gradient there. Per-position graphs keep the positions apart (see `circuitctl.graph.positional`).

Cost: the ablation and clean forwards plus m forward+backward passes per batch (inputs), or
about m forward+backward passes per layer component from its layer on (activations). Steps are
stacked along the batch dimension; delta is contracted once with the step-summed gradients, so
memory stays at the [U, B, P, d] delta buffer plus one layer's input gradients.

Batches: each batch's scores are computed into a fresh block and then added to the sums, in
order (a batch that runs out of accelerator memory is retried in halves; under torchrun each
rank sums its share of the examples and the sums are all-reduced). The sums of the finished
batches are saved every `checkpoint_every_seconds` and on Ctrl-C, and ``circuitctl discover
CONFIG --resume RUN_DIR`` continues with the next batch: the same additions in the same order,
so the same scores, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from circuitctl import distributed
from circuitctl.batching import BatchSizer
from circuitctl.checkpoint import Autosave
from circuitctl.config.methods import EapIgSettings
from circuitctl.errors import UsageError
from circuitctl.methods import eap
from circuitctl.methods.base import DiscoveryContext, DiscoveryResult
from circuitctl.models.gradients import GradientPass, Replacement, gradient_pass
from circuitctl.patching.engine import PatchingEngine
from circuitctl.progress import bar
from circuitctl.tasks.data import TaskData

METHOD = "eap_ig"

# Default cap on (stacked steps x examples) in one forward/backward on a GPU. On the CPU stacking
# does not pay (bench/bench_eap_ig.py: 5 stacked steps 5.7x EAP's time, one at a time 4.8x).
ROWS_PER_PASS_GPU = 64


def alphas(steps: int, points: str) -> list[float]:
    """Weights of the clean end of the ablation -> clean path at which gradients are taken."""
    if points == "right":
        return [(k + 1) / steps for k in range(steps)]
    if points == "left":
        return [k / steps for k in range(steps)]
    return [(k + 0.5) / steps for k in range(steps)]


def _chunks(values: list[float], size: int) -> list[list[float]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def _interpolate(clean: torch.Tensor, ablation: torch.Tensor, points: list[float]) -> torch.Tensor:
    """[..., B, P, x] clean/ablation -> [..., k*B, P, x] stacked points (step-major)."""
    ablation = ablation.expand_as(clean)
    # anchored at the clean end, so that alpha = 1 is the clean run exactly
    towards_ablation = torch.tensor([1.0 - p for p in points], dtype=clean.dtype, device=clean.device)
    stacked = clean[None] + towards_ablation.view(len(points), *([1] * clean.dim())) * (ablation - clean)[None]  # [k, ..., B, P, x]
    stacked = stacked.movedim(0, -4)  # [..., k, B, P, x]
    return stacked.flatten(-4, -3)


@dataclass
class _Run:
    """One gradient pass: which upstream rows it scores and how many steps it stacks."""

    rows: tuple[int, int]  # upstream node indices [lo, hi) whose edges this pass scores
    n_steps: int
    grads: GradientPass


def _check(context: DiscoveryContext, settings: EapIgSettings) -> None:
    if context.metric.name == "kl" and settings.steps == 1 and settings.alpha_points == "right":
        raise UsageError(
            "method 'eap_ig' with metric 'kl', steps 1 and points 'right': the only gradient is taken at the clean "
            "run, where the gradient of the KL divergence is zero; use more steps or another metric"
        )
    if settings.granularity == "neuron":
        if not context.graph.spec.has_mlps:
            raise UsageError("method.granularity: neuron needs a model with MLPs (this one is attention-only)")
        if settings.positions == "per_token":
            raise UsageError("method.granularity: neuron with positions: per_token is not supported; use positions: all")


def discover(context: DiscoveryContext, settings: EapIgSettings) -> DiscoveryResult:
    _check(context, settings)
    graph = context.graph
    pgraph = None
    if settings.positions == "per_token":
        from circuitctl.graph.positional import PositionalGraph

        pgraph = PositionalGraph.from_data(graph, context.data, "method.positions: per_token")
    extra: dict = {"variant": settings.variant, "steps": settings.steps, "points": settings.alpha_points}
    n_forward = _forward_passes(context, settings)
    sign = context.metric.importance_sign
    engine = context.engine(settings.batch_size)
    zeros = _score_buffer(context, settings, pgraph)
    if pgraph is None and settings.variant == "inputs" and settings.granularity != "neuron":
        sums = _batch_sums(context, settings, _input_edge_block(context, settings, engine), zeros)
        edges = sign * (sums.cpu() * graph.edge_mask) / context.data.n  # as eap.attribution_scores
    else:
        sums = _batch_sums(context, settings, _gradient_block(context, settings, pgraph, engine, zeros), zeros)
        scores = (sign * sums / context.data.n).cpu()
        if settings.granularity == "neuron":
            from circuitctl.circuits.neurons import NeuronSpace

            return DiscoveryResult(scores, space=NeuronSpace(graph, context.adapter.cfg.d_mlp), forward_passes=n_forward, extra=extra)
        if pgraph is not None:
            from circuitctl.circuits.positional import PositionalEdgeSpace, PositionalNodeSpace

            scores = scores * pgraph.edge_mask
            if settings.granularity == "node":  # [G, U]: a node's outgoing edges to every position
                return DiscoveryResult(scores.sum(dim=(1, 3)), space=PositionalNodeSpace(pgraph), forward_passes=n_forward, extra=extra)
            return DiscoveryResult(scores, space=PositionalEdgeSpace(pgraph), forward_passes=n_forward, extra=extra)
        edges = scores * graph.edge_mask
    if settings.granularity == "node":
        from circuitctl.circuits.nodes import NodeSpace

        return DiscoveryResult(edges.sum(1), space=NodeSpace(graph), forward_passes=n_forward, extra=extra)
    return DiscoveryResult(edges, forward_passes=n_forward, extra=extra)


def _steps_per_pass(settings: EapIgSettings, batch_size: int, device: torch.device) -> int:
    if settings.steps_per_pass is not None:
        return settings.steps_per_pass
    if device.type != "cuda":
        return 1
    return max(1, min(settings.steps, ROWS_PER_PASS_GPU // max(1, batch_size)))


def _forward_passes(context: DiscoveryContext, settings: EapIgSettings) -> float:
    """Forward-pass equivalents over the dataset (a backward is not counted, as for EAP)."""
    if settings.variant == "inputs":
        return 2.0 + settings.steps
    L = context.graph.spec.n_layers
    # each component's runs start at its layer: the input at 0, the heads and MLP of layer l at l
    if settings.granularity == "neuron":
        layers = sum(L - l for l in range(L))
    else:
        layers = L + sum(2 * (L - l) if context.graph.spec.has_mlps else (L - l) for l in range(L))
    return 2.0 + settings.steps * layers / L


def _objective(context: DiscoveryContext, batch, clean_logits: torch.Tensor, n_steps: int):
    """The summed metric over `n_steps` stacked copies of the batch, and their answer positions."""
    stacked = batch.repeat(n_steps)
    reference = clean_logits.repeat(n_steps, 1)  # KL compares with the clean run at every point

    def objective(logits):
        return context.metric(logits, stacked, reference).sum()

    return objective, stacked.answer_positions


def _input_runs(context: DiscoveryContext, settings: EapIgSettings):
    """EAP-IG-inputs as `eap.attribution_scores` gradient runs: (1/m, clean outputs, step-summed gradients) per chunk."""
    points = alphas(settings.steps, settings.alpha_points)

    def runs(batch, ablation):
        clean = context.adapter.run(batch.clean, batch.answer_positions)
        B = batch.n
        for chunk in _chunks(points, _steps_per_pass(settings, B, context.adapter.device)):
            k = len(chunk)
            resid = _interpolate(clean.outputs[0], ablation[0], chunk)
            objective, positions = _objective(context, batch, clean.logits, k)
            grads = gradient_pass(context.adapter, resid, positions, objective)
            summed = ((lg.inputs, lg.grads.float().unflatten(1, (k, B)).sum(1)) for lg in grads.layers)
            yield 1.0 / settings.steps, clean.outputs, summed

    return runs


def _runs(context: DiscoveryContext, settings: EapIgSettings, state, post_pair, query_groups, n_groups):
    """Gradient passes for one batch: (rows scored, steps stacked, GradientPass)."""
    adapter, graph = context.adapter, context.graph
    B = state.batch.n
    points = alphas(settings.steps, settings.alpha_points)
    neurons = settings.granularity == "neuron"
    chunks = _chunks(points, _steps_per_pass(settings, B, adapter.device))

    def split_groups(k):
        return (query_groups.repeat(k, 1) if query_groups is not None else None), n_groups

    if settings.variant == "inputs":
        for chunk in chunks:
            k = len(chunk)
            objective, positions = _objective(context, state.batch, state.clean.logits, k)
            qg, ng = split_groups(k)
            resid = _interpolate(state.clean.outputs[0], state.ablation_outputs[0], chunk)
            rows = (0, graph.spec.n_layers) if neurons else (0, graph.n_upstream)
            yield _Run(rows, k, gradient_pass(
                adapter, resid, positions, objective, neurons=neurons, query_groups=qg, n_groups=ng
            ))
        return

    # activations: one layer component at a time, from its layer on
    components: list[tuple[int, int, int, str]] = []  # (lo, hi, layer, kind)
    if not neurons:
        components.append((0, 1, 0, "input"))
    for layer in range(graph.spec.n_layers):
        if not neurons:
            lo = graph.head_out_start[layer]
            components.append((lo, lo + graph.spec.n_heads, layer, "attn"))
        if graph.spec.has_mlps:
            u = graph.mlp_out_index[layer]
            components.append((u, u + 1, layer, "mlp"))
    for lo, hi, layer, kind in components:
        first_input = next(v for v in range(graph.n_downstream) if graph.prefix_len[v] > lo)
        for chunk in chunks:
            k = len(chunk)
            objective, positions = _objective(context, state.batch, state.clean.logits, k)
            qg, ng = split_groups(k)
            if kind == "input":
                resid, repl = _interpolate(state.clean.outputs[0], state.ablation_outputs[0], chunk), None
            else:
                resid = state.clean.resid[layer].repeat(k, 1, 1)
                if kind == "attn":
                    repl = Replacement(attn_heads=_interpolate(state.clean.outputs[lo:hi], state.ablation_outputs[lo:hi], chunk))
                elif neurons:
                    clean_post, ablation_post = post_pair
                    repl = Replacement(post=_interpolate(clean_post[layer], ablation_post[layer], chunk))
                else:
                    repl = Replacement(mlp_out=_interpolate(state.clean.outputs[lo], state.ablation_outputs[lo], chunk))
            grads = gradient_pass(
                adapter, resid, positions, objective, start_layer=layer, replace=repl,
                query_groups=qg, n_groups=ng, first_input=first_input,
            )
            yield _Run((lo, hi) if not neurons else (layer, layer + 1), k, grads)


# ----------------------------------------------------------------------------------------
# Sums over batches, resumable
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sums:
    """Score sums over the first `done` examples (of this process's share). Replaced after
    every batch, never changed in place, so that a Ctrl-C at any moment finds a consistent one."""

    done: int
    total: torch.Tensor


BlockFunction = Callable[[TaskData], torch.Tensor]  # one batch's score sums, in a fresh float32 tensor


def _batch_sums(context: DiscoveryContext, settings: EapIgSettings, block_of: BlockFunction, zeros: torch.Tensor) -> torch.Tensor:
    """The sum of `block_of(batch)` over the dataset's batches, in order, all-reduced across
    ranks. Checkpointed after whole batches (not under torchrun: resume runs on one process)."""
    local = distributed.shard(context.data)
    checkpoint = context.checkpoint if distributed.world_size() == 1 else None
    sums = _Sums(0, zeros)

    def snapshot() -> tuple[dict, dict]:
        return {"examples_done": sums.done, "n_examples": local.n}, {"sums": sums.total}

    autosave = Autosave(checkpoint, METHOD, settings.checkpoint_every_seconds, snapshot)
    loaded = autosave.load(context.resume)
    if loaded is not None:
        sums = _restored(loaded, zeros, local.n, checkpoint)
    sizer = BatchSizer(settings.batch_size, "EAP-IG")  # a piece that runs out of memory is retried in halves
    try:
        with bar(f"EAP-IG {settings.variant} ({context.metric.name})", -(-local.n // settings.batch_size)) as advance:
            advance(-(-sums.done // settings.batch_size))
            for n, block in sizer.map(local.slice(sums.done, local.n), lambda batch: (batch.n, block_of(batch))):
                # block + total has the bits of total + block: the additions of an uninterrupted run
                sums = _Sums(sums.done + n, block.add_(sums.total))
                advance()
                autosave.maybe_save()
    except KeyboardInterrupt:
        if checkpoint is None:
            raise
        raise autosave.interrupted("EAP-IG") from None
    return distributed.all_reduce_sum(sums.total)


def _restored(loaded: tuple[dict, dict], zeros: torch.Tensor, n_examples: int, checkpoint) -> _Sums:
    state, tensors = loaded
    total = tensors.get("sums")
    if state.get("n_examples") != n_examples or total is None or tuple(total.shape) != tuple(zeros.shape):
        raise UsageError(f"{checkpoint.dir}: the checkpoint does not fit this model and task; delete it to start over")
    return _Sums(int(state["examples_done"]), total.to(device=zeros.device, dtype=zeros.dtype))


def _score_buffer(context: DiscoveryContext, settings: EapIgSettings, pgraph) -> torch.Tensor:
    """Zero float32 scores: edges [U, V], per-position edges [G, G, U, V] or neurons [L, d_mlp]."""
    graph, adapter = context.graph, context.adapter
    if settings.granularity == "neuron":
        shape: tuple[int, ...] = (graph.spec.n_layers, adapter.cfg.d_mlp)
    elif pgraph is not None:
        shape = (pgraph.n_groups, pgraph.n_groups, graph.n_upstream, graph.n_downstream)
    else:
        shape = (graph.n_upstream, graph.n_downstream)
    return torch.zeros(shape, dtype=torch.float32, device=adapter.device)


# ----------------------------------------------------------------------------------------
# One batch's scores
# ----------------------------------------------------------------------------------------
def _input_edge_block(context: DiscoveryContext, settings: EapIgSettings, engine: PatchingEngine) -> BlockFunction:
    """Edge scores of EAP-IG-inputs, as `eap.attribution_scores` computes a batch's: the clean
    outputs come from the gradient passes themselves, so no separate clean forward is run."""
    runs = _input_runs(context, settings)
    return lambda batch: eap.attribution_block(context, engine, runs, batch)


def _gradient_block(context: DiscoveryContext, settings: EapIgSettings, pgraph, engine: PatchingEngine, zeros: torch.Tensor) -> BlockFunction:
    """One batch's sum of delta . gradient over its `_runs`: edge [U, V], per-position [G, G, U, V] or neuron [L, n] scores."""
    graph, adapter = context.graph, context.adapter
    device = adapter.device
    neurons = settings.granularity == "neuron"
    G = pgraph.n_groups if pgraph is not None else 0
    from circuitctl.circuits.neurons import NeuronAblation

    ablation_source = NeuronAblation(engine, adapter.cfg.d_mlp) if neurons else None
    kv = pgraph.kv_inputs.to(device) if G else None
    weight = 1.0 / settings.steps

    def block_of(batch: TaskData) -> torch.Tensor:
        state = engine.batch_state(batch)
        scores = torch.zeros_like(zeros)
        B = state.batch.n
        groups = pgraph.layout.assign(state.batch).to(device) if G else None
        post_pair = ablation_source.pair(state.batch) if neurons else None
        delta = None if neurons else (state.ablation_outputs - state.clean.outputs).float()  # [U, B, P, d]
        post_delta = (post_pair[1] - post_pair[0]).float() if neurons else None  # [L, B, P, n]
        for run in _runs(context, settings, state, post_pair, groups, G):
            k = run.n_steps
            if neurons:
                for layer, gr in run.grads.post_grads.items():
                    if run.rows[0] <= layer < run.rows[1]:
                        summed = gr.float().unflatten(0, (k, B)).sum(0)
                        scores[layer] += weight * (post_delta[layer] * summed).sum((0, 1))
                continue
            lo, hi = run.rows
            for lg in run.grads.layers:
                n_up = min(hi, max(graph.prefix_len[v] for v in lg.inputs))
                if n_up <= lo:
                    continue
                grads = lg.grads.float().unflatten(1, (k, B)).sum(1)  # [n, B, P, d]
                cols = slice(lg.inputs.start, lg.inputs.stop)
                if G == 0:
                    scores[lo:n_up, cols] += weight * (delta[lo:n_up].flatten(1) @ grads.flatten(1).T)
                    continue
                split = None
                if lg.kv_by_group is not None:  # one query group at a time: [2H, B, P, d]
                    split = (gr.float().unflatten(1, (k, B)).sum(1) for gr in lg.kv_by_group)
                _add_positional(scores, delta[lo:n_up], grads, split, groups, kv[cols], lo, lg.inputs, weight)
        return scores

    return block_of


def _add_positional(scores, delta, grads, split, groups, is_kv, lo, inputs, weight) -> None:
    """Per-position contraction of one layer: same group for q/MLP/logits inputs, k/v per query group.

    scores [G, G, U, V]; delta [n_rows, B, P, d] (upstream rows lo..); grads [n, B, P, d] for
    `inputs`; split: an iterator over query groups of [2H, B, P, d] k/v gradients (or None).
    """
    same_cols = inputs.start + (~is_kv).nonzero().flatten()
    kv_cols = inputs.start + is_kv.nonzero().flatten()
    rows = slice(lo, lo + delta.shape[0])
    G = scores.shape[0]
    selected = [groups == g for g in range(G)]  # [B, P] each
    delta_at = [delta[:, sel].flatten(1) if bool(sel.any()) else None for sel in selected]  # [n_rows, N_g * d]
    for g in range(G):
        if delta_at[g] is not None and len(same_cols):
            block = delta_at[g] @ grads[same_cols - inputs.start][:, selected[g]].flatten(1).T  # [n_rows, n_same]
            scores[g, g, rows, same_cols] += weight * block
    if split is None or not len(kv_cols):
        return
    for dst, kv_grads in enumerate(split):  # keys/values read by the queries of group dst
        for src in range(G):
            if delta_at[src] is not None:
                block = delta_at[src] @ kv_grads[:, selected[src]].flatten(1).T  # [n_rows, 2H]
                scores[src, dst, rows, kv_cols] += weight * block
