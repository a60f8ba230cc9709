"""The differentiable masked forward pass of edge pruning and subnetwork probing.

With a continuous mask ``keep`` in [0, 1] over the edge graph (``[n_upstream, n_downstream]``),
every downstream input (a head's q, k or v input, an MLP input, the logits) is

    input_v = current input_v - sum_u (1 - keep[u, v]) * (current output_u - ablated output_u),

i.e. z * (the writer's output in this pass) + (1 - z) * (its ablated output), summed over the
writers, plus the biases. "Current" means recomputed in this same pass: once some mask is below
1, the outputs of every later node change, so nothing after the embedding can come from a
cached clean run. Each layer's inputs are mixed in one matrix product (all edges into a layer
at once, ``[V_layer, n_up] @ [n_up, B*P*d]``), not one hook per edge; the gradients with
respect to ``keep`` and to the writers' outputs come from the two autograd functions below
(`_Mix`, `_Writer`). At binary masks this is exactly edge patching
(`ModelAdapter.patched_logits`), and at fractional masks its values and gradients equal a plain
one-edge-at-a-time implementation; both are tested.

This module is the TransformerLens side of the learned-mask methods. Each layer's attention
takes its q, k and v from this pass (`ModelAdapter.qkv_from`): every head's q/k/v input is
mixed, normalised and projected here, all of the layer's at once, and TransformerLens's own
projection of ln1's output is skipped rather than computed and replaced; each head's output is
read from ``hook_z`` (``z @ W_O[h]``, no ``use_attn_result``). The cost of a training step
against a plain forward + backward is measured by ``bench/bench_edge_pruning.py``.
"""

from __future__ import annotations

import torch

from circuitctl.graph import naming
from circuitctl.models.adapter import ModelAdapter


