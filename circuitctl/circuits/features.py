"""Feature circuits (sparse feature circuits, Marks et al. 2024): SAE features and error nodes.

Every chosen site's output x is written as x = decode(f) + e: SAE features f and the SAE error
e. The units are the features and one error node per site, summed over positions
(``resid0/f12``, ``mlp1/err``) or one per position group of the task (``resid0/f12@end``,
`circuitctl.graph.positions`). Scores and membership are one flat vector [N] over every site's
block of ``n_groups x (d_sae + 1)`` entries (the last column of a block row is the error node).

Edges between nodes are sparse: the method scores them between the nodes it selected, and the
space keeps them for the circuit file and the drawing; evaluation ablates nodes. A node outside
the circuit carries its ablation value at its positions: the paired corrupt prompt's value
(resample), zero, or the mean over the task's prompts (mean), with every site recomputed in
forward order (an ablation upstream changes the features downstream).
"""

from __future__ import annotations

from typing import Any

import torch

from circuitctl import distributed
from circuitctl.circuits.space import OwnMask, entry
from circuitctl.errors import UsageError
from circuitctl.graph import naming
from circuitctl.graph.naming import Site
from circuitctl.graph.positions import PositionLayout
from circuitctl.patching.engine import BatchState, PatchingEngine

MAX_SAVED_NODES = 20_000  # node scores written beyond the circuit's (for curves and re-selection)
CURVE_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


