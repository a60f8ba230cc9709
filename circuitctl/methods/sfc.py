"""Sparse feature circuits (Marks et al. 2024).

Every chosen site's output x is written as x = decode(f) + e: SAE features f and the SAE
error e (so the model's output is unchanged). Nodes are the features and one error node per
site, summed over positions (``aggregation: sum``) or per position group of the task
(``aggregation: none``: the task's `PositionLayout`, e.g. ``resid0/f12@S2``; one group per
token for unlabelled prompts of one length). The result is a feature circuit space
(`circuitctl.circuits.features`) like every method's.

Node effects (indirect effect on the metric m of patching a node from its clean to its
ablated value), as the reference code computes them:

    IE(f_i) = grad_f_i m . (f_i,patch - f_i,clean),      grad_f m = (dm/dx) W_dec^T
    IE(e)   = sum_d dm/dx_d (e_patch - e_clean)_d

where dm/dx is the gradient at the clean run (attribution patching, ``steps: 1``) or its mean
over x = x_clean + alpha (x_patch - x_clean), alpha = k/steps, k = 0..steps-1, with every later
layer recomputed (integrated gradients, one site at a time; ``steps: 10`` as in the paper).

Edge effects between nodes u (upstream) and d (downstream):

    IE(u -> d) = grad_d m . (d d / d u) . (u_patch - u_clean)

with the Jacobian taken along direct paths only: one forward pass in which every site's output
is a constant (its clean value) plus the SAE decoding of leaf tensors for the circuit's nodes, so
that each site's raw output depends on upstream nodes only through paths that cross no other
site. One batched vector-Jacobian product per downstream site (cotangents = each downstream
node's gradient, stacked) gives the edges from every upstream node at once; no per-edge or
per-node forward passes. Edges into ``logits`` are the direct effects, from the same pass.

Scores are importance = metric sign x effect (positive: ablating the node hurts the behaviour),
averaged over examples. Nodes with |score| > node_threshold form the method's own circuit; edges
between them with |score| > edge_threshold are drawn and written with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from circuitctl.circuits.features import FeatureSpace, decompose, mean_states
from circuitctl.config.methods import SfcSettings
from circuitctl.errors import UsageError
from circuitctl.graph.naming import LOGITS, Site, edge, error_node, feature_node
from circuitctl.graph.positions import PositionLayout
from circuitctl.methods.base import DiscoveryContext, DiscoveryResult
from circuitctl.models.sae_sites import SiteRunner
from circuitctl.progress import bar
from circuitctl.sae.sae import SparseAutoencoder
from circuitctl.tasks.data import TaskData

VJP_ELEMENTS = 2**26  # cotangent elements per batched vector-Jacobian product


# ----------------------------------------------------------------------------------------
# Decomposition of one batch: features and errors, clean and patched
# ----------------------------------------------------------------------------------------
@dataclass
class SiteState:
    """One site on one batch: clean and patched features and errors."""

    x_clean: torch.Tensor  # [B, P, d]
    f_clean: torch.Tensor  # [B, P, d_sae]
    e_clean: torch.Tensor  # [B, P, d]
    f_patch: torch.Tensor  # [B|1, P, d_sae]
    e_patch: torch.Tensor  # [B|1, P, d]
    x_patch: torch.Tensor  # [B|1, P, d] = decode(f_patch) + e_patch

    @property
    def delta_f(self) -> torch.Tensor:
        return self.f_patch - self.f_clean

    @property
    def delta_e(self) -> torch.Tensor:
        return self.e_patch - self.e_clean


class SiteStates:
    """Clean and patched SAE states of every site, for resample, zero or mean ablation."""

    def __init__(self, runner: SiteRunner, saes: dict[Site, SparseAutoencoder], context: DiscoveryContext, batch_size: int):
        self.runner, self.saes = runner, saes
        self.kind = context.ablation.type
        self.means: dict[Site, tuple[torch.Tensor, torch.Tensor]] | None = None
        if self.kind == "mean":
            self.means = mean_states(runner, saes, context.data, batch_size, context.ablation.per_position)

    def states(self, batch: TaskData, clean_acts: dict[Site, torch.Tensor]) -> dict[Site, SiteState]:
        corrupt_acts = self.runner.activations(batch.corrupt) if self.kind == "resample" else None
        states = {}
        with torch.no_grad():
            for site, sae in self.saes.items():
                x = clean_acts[site]
                f, e = decompose(sae, x)
                if corrupt_acts is not None:
                    x_p = corrupt_acts[site]
                    f_p, e_p = decompose(sae, x_p)
                elif self.means is not None:
                    f_p, e_p = (m[:, : x.shape[1]] for m in self.means[site])
                    x_p = sae.decode(f_p) + e_p
                else:  # zero ablation of features and error, as the reference code does
                    f_p, e_p = torch.zeros_like(f[:1]), torch.zeros_like(e[:1])
                    x_p = sae.decode(f_p) + e_p
                states[site] = SiteState(x, f, e, f_p, e_p, x_p)
        return states


def repeated_objective(metric, batch: TaskData, reference: torch.Tensor):
    """Sum of the metric over n stacked copies of the batch (logits [n * B, vocab])."""
    B = batch.n

    def objective(logits: torch.Tensor) -> torch.Tensor:
        n = logits.shape[0] // B
        return sum(metric(logits[i * B : (i + 1) * B], batch, reference).sum() for i in range(n))

    return objective


def group_onehot(layout: PositionLayout, batch: TaskData, dtype) -> torch.Tensor:
    """[B, P, G]: 1 where a token belongs to a position group (padding belongs to none)."""
    groups = layout.assign(batch)
    onehot = torch.nn.functional.one_hot(groups.clamp(min=0), layout.n_groups).to(dtype)
    return onehot * (groups >= 0)[..., None].to(dtype)


# ----------------------------------------------------------------------------------------
# Nodes
# ----------------------------------------------------------------------------------------
@dataclass
class NodeSet:
    """The circuit's nodes at one site: feature indices (+ position groups) and error groups.

    sum aggregation: groups are None; per position group: parallel lists of (feature, group).
    """

    features: list[int]
    feature_positions: list[int | None]
    error_positions: list[int | None]

    @property
    def size(self) -> int:
        return len(self.features) + len(self.error_positions)

    def unique_features(self) -> list[int]:
        return sorted(set(self.features))


def select_nodes(feature_scores: torch.Tensor, error_scores: torch.Tensor, threshold: float, per_position: bool) -> NodeSet:
    """Nodes with |score| > threshold; scores [d_sae] / [] (sum) or [G, d_sae] / [G] (per position group)."""
    if per_position:
        pos, feat = (feature_scores.abs() > threshold).nonzero(as_tuple=True)
        err = (error_scores.abs() > threshold).nonzero().flatten().tolist()
        return NodeSet(feat.tolist(), pos.tolist(), err)
    feat = (feature_scores.abs() > threshold).nonzero().flatten().tolist()
    return NodeSet(feat, [None] * len(feat), [None] if abs(float(error_scores)) > threshold else [])


# ----------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------
def find_feature_circuit(
    context: DiscoveryContext,
    settings: SfcSettings,
    saes: dict[Site, SparseAutoencoder],
    sources: dict[Site, Any] | None = None,
) -> DiscoveryResult:
    if context.metric.name == "kl" and settings.steps == 1:
        raise UsageError(
            "method 'sfc' with metric 'kl' and steps 1: the gradient of the KL divergence is zero at the clean run, "
            "so every attribution would be 0; use steps > 1 (integrated gradients) or logit_diff / prob_diff"
        )
    started = time.perf_counter()
    runner = SiteRunner(context.adapter.model, saes)
    saes = {site: saes[site] for site in runner.sites}
    data = context.data
    layout = PositionLayout.from_data(data, "method.aggregation: none (a node per position group)") if settings.aggregation == "none" else None
    per_position = layout is not None
    decomposer = SiteStates(runner, saes, context, settings.batch_size)
    sign = context.metric.importance_sign

    feature_effects, error_effects, gradients, totals = node_effects(runner, saes, decomposer, context, settings, layout)
    feature_scores = {s: sign * v / data.n for s, v in feature_effects.items()}
    error_scores = {s: sign * v / data.n for s, v in error_effects.items()}
    node_seconds = time.perf_counter() - started

    selected = {s: select_nodes(feature_scores[s], error_scores[s], settings.node_threshold, per_position) for s in runner.sites}
    edges = edge_effects(runner, saes, decomposer, context, settings, selected, gradients, layout)
    stats = {
        "n_examples": data.n,
        "metric_clean": totals["clean"] / data.n,
        "metric_patched": totals["patched"] / data.n,
        "node_effect_sums": {s.name: float(feature_scores[s].sum() + error_scores[s].sum()) for s in runner.sites},
        "estimator": "attribution" if settings.steps == 1 else f"integrated gradients ({settings.steps} steps)",
        "seconds_nodes": round(node_seconds, 3),
        "seconds_edges": round(time.perf_counter() - started - node_seconds, 3),
    }
    space = FeatureSpace(
        saes, {s.name: (sources or {}).get(s, "") for s in runner.sites}, layout, settings.node_threshold, settings.edge_threshold, stats=stats
    )
    scores = torch.cat([_site_scores(feature_scores[s], error_scores[s]).flatten() for s in runner.sites]).float().cpu()
    membership = scores.abs() > settings.node_threshold
    circuit_nodes = [space.name_of(i) for i in membership.nonzero().flatten().tolist()]
    in_circuit = set(circuit_nodes)
    space.edges = {edge(u, d): sign * value / data.n for (u, d), value in edges.items() if u in in_circuit}
    space.labels = top_tokens(runner, saes, data, circuit_nodes, context.adapter.tokenizer, settings.batch_size)
    return DiscoveryResult(scores, membership, space=space, forward_passes=float(totals["forward_passes"]))


def _site_scores(features: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
    """[G, d_sae + 1]: a site's feature scores ([G, d_sae] or [d_sae]) and error scores ([G] or []) side by side."""
    features = features.reshape(-1, features.shape[-1])
    return torch.cat([features, error.reshape(-1, 1).to(features.dtype)], dim=1)