class Workspace:
    """Buffers that successive masked passes reuse: the writers' outputs and their gradients
    (``n_upstream`` rows of ``B*P*d``, 60 MB each for GPT-2 at batch 8 x 16) and the batch's
    ablation outputs; a fresh allocation of that size on the CPU is new pages from the kernel
    every step, page faults that cost as much as the copies into them. A pass takes a buffer and gives
    it back when its autograd graph is freed; a second pass alive at the same time gets a fresh
    one. (On a GPU the caching allocator already does this.)"""

    def __init__(self) -> None:
        self._free: dict[tuple, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        key = (name, tuple(shape), like.dtype, like.device)
        tensor = self._free.pop(key, None)
        return tensor if tensor is not None else torch.empty(shape, dtype=like.dtype, device=like.device)

    def give_back(self, name: str, tensor: torch.Tensor) -> None:
        self._free[(name, tuple(tensor.shape), tensor.dtype, tensor.device)] = tensor


class _Writers:
    """Every writer's (current - ablated) output of one masked pass, in graph order, kept in one
    contiguous buffer ``[n_upstream, B*P*d]`` as it is produced, so that mixing the first n writers
    into a layer's inputs is one matrix product over ``buffer[:n]`` (no concatenation per layer).

    Backward runs the other way round: each mix adds its readers' share to the writers'
    gradients, accumulated in place in one buffer (``grads[:n] += weights @ d loss / d inputs``,
    no partial gradient tensors to allocate and add up), and returns none for the writers
    themselves; a writer's backward, which autograd runs after every mix that reads it, hands
    its rows on."""

    def __init__(self, graph, like: torch.Tensor, workspace: Workspace | None) -> None:
        self.workspace = workspace or Workspace()
        self.buffer = self.workspace.take("writers", (graph.n_upstream, like[0].numel()), like)
        self.rows = 0
        self.grads: torch.Tensor | None = None
        self.summed = 0  # grads[:summed] hold sums; later rows have no gradient yet

    def append(self, block: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor | None:
        """Store ``block - ablated``. Returns the writers' handle in the autograd graph (an empty
        tensor; None when the block needs no gradient), to be passed to every mix that reads
        them. The caller keeps the handles: holding graph tensors here would make a reference
        cycle through the autograd graph (this record is on every mix's and writer's ctx) that
        outlives the step."""
        rows = slice(self.rows, self.rows + block.shape[0])
        self.rows = rows.stop
        if block.requires_grad:
            return _Writer.apply(block, ablated, self, rows)
        torch.sub(block, ablated, out=self.buffer[rows].view(block.shape))
        return None

    def accumulate(self, weights: torch.Tensor, grad: torch.Tensor) -> None:
        """grads[:n] += weights @ grad for a mix over the first n writers (weights [n, V], grad [V, B*P*d])."""
        n, done = weights.shape[0], self.summed
        if self.grads is None:
            self.grads = self.workspace.take("writer_grads", tuple(self.buffer.shape), grad)
        if n > done:  # rows no mix has reached yet: written, not added to
            torch.mm(weights[done:], grad, out=self.grads[done:n])
        if done > 0:
            self.grads[: min(n, done)].addmm_(weights[:done], grad)
        self.summed = max(n, done)

    def grad_of(self, rows: slice) -> torch.Tensor:
        if rows.stop <= self.summed:
            return self.grads[rows]
        return self.buffer.new_zeros((rows.stop - rows.start, self.buffer.shape[1]))  # no reader reached the loss

    def __del__(self) -> None:  # the autograd graph that held this record is gone
        self.workspace.give_back("writers", self.buffer)
        if self.grads is not None:
            self.workspace.give_back("writer_grads", self.grads)


class _Writer(torch.autograd.Function):
    """``block - ablated`` written into the writers' buffer; the output is only a handle (every
    use of the values goes through a mix), and backward returns the block's gradient that the
    mixes accumulated."""

    @staticmethod
    def forward(ctx, block, ablated, writers: _Writers, rows: slice):
        ctx.set_materialize_grads(False)
        ctx.writers, ctx.rows, ctx.shape = writers, rows, block.shape
        torch.sub(block, ablated, out=writers.buffer[rows].view(block.shape))
        return block.new_empty(0)

    @staticmethod
    def backward(ctx, _handle_grad):
        # a view of the reused buffer: these rows are final, and nothing keeps a non-leaf's grad
        return ctx.writers.grad_of(ctx.rows).view(ctx.shape), None, None, None


class _Mix(torch.autograd.Function):
    """base + weights^T @ buffer[:n] for the readers of one mix: base, the current input that
    they share, is added inside the product rather than in a pass of its own over their [V,
    B*P*d] inputs (a pass that costs as much as the product's own writing). The writers' handles
    are inputs only so that autograd runs every mix that reads a writer before the writer's own
    backward."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, weights: torch.Tensor, writers: _Writers, *handles: torch.Tensor) -> torch.Tensor:
        ctx.writers, ctx.base_shape = writers, base.shape
        ctx.save_for_backward(weights)
        return _addmm_in_column_blocks(base.reshape(1, -1), weights.T, writers.buffer[: weights.shape[0]])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weights,) = ctx.saved_tensors
        writers = ctx.writers
        grad_base = grad.sum(0).view(ctx.base_shape) if ctx.needs_input_grad[0] else None
        grad_weights = writers.buffer[: weights.shape[0]] @ grad.T if ctx.needs_input_grad[1] else None
        writers.accumulate(weights, grad)
        return (grad_base, grad_weights, None, *(None for _ in range(len(ctx.needs_input_grad) - 3)))


def _addmm_in_column_blocks(row: torch.Tensor, a: torch.Tensor, b: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """row + a @ b (row [1, N] added to every row) for a few rows of `a` and a very wide `b`: on
    the CPU in blocks of columns, each block's part of `b` still in cache while its output is
    written (about 15 % faster here than one product of this shape)."""
    if b.device.type != "cpu" or b.shape[1] <= block:
        return torch.addmm(row, a, b)
    out = b.new_empty((a.shape[0], b.shape[1]))
    for start in range(0, b.shape[1], block):
        stop = start + block
        torch.addmm(row[:, start:stop], a, b[:, start:stop], out=out[:, start:stop])
    return out


def _normalize(ln, x: torch.Tensor) -> torch.Tensor:
    """`ln(x)` for a TransformerLens LayerNorm / LayerNormPre in one fused kernel (the per-head
    copies make LayerNorm a large share of the pass); other normalisations through the module."""
    from transformer_lens.components import LayerNorm, LayerNormPre

    if isinstance(ln, LayerNorm):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), ln.w, ln.b, ln.eps)
    if isinstance(ln, LayerNormPre):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), None, None, ln.eps)
    return ln(x)


def masked_logits(
    adapter: ModelAdapter,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    ablation_outputs: torch.Tensor,
    keep: torch.Tensor,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Logits at the answer positions [B, vocab] of the clean `tokens` run with each edge u -> v
    kept with weight ``keep[u, v]`` (1: clean, 0: ablated, in between: the mix).

    ablation_outputs: [n_upstream, B or 1, P, d] what an ablated edge carries (the engine's
                      resample / zero / mean outputs).
    keep:             float [n_upstream, n_downstream]; entries that are not edges are ignored.
    workspace:        buffers to reuse from earlier passes (training keeps one for all its steps).
    Differentiable with respect to `keep` (run it under ``torch.enable_grad()``).
    """
    g, model, L, H = adapter.graph, adapter.model, adapter.cfg.n_layers, adapter.cfg.n_heads
    # each input gets sum_u mixing[u, v] * diff_u added: minus the weight of the ablated value
    # (the sign is in the weights so that no pass over the activations negates anything)
    mixing = (keep.to(adapter.dtype) - 1) * g.edge_mask.to(keep.device, adapter.dtype)
    resid_pre: dict[int, torch.Tensor] = {}
    handles_by_end: list[torch.Tensor | None] = []  # each block of writers' autograd handle
    ends: list[int] = []  # and the row after its last writer
    B, P = tokens.shape
    n_kv = g.spec.kv_heads

    def mix(current: torch.Tensor, columns: range, n_up: int) -> torch.Tensor:
        """current + sum_u mixing[u, v] * diff_u for the downstream inputs `columns` (whose current
        input is `current` [B, P, d]) over the first n_up writers: [len(columns), B, P, d]."""
        weights = mixing[:n_up, columns.start : columns.stop]
        handles = [h for h, end in zip(handles_by_end, ends) if end <= n_up and h is not None]
        return _Mix.apply(current, weights, writers, *handles).view(len(columns), B, P, -1)

    def add_writers(block: torch.Tensor, first: int) -> None:
        """Writers `first`.. (the rows of `block`)."""
        assert first == writers.rows, "writers must be added in graph order"
        handles_by_end.append(writers.append(block, ablation_outputs[first : first + block.shape[0]]))
        ends.append(writers.rows)

    def keep_resid(x, hook):
        resid_pre[hook.layer()] = x

    def project(layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k and v of every head from its own mixed input: one mixing product, one normalisation
        and one batched projection for all q, k and v inputs of the layer."""
        start = g.q_in_start[layer]
        inputs = mix(resid_pre[layer], range(start, start + H + 2 * n_kv), g.head_out_start[layer])
        normed = _normalize(model.blocks[layer].ln1, inputs)
        weights, biases = zip(*(adapter.projection(layer, c) for c in naming.CHANNELS))
        projected = torch.einsum("hbpd,hde->hbpe", normed, torch.cat(weights)) + torch.cat(biases)[:, None, None]
        q, k, v = projected.split([H, n_kv, n_kv])
        return q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)

    def keep_heads(z, hook):
        layer = hook.layer()
        add_writers(adapter.head_outputs(layer, z), g.head_out_start[layer])

    def mix_mlp_in(x, hook):
        v = g.mlp_in_index[hook.layer()]  # sequential blocks: the MLP also reads its layer's heads
        return mix(x, range(v, v + 1), g.prefix_len[v])[0]

    def keep_mlp(x, hook):
        layer = hook.layer()
        add_writers(x[None], g.mlp_out_index[layer])

    hooks = []
    for i in range(L):
        hooks += [(f"blocks.{i}.hook_resid_pre", keep_resid), (f"blocks.{i}.attn.hook_z", keep_heads)]
        if g.spec.has_mlps:
            hooks += [(f"blocks.{i}.hook_mlp_in", mix_mlp_in), (f"blocks.{i}.hook_mlp_out", keep_mlp)]
    with model.hooks(fwd_hooks=hooks), adapter.qkv_from(project):
        resid = adapter.embed(tokens)
        writers = _Writers(g, resid[None], workspace)
        add_writers(resid[None], 0)
        for block in model.blocks:
            resid = block(resid)
        resid = mix(resid, range(g.logits_index, g.logits_index + 1), g.n_upstream)[0]
        return adapter.unembed_at(resid, positions)


def node_keep(graph, node_mask: torch.Tensor) -> torch.Tensor:
    """An edge mask [U, V] from a node mask [U]: every edge out of node u weighs node_mask[u]."""
    return node_mask[:, None].expand(graph.n_upstream, graph.n_downstream)