def decompose(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, error) with x = decode(features) + error exactly."""
    features = sae.encode(x)
    return features, x - sae.decode(features)


def mean_states(runner, saes: dict, data, batch_size: int, per_position: bool) -> dict[Site, tuple[torch.Tensor, torch.Tensor]]:
    """{site: (mean features [1, P, d_sae], mean error [1, P, d])} over the clean prompts' real
    tokens (float32 sums over this rank's examples, all-reduced)."""
    device, dtype = runner.model.W_U.device, runner.model.W_U.dtype
    sums: dict[Site, list[torch.Tensor]] = {}
    count: Any = 0.0
    dims = (0,) if per_position else (0, 1)
    with torch.no_grad():
        for batch in distributed.shard(data).batches(batch_size):
            batch = batch.to(device)
            real = batch.real_tokens.float()[..., None]  # [B, P, 1]
            acts = runner.activations(batch.clean)
            count = count + real.sum(dims, keepdim=True)
            for site, sae in saes.items():
                f, e = decompose(sae, acts[site])
                parts = [(f.float() * real).sum(dims, keepdim=True), (e.float() * real).sum(dims, keepdim=True)]
                sums[site] = parts if site not in sums else [a + b for a, b in zip(sums[site], parts)]
    count = distributed.all_reduce_sum(count).clamp(min=1)
    P = data.clean.shape[1]
    return {
        site: tuple(distributed.all_reduce_sum(s).div(count).to(dtype).expand(1, P, -1).contiguous() for s in parts)
        for site, parts in sums.items()
    }


class FeatureSpace(OwnMask):
    kind = "feature"
    unit = "features"
    needs_node_ablation = False
    circuits_per_pass = 8

    def __init__(
        self,
        saes: dict[Site, Any],
        sae_sources: dict[str, Any],
        layout: PositionLayout | None,
        node_threshold: float = 0.0,
        edge_threshold: float = 0.0,
        edges: dict[str, float] | None = None,
        labels: dict[str, str] | None = None,
        stats: dict | None = None,
    ) -> None:
        self.saes = {site: saes[site] for site in naming.sort_sites(saes)}
        self.sites = list(self.saes)
        self.sae_sources = sae_sources
        self.layout = layout  # None: nodes summed over positions
        self.node_threshold, self.edge_threshold = node_threshold, edge_threshold
        self.edges = dict(edges or {})  # "u->d" -> score, between the nodes the method selected
        self.labels = dict(labels or {})  # feature node -> its top-activating tokens
        self.stats = dict(stats or {})
        self.n_groups = layout.n_groups if layout is not None else 1
        self.offsets: dict[Site, int] = {}
        offset = 0
        for site, sae in self.saes.items():
            self.offsets[site] = offset
            offset += self.n_groups * (sae.d_sae + 1)
        self._mask = torch.ones(offset, dtype=torch.bool, device="cpu")

    @classmethod
    def from_info(cls, info: dict, adapter, data) -> "FeatureSpace":
        from circuitctl.sae.loading import resolve_saes

        sources = dict(info.get("sae_sources") or {})
        missing = [site for site in info["sites"] if not sources.get(site)]
        if missing:
            raise UsageError(f"the circuit records no SAE source for site(s) {', '.join(missing)}")
        found = resolve_saes({site: sources[site] for site in info["sites"]}, None, adapter.model, adapter.device)
        layout = None
        if info.get("positions"):
            layout = PositionLayout.from_data(data, "a per-position feature circuit")
            layout.check_matches(info["positions"]["names"], "the feature circuit")
        return cls(
            {site: sae for site, (sae, _) in found.items()},
            sources,
            layout,
            float(info.get("node_threshold", 0.0)),
            float(info.get("edge_threshold", 0.0)),
            stats=info.get("stats"),
        )

    # -- units ------------------------------------------------------------------------------
    def info(self) -> dict:
        return {
            "kind": self.kind,
            "sites": [s.name for s in self.sites],
            "sae_sources": {s.name: self.sae_sources.get(s.name, "") for s in self.sites},
            "aggregation": "none" if self.layout is not None else "sum",
            "positions": self.layout.to_dict() if self.layout is not None else None,
            "node_threshold": self.node_threshold,
            "edge_threshold": self.edge_threshold,
            "stats": self.stats,
        }

    def _position(self, group: int) -> str | None:
        return None if self.layout is None else self.layout.names[group]

    def name_of(self, index: int) -> str:
        for site in reversed(self.sites):
            if index >= self.offsets[site]:
                group, column = divmod(index - self.offsets[site], self.saes[site].d_sae + 1)
                if column == self.saes[site].d_sae:
                    return naming.error_node(site.name, self._position(group))
                return naming.feature_node(site.name, column, self._position(group))
        raise IndexError(index)

    def index_of(self, name: str) -> int:
        node = naming.parse_feature_node(name)
        by_name = {s.name: s for s in self.sites}
        if node.site not in by_name:
            raise KeyError(f"the circuit has no SAE at site {node.site}")
        site = by_name[node.site]
        if (node.position is None) != (self.layout is None):
            raise KeyError("per-position and summed node names are mixed")
        group = 0 if node.position is None else self.layout.names.index(node.position) if node.position in self.layout.names else None
        if group is None:
            raise KeyError(f"unknown position '{node.position}'")
        d_sae = self.saes[site].d_sae
        column = d_sae if node.is_error else node.feature
        if column > d_sae or (not node.is_error and column >= d_sae):
            raise KeyError(f"the SAE at {site} has {d_sae} features")
        return self.offsets[site] + group * (d_sae + 1) + column

    def unit_names(self) -> list[str]:
        return [self.name_of(i) for i in range(self.n_total)]

    def site_view(self, values: torch.Tensor, site: Site) -> torch.Tensor:
        """[..., N] -> [..., n_groups, d_sae + 1]: one site's block (features, then the error)."""
        d = self.saes[site].d_sae + 1
        start = self.offsets[site]
        return values[..., start : start + self.n_groups * d].unflatten(-1, (self.n_groups, d))

    def prune(self, membership: torch.Tensor) -> torch.Tensor:
        return membership

    def nodes_in(self, membership: torch.Tensor) -> set[str]:
        return {self.name_of(i) for i in membership.nonzero().flatten().tolist()} | {naming.LOGITS}

    # -- files -----------------------------------------------------------------------------------
    def entries(self, scores: torch.Tensor, membership: torch.Tensor) -> dict:
        """Every circuit node and the MAX_SAVED_NODES strongest others (by one top-k, not a loop over features)."""
        scores = scores.double().cpu()
        k = min(MAX_SAVED_NODES, int((scores != 0).sum()))
        saved = scores.abs().topk(k).indices.tolist() if k else []
        circuit = membership.nonzero().flatten().tolist()
        nodes: dict[str, dict] = {}
        for index in circuit + [i for i in saved if not bool(membership[i])]:
            name = self.name_of(index)
            item = entry(scores[index], membership[index])
            if name in self.labels:
                item["label"] = self.labels[name]
            nodes[name] = item
        nodes[naming.LOGITS] = entry(None, True)
        kept = {name for name, item in nodes.items() if item["in_graph"]}
        edges = {}
        for name, score in self.edges.items():
            up, down = naming.split_edge(name)
            edges[name] = {"score": float(score), "in_graph": up in kept and down in kept and abs(score) > self.edge_threshold}
        return {"nodes": nodes, "edges": edges}

    def read(self, record: dict, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.zeros(self.n_total, device="cpu")
        membership = torch.zeros(self.n_total, dtype=torch.bool, device="cpu")
        for name, item in record["nodes"].items():
            if name == naming.LOGITS:
                continue
            try:
                index = self.index_of(name)
            except (KeyError, ValueError) as exc:
                raise UsageError(f"{origin}: node '{name}': {exc.args[0] if exc.args else exc}") from exc
            scores[index] = float(item.get("score") or 0.0)
            membership[index] = bool(item.get("in_graph", False))
            if "label" in item:
                self.labels[name] = item["label"]
        self.edges = {name: float(item.get("score") or 0.0) for name, item in record.get("edges", {}).items()}
        return scores, membership

    def mib(self, scores: torch.Tensor, membership: torch.Tensor, d_model: int) -> dict | None:
        return None

    def dot(self, scores: torch.Tensor, membership: torch.Tensor, title: str) -> str:
        from circuitctl.io.feature_drawing import feature_dot

        circuit = [self.name_of(i) for i in membership.nonzero().flatten().tolist()]
        node_scores = {name: float(scores[self.index_of(name)]) for name in circuit}
        kept = set(circuit) | {naming.LOGITS}
        edges = []
        for name, score in self.edges.items():
            up, down = naming.split_edge(name)
            if up in kept and down in kept and abs(score) > self.edge_threshold:
                edges.append((up, down, score))
        return feature_dot([s.name for s in self.sites], node_scores, circuit, edges, self.labels, title)

    def curve_sizes(self, scores: torch.Tensor) -> tuple[list[int], list[float] | None]:
        """Circuits of CURVE_SIZES nodes (and of every scored node), ranked by score."""
        n_scored = int((scores != 0).sum())
        return sorted({n for n in CURVE_SIZES if n < n_scored} | {max(1, n_scored)}), None

    def patcher(self, engine: PatchingEngine) -> "FeaturePatcher":
        return FeaturePatcher(engine, self)


class FeaturePatcher:
    """Runs the model with every site decoded from its kept features and error, the rest ablated."""

    def __init__(self, engine: PatchingEngine, space: FeatureSpace) -> None:
        from circuitctl.models.sae_sites import SiteRunner

        self.engine, self.space = engine, space
        self.runner = SiteRunner(engine.adapter.model, space.saes)
        self._means: dict[Site, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _key(self, site: Site, part: str) -> str:
        return f"feature_ablation:{site.name}:{part}"

    def prepare(self, state: BatchState) -> BatchState:
        """Ablation features and errors of every site ([1, B or 1, P, d_sae] and [1, B or 1, P, d])."""
        if self._key(self.space.sites[0], "f") in state.extras:
            return state
        kind = self.engine.ablation.type
        if kind == "resample":
            acts = self.runner.activations(state.batch.corrupt)
            values = {site: decompose(sae, acts[site]) for site, sae in self.space.saes.items()}
        elif kind == "mean":
            if self._means is None:
                self._means = mean_states(self.runner, self.space.saes, self.engine.data, self.engine.batch_size, self.engine.ablation.per_position)
            values = self._means
        else:  # zero ablation of features and error, as the reference code does
            P, d = state.batch.clean.shape[1], self.engine.adapter.cfg.d_model
            dtype, device = self.engine.adapter.dtype, self.engine.adapter.device
            values = {
                site: (torch.zeros(1, P, sae.d_sae, dtype=dtype, device=device), torch.zeros(1, P, d, dtype=dtype, device=device))
                for site, sae in self.space.saes.items()
            }
        for site, (f, e) in values.items():
            state.extras[self._key(site, "f")] = f[None]
            state.extras[self._key(site, "e")] = e[None]
        return state

    def _token_masks(self, keep: torch.Tensor, site: Site, groups: torch.Tensor | None):
        """(features [K, B|1, P|1, d_sae], error [K, B|1, P|1, 1]) kept at each token."""
        block = self.space.site_view(keep, site)  # [K, G, d_sae + 1]
        if groups is None:
            block = block[:, 0][:, None, None]  # [K, 1, 1, d_sae + 1]
        else:
            block = block[:, groups.clamp(min=0)]  # [K, B, P, d_sae + 1] (padding: any group, it is never read)
        return block[..., :-1], block[..., -1:]

    def logits(self, state: BatchState, keep: torch.Tensor) -> torch.Tensor:
        K, B = keep.shape[0], state.n
        groups = None
        if self.space.layout is not None:
            groups = self.space.layout.assign(state.batch).to(keep.device)
        edits = {}
        for site, sae in self.space.saes.items():
            keep_f, keep_e = self._token_masks(keep, site, groups)
            f_abl, e_abl = state.extras[self._key(site, "f")], state.extras[self._key(site, "e")]  # [1, B|1, P, .]
            edits[site] = _edit(sae, keep_f, keep_e, f_abl, e_abl, K, B)
        batch = state.batch
        with torch.no_grad():
            logits = self.runner.forward(batch.clean.repeat(K, 1), batch.answer_positions.repeat(K), edits)
        return logits.unflatten(0, (K, B))


def _edit(sae, keep_f, keep_e, f_abl, e_abl, K: int, B: int):
    """Replace a site's output [K*B, P, d] by decode(f') + e', kept parts clean, the rest ablated."""

    def edit(x: torch.Tensor) -> torch.Tensor:
        P = x.shape[1]
        f, e = decompose(sae, x)
        f = torch.where(keep_f[:, :, :P], f.view(K, B, P, -1), f_abl[:, :, :P])
        e = torch.where(keep_e[:, :, :P], e.view(K, B, P, -1), e_abl[:, :, :P])
        return sae.decode(f.flatten(0, 1)) + e.flatten(0, 1)

    return edit