def node_effects(runner, saes, decomposer: SiteStates, context: DiscoveryContext, settings: SfcSettings, layout: PositionLayout | None):
    """Summed node effects over the dataset (IE, not yet signed or averaged), the per-batch
    gradients dm/dx of every site (kept on the CPU for the edges), and metric totals."""
    data, metric, device = context.data, context.metric, context.adapter.device
    features = {s: 0.0 for s in runner.sites}
    errors = {s: 0.0 for s in runner.sites}
    gradients: list[dict[Site, torch.Tensor]] = []
    totals = {"clean": 0.0, "patched": 0.0, "forward_passes": 0.0}
    alphas = [k / settings.steps for k in range(settings.steps)]
    n_batches = -(-data.n // settings.batch_size)
    with bar(f"sfc node effects ({'attribution' if settings.steps == 1 else 'IG'})", n_batches) as advance:
        for batch in data.batches(settings.batch_size):
            batch = batch.to(device)
            positions = batch.answer_positions
            with torch.no_grad():
                resid_pre: list[torch.Tensor] = []
                clean_acts = runner.activations(batch.clean, keep_resid=resid_pre)
                clean_logits = runner.forward(batch.clean, positions)
            objective = repeated_objective(metric, batch, clean_logits)
            states = decomposer.states(batch, clean_acts)
            if layout is None:
                reduce = lambda t: t.sum((0, 1))  # noqa: E731
            else:  # per position group: [B, P, ...] -> [G, ...]
                onehot = group_onehot(layout, batch, clean_logits.dtype)
                reduce = lambda t: torch.einsum("bp...,bpg->g...", t, onehot.to(t.dtype))  # noqa: E731
            if settings.steps == 1:
                _, _, grads = runner.gradients(batch.clean, positions, objective)
            else:
                grads = {
                    site: runner.interpolated_gradient(
                        batch.clean, positions, site, st.x_clean, st.x_patch, alphas, objective, resid_pre
                    )
                    for site, st in states.items()
                }
            with torch.no_grad():
                for site, st in states.items():
                    g = grads[site]
                    grad_f = g @ saes[site].decoder_matrix().T
                    features[site] = features[site] + reduce(grad_f * st.delta_f)
                    errors[site] = errors[site] + reduce((g * st.delta_e).sum(-1))
                totals["clean"] += float(metric(clean_logits, batch, clean_logits).sum())
                patched = runner.forward(batch.clean, positions, {s: (lambda x, st=st: st.x_patch.expand_as(x)) for s, st in states.items()})
                totals["patched"] += float(metric(patched, batch, clean_logits).sum())
            gradients.append({site: g.detach().cpu() for site, g in grads.items()})
            totals["forward_passes"] += batch.n / data.n * (4 + (2 if settings.steps == 1 else 2 * settings.steps * len(states)))
            advance()
    return features, errors, gradients, totals


def edge_effects(
    runner, saes, decomposer: SiteStates, context: DiscoveryContext, settings: SfcSettings,
    selected: dict[Site, NodeSet], gradients: list[dict[Site, torch.Tensor]], layout: PositionLayout | None,
) -> dict[tuple[str, str], float]:
    """Summed edge effects {(upstream node, downstream node): IE} between selected nodes."""
    data, metric, device = context.data, context.metric, context.adapter.device
    sites = runner.sites
    totals: dict[tuple[str, str], float] = {}
    if not any(ns.size for ns in selected.values()):
        return totals
    labels = list(layout.names) if layout is not None else None
    n_batches = -(-data.n // settings.batch_size)
    with bar("sfc edge effects (vector-Jacobian products)", n_batches) as advance:
        for batch, grads in zip(data.batches(settings.batch_size), gradients):
            batch = batch.to(device)
            positions = batch.answer_positions
            with torch.no_grad():
                clean_acts = runner.activations(batch.clean)
                clean_logits = runner.forward(batch.clean, positions)
            states = decomposer.states(batch, clean_acts)
            onehot = group_onehot(layout, batch, clean_logits.dtype) if layout is not None else None  # [B, P, G]
            leaves = {s: _Leaves.make(saes[s], states[s], selected[s]) for s in sites}
            raw: dict[Site, torch.Tensor] = {}
            with torch.enable_grad():
                edits = {s: leaves[s].edit(raw, s) for s in sites}
                logits = runner.forward(batch.clean, positions, edits)
                value = metric(logits, batch, clean_logits).sum()
                # direct effects on the metric
                direct = _vjp([value], leaves, sites, None, retain=True)
                _accumulate(totals, [LOGITS], leaves, states, labels, onehot, direct, batch_rows=False)
                for d_index, down in enumerate(sites):
                    nodes = selected[down]
                    if not nodes.size or down not in raw or not raw[down].requires_grad:
                        continue
                    upstream = sites[:d_index]
                    if not any(leaves[u].any for u in upstream):
                        continue
                    g = grads[down].to(device)
                    outputs, cotangents, names = _downstream(saes[down], raw[down], g, nodes, down, labels, onehot)
                    step = max(1, VJP_ELEMENTS // max(1, sum(c[0].numel() for c in cotangents)))
                    for lo in range(0, len(names), step):
                        chunk = [c[lo : lo + step] for c in cotangents]
                        result = _vjp(outputs, leaves, upstream, chunk, retain=True)
                        _accumulate(totals, names[lo : lo + step], leaves, states, labels, onehot, result, batch_rows=True)
            advance()
    return totals


@dataclass
class _Leaves:
    """The leaf tensors of one site in the direct-path pass."""

    features: list[int]  # SAE feature indices that are circuit nodes (any position)
    f_leaf: torch.Tensor | None  # [B, P, n] clean values of those features, requires grad
    e_leaf: torch.Tensor | None  # [B, P, d] clean error, requires grad (when the error is a node)
    decoder_rows: torch.Tensor | None  # [n, d]
    x_clean: torch.Tensor
    nodes: NodeSet

    @staticmethod
    def make(sae: SparseAutoencoder, state: SiteState, nodes: NodeSet) -> "_Leaves":
        feats = nodes.unique_features()
        f_leaf = state.f_clean[..., feats].clone().requires_grad_(True) if feats else None
        e_leaf = state.e_clean.clone().requires_grad_(True) if nodes.error_positions else None
        rows = sae.decoder_matrix()[feats] if feats else None
        return _Leaves(feats, f_leaf, e_leaf, rows, state.x_clean, nodes)

    @property
    def any(self) -> bool:
        return self.f_leaf is not None or self.e_leaf is not None

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.f_leaf, self.e_leaf]

    def edit(self, raw: dict, site: Site):
        def fn(x: torch.Tensor) -> torch.Tensor:
            raw[site] = x  # the raw output, a function of upstream leaves along direct paths
            out = self.x_clean  # a constant: cuts every path through this site
            if self.f_leaf is not None:
                out = out + (self.f_leaf - self.f_leaf.detach()) @ self.decoder_rows
            if self.e_leaf is not None:
                out = out + (self.e_leaf - self.e_leaf.detach())
            return out

        return fn


def _downstream(sae: SparseAutoencoder, raw: torch.Tensor, grad_x: torch.Tensor, nodes: NodeSet, site: Site, labels, onehot):
    """Outputs (selected features, error) of a downstream site as functions of its raw input,
    and stacked cotangents (one per downstream node: its gradient dm/d node, masked to its
    position group's tokens; onehot [B, P, G] or None for nodes summed over positions)."""
    feats = nodes.unique_features()
    column = {f: i for i, f in enumerate(feats)}
    features = sae.encode(raw)
    outputs, cotangents = [], []
    names = [feature_node(site.name, f, _label(labels, p)) for f, p in zip(nodes.features, nodes.feature_positions)]
    names += [error_node(site.name, _label(labels, p)) for p in nodes.error_positions]
    K = len(names)
    if feats:
        grad_f = (grad_x @ sae.decoder_matrix().T)[..., feats]  # [B, P, n]
        cot = torch.zeros((K,) + tuple(grad_f.shape), dtype=grad_f.dtype, device=grad_f.device)
        for k, (f, p) in enumerate(zip(nodes.features, nodes.feature_positions)):
            j = column[f]
            cot[k, :, :, j] = grad_f[:, :, j] if p is None else grad_f[:, :, j] * onehot[:, :, p].to(grad_f.dtype)
        outputs.append(features[..., feats])
        cotangents.append(cot)
    if nodes.error_positions:
        error = raw - sae.decode(features)
        cot = torch.zeros((K,) + tuple(grad_x.shape), dtype=grad_x.dtype, device=grad_x.device)
        offset = len(nodes.features)
        for k, p in enumerate(nodes.error_positions):
            cot[offset + k] = grad_x if p is None else grad_x * onehot[:, :, p, None].to(grad_x.dtype)
        outputs.append(error)
        cotangents.append(cot)
    return outputs, cotangents, names


def _vjp(outputs, leaves, upstream, cotangents, retain: bool):
    """d(cotangent . outputs)/d(leaves of the upstream sites); batched over cotangents' first dim."""
    inputs, where = [], []
    for site in upstream:
        for slot, tensor in enumerate(leaves[site].tensors()):
            if tensor is not None:
                inputs.append(tensor)
                where.append((site, slot))
    if not inputs:
        return {}
    grads = torch.autograd.grad(
        outputs, inputs, grad_outputs=cotangents, retain_graph=retain, allow_unused=True,
        is_grads_batched=cotangents is not None,
    )
    return {key: g for key, g in zip(where, grads) if g is not None}


def _accumulate(totals, names: list[str], leaves, states, labels, onehot, grads, batch_rows: bool):
    """Add sum over examples (and positions of a node's group) of grad x delta for each (upstream node, downstream node)."""
    for (site, slot), grad in grads.items():
        leaf, state = leaves[site], states[site]
        if not batch_rows:
            grad = grad[None]
        if slot == 0:
            product = grad * state.delta_f[..., leaf.features]  # [K, B, P, n]
            column = {f: i for i, f in enumerate(leaf.features)}
            summed = product.sum((1, 2)) if onehot is None else torch.einsum("kbpn,bpg->kgn", product, onehot.to(product.dtype))
            for f, p in zip(leaf.nodes.features, leaf.nodes.feature_positions):
                values = summed[:, column[f]] if p is None else summed[:, p, column[f]]
                _add(totals, feature_node(site.name, f, _label(labels, p)), names, values)
        else:
            product = (grad * state.delta_e).sum(-1)  # [K, B, P]
            summed = product.sum((1, 2)) if onehot is None else torch.einsum("kbp,bpg->kg", product, onehot.to(product.dtype))
            for p in leaf.nodes.error_positions:
                values = summed if p is None else summed[:, p]
                _add(totals, error_node(site.name, _label(labels, p)), names, values)


def _add(totals, upstream_name: str, names, values: torch.Tensor) -> None:
    for down_name, value in zip(names, values.tolist()):
        key = (upstream_name, down_name)
        totals[key] = totals.get(key, 0.0) + value


def _label(labels: list[str] | None, position: int | None) -> str | None:
    return None if position is None or labels is None else labels[position]


# ----------------------------------------------------------------------------------------
# Feature labels
# ----------------------------------------------------------------------------------------
def top_tokens(runner, saes, data: TaskData, nodes: list[str], tokenizer, batch_size: int, k: int = 3) -> dict[str, str]:
    """For each circuit feature, the tokens that activate it most on the clean prompts."""
    from circuitctl.graph.naming import parse_feature_node

    by_name = {s.name: s for s in saes}
    wanted: dict[Site, list[int]] = {}
    for name in nodes:
        node = parse_feature_node(name)
        if not node.is_error and node.feature not in wanted.setdefault(by_name[node.site], []):
            wanted[by_name[node.site]].append(node.feature)  # type: ignore[arg-type]
    wanted = {site: feats for site, feats in wanted.items() if feats}
    if not wanted:
        return {}
    device, d_vocab = runner.model.W_U.device, runner.model.cfg.d_vocab
    # per site: the largest activation of each wanted feature on each token id [n, d_vocab]
    best = {site: torch.zeros(len(feats), d_vocab, device=device) for site, feats in wanted.items()}
    with torch.no_grad():
        for batch in data.batches(batch_size):
            batch = batch.to(device)
            acts = runner.activations(batch.clean)
            real = batch.real_tokens
            token_ids = batch.clean[real]
            for site, feats in wanted.items():
                values = saes[site].encode(acts[site])[..., feats][real].T.float()  # [n, n_tokens]
                index = token_ids[None].expand_as(values)
                best[site] = best[site].scatter_reduce(1, index, values, reduce="amax")
    result = {}
    for name in nodes:
        node = parse_feature_node(name)
        if node.is_error:
            continue
        site = by_name[node.site]
        row = best[site][wanted[site].index(node.feature)]
        values, ids = row.topk(min(k, d_vocab))
        words = [_token_text(tokenizer, int(t)) for t, v in zip(ids, values) if v > 0]
        result[name] = ", ".join(words) if words else "(inactive on the task prompts)"
    return result


def _token_text(tokenizer, token: int) -> str:
    if tokenizer is None:
        return f"#{token}"
    try:
        return repr(tokenizer.decode([token]))
    except Exception:  # tokenizers differ in what they reject
        return f"#{token}"


def discover(context: DiscoveryContext, settings: SfcSettings) -> DiscoveryResult:
    """The method-table entry: resolve the SAEs (paths relative to the working directory, the
    config's directory or the shipped data) and find the feature circuit."""
    from circuitctl.sae.loading import resolve_saes

    found = resolve_saes(settings.saes, context.config_dir, context.adapter.model, context.adapter.device)
    return find_feature_circuit(context, settings, {s: sae for s, (sae, _) in found.items()}, {s: src for s, (_, src) in found.items()})
