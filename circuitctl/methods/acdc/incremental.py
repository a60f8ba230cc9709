"""Greedy edge searches: the metric of the current circuit with a few more edges removed.

ACDC-style searches keep a *current* circuit (a set of removed edges) and repeatedly ask:
what is the metric if these edges into one downstream input v are removed as well? Two
evaluators answer that question, for K such trials at once:

* `LayerwiseSearch` builds the K full ablation masks and runs `PatchingEngine.metric_values`
  (every layer from v's layer on, for every trial). Works for every model the adapter supports.
* `IncrementalSearch` keeps every node's output under the current circuit. Removing edges
  into v changes only v's node; the change reaches the logits only through the edges still
  present, so only that node and its descendants in the current circuit are recomputed (one
  head, not a whole layer), and only at the positions they are read at: a node read only by
  the logits, by MLPs or by queries of such nodes is needed at the answer positions alone.

Both give the same values up to floating-point rounding (tested against each other and
against `PatchingEngine`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from circuitctl import distributed
from circuitctl.graph import naming
from circuitctl.graph.graph import Graph
from circuitctl.methods.acdc.nodes import NodeComputer
from circuitctl.metrics.readout import MetricReadout
from circuitctl.patching.engine import BatchState, PatchingEngine, check_finite

DEAD, ANSWER, EVERY = 0, 1, 2  # where a node's output is needed: nowhere, answer positions, every position


class EdgeSearch(Protocol):
    removed: torch.Tensor  # bool [U, V], the edges removed so far

    def current_value(self) -> float: ...

    def trial_values(self, v: int, sources: list[int], ablate: torch.Tensor) -> torch.Tensor:
        """Mean metric [K] with, in trial k, the edges sources[j] -> v with ablate[k, j] removed too."""
        ...

    def commit(self, v: int, sources: list[int]) -> None: ...

    def drop(self, v: int) -> None: ...


class LayerwiseSearch:
    """Trials as full ablation masks through `PatchingEngine.metric_values`."""

    def __init__(self, engine: PatchingEngine, removed: torch.Tensor | None = None) -> None:
        self.engine = engine
        self.graph = engine.graph
        self.removed = torch.zeros_like(self.graph.edge_mask) if removed is None else removed.clone()

    def current_value(self) -> float:
        if not self.removed.any():
            return self.engine.clean_value()
        return float(self.engine.metric_values(self.removed[None])[0])

    def trial_values(self, v: int, sources: list[int], ablate: torch.Tensor) -> torch.Tensor:
        """Mean metric [K] with, in trial k, the edges sources[j] -> v with ablate[k, j] removed too."""
        masks = self.removed[None].repeat(ablate.shape[0], 1, 1)
        masks[:, sources, v] |= ablate
        return self.engine.metric_values(masks, chunk=ablate.shape[0])

    def commit(self, v: int, sources: list[int]) -> None:
        self.removed[sources, v] = True

    def drop(self, v: int) -> None:
        self.removed[: self.graph.prefix_len[v], v] = True


class _Batch:
    """One data batch: cached clean/ablation activations and the current circuit's node outputs.

    Every [U, B, P, d] table is also kept at the answer positions ([U, B, 1, d], suffix
    ``_ans``), since most nodes late in the search are read there only.
    """

    def __init__(self, state: BatchState, graph: Graph, readout: MetricReadout) -> None:
        self.state = state
        self.readout = readout  # final residuals [K, B, d] -> metric [K, B], only the logits it needs
        clean = state.clean
        self.ans = state.batch.answer_positions
        self.rows = torch.arange(self.ans.shape[0], device=self.ans.device)
        self.clean = clean.outputs
        self.ablation = state.ablation_outputs.expand_as(clean.outputs)  # zero / mean ablations have B = 1
        self.clean_minus_ablation = clean.outputs - state.ablation_outputs
        self.current = clean.outputs.clone()  # node outputs in the current circuit
        for name in ("clean", "ablation", "clean_minus_ablation", "current"):
            setattr(self, name + "_ans", self.at(getattr(self, name), ANSWER).clone())
        self.differs = torch.zeros(graph.n_upstream, dtype=torch.bool, device="cpu")  # current output != clean output
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}  # (v, where) -> current input of v
        self.projections: dict[tuple[int, str, int], torch.Tensor] = {}  # (node, channel, where) -> q/k/v

    def at(self, x: torch.Tensor, where: int) -> torch.Tensor:
        """x [..., B, P, d] at the positions `where` needs: all, or [..., B, 1, d] at the answers."""
        return x if where == EVERY else x[..., self.rows, self.ans, :].unsqueeze(-2)

    def table(self, name: str, index, where: int) -> torch.Tensor:
        """Rows `index` of the table `name` (clean, ablation, clean_minus_ablation, current) at `where`."""
        return getattr(self, name if where == EVERY else name + "_ans")[index]

    def set_current(self, node: int, out: torch.Tensor, where: int) -> None:
        """Store a node's new output [B, P', d] computed at `where`."""
        if where == EVERY:
            self.current[node] = out
            self.current_ans[node] = self.at(out, ANSWER)
        else:
            self.current[node][self.rows, self.ans] = out[:, 0]
            self.current_ans[node] = out
        self.differs[node] = True


class IncrementalSearch:
    """Trials that recompute only the changed node and its descendants in the current circuit."""

    def __init__(self, engine: PatchingEngine, computer: NodeComputer, removed: torch.Tensor | None = None) -> None:
        self.engine = engine
        self.computer = computer
        g = self.graph = engine.graph
        self.removed = torch.zeros_like(g.edge_mask) if removed is None else removed.clone()
        self.present = g.edge_mask & ~self.removed
        L, H = g.spec.n_layers, g.spec.n_heads
        # node (upstream index, -1 = logits) and channel ("q", "k", "v", "mlp", "logits") of every input
        self.node_of: list[int] = []
        self.channel_of: list[str] = []
        self.inputs_of: dict[int, list[int]] = {}
        for v in range(g.n_downstream):
            parsed = naming.parse_node(g.downstream[v])
            node = -1 if parsed.kind == "logits" else g.upstream_index[parsed.base]
            self.node_of.append(node)
            self.channel_of.append(parsed.channel or parsed.kind)
            self.inputs_of.setdefault(node, []).append(v)
        self.layer_of = g.upstream_layer
        self.head_of = {g.head_out_start[l] + h: h for l in range(L) for h in range(H)}
        unembedding = computer.unembedding
        self.batches = [  # this rank's share under torchrun
            _Batch(state, g, MetricReadout(unembedding, engine.metric, state.batch, state.clean.logits)) for state in engine.local_states()
        ]
        self._value: float | None = None
        self._need: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.removed.any():
            self._rebuild()

    # -- the current circuit -------------------------------------------------------------
    def current_value(self) -> float:
        if self._value is None:
            if not self.removed.any():
                self._value = self.engine.clean_value()
            else:
                total = torch.zeros((), dtype=torch.float64, device="cpu")
                for b in self.batches:
                    final = self._input(b, self.graph.logits_index, ANSWER)[:, 0]
                    total += b.readout(final[None]).double().sum().cpu()
                self._value = float(distributed.all_reduce_sum(total)) / self.engine.data.n
        return self._value

    def _where_needed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(node -> DEAD/ANSWER/EVERY, input -> where its value is read), from the present edges."""
        if self._need is None:
            self._need = self._compute_where_needed()
        return self._need

    def _compute_where_needed(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.graph
        need_in = torch.zeros(g.n_downstream, dtype=torch.long, device="cpu")
        need_node = torch.zeros(g.n_upstream, dtype=torch.long, device="cpu")

        def set_node(node: int, where: int) -> None:
            for v in self.inputs_of.get(node, []):
                channel = self.channel_of[v]
                if where == DEAD:
                    need_in[v] = DEAD
                elif channel in ("k", "v") or (channel == "q" and self.computer.heads_need_all_positions):
                    need_in[v] = EVERY
                else:
                    need_in[v] = where

        set_node(-1, ANSWER)
        for u in range(g.n_upstream - 1, -1, -1):  # consumers come later in the upstream order
            readers = self.present[u]
            where = int(need_in[readers].max()) if bool(readers.any()) else DEAD
            need_node[u] = where
            set_node(u, where)
        return need_node, need_in

    def _descendants(self, node: int) -> list[int]:
        """Nodes reachable from `node` along present edges (excluding logits), in topological order."""
        seen, stack = {node}, [node]
        while stack:
            for v in self.present[stack.pop()].nonzero().flatten().tolist():
                c = self.node_of[v]
                if c >= 0 and c not in seen:
                    seen.add(c)
                    stack.append(c)
        return sorted(seen - {node})

    def _input(self, b: _Batch, v: int, where: int) -> torch.Tensor:
        """Current value of input v [B, P', d]: the clean input minus, for every upstream node,
        its clean output plus what the edge carries now (ablation if removed, else current output)."""
        key = (v, where)
        if key not in b.inputs:
            p = self.graph.prefix_len[v]
            removed = self.removed[:p, v]
            changed = (b.differs[:p] & ~removed).nonzero().flatten()
            x = b.at(self._clean_input(b, v), where)
            if bool(removed.any()):
                # a sum over the removed senders as one product with their indicator: no copy of their rows
                table = b.table("clean_minus_ablation", slice(0, p), where)
                weights = removed.to(device=table.device, dtype=table.dtype)
                x = x - (weights @ table.reshape(p, -1)).view(x.shape)
            if len(changed):
                x = x - (b.table("clean", changed, where) - b.table("current", changed, where)).sum(0)
            b.inputs[key] = x
        return b.inputs[key]

    def _clean_input(self, b: _Batch, v: int) -> torch.Tensor:
        g, resid = self.graph, b.state.clean.resid
        layer = g.downstream_layer[v]
        if self.channel_of[v] == "mlp" and not g.spec.parallel_attn_mlp:
            return resid[layer + 1] - b.clean[g.mlp_out_index[layer]]  # resid_mid
        return resid[layer]

    def _projection(self, b: _Batch, node: int, channel: str, where: int) -> torch.Tensor:
        key = (node, channel, where)
        if key not in b.projections:
            v = self.inputs_of[node]["qkv".index(channel)]
            x = self._input(b, v, where)
            b.projections[key] = self.computer.project(self.layer_of[node], self.head_of[node], channel, x)
        return b.projections[key]

    def _output(self, b: _Batch, node: int, new_inputs: dict[int, torch.Tensor], where: int) -> torch.Tensor:
        """The node's output with some inputs replaced ([K, B, P', d] each), at `where`."""
        layer = self.layer_of[node]
        if node not in self.head_of:  # an MLP
            (x,) = new_inputs.values()
            return self.computer.mlp(layer, x)
        head = self.head_of[node]
        parts = {}
        for channel, v in zip("qkv", self.inputs_of[node]):
            at = where if channel == "q" else EVERY
            if self.computer.heads_need_all_positions:
                at = EVERY
            if v in new_inputs:
                parts[channel] = self.computer.project(layer, head, channel, new_inputs[v])
            else:
                parts[channel] = self._projection(b, node, channel, at)
        queries = b.ans if where == ANSWER and not self.computer.heads_need_all_positions else None
        z = self.computer.attend(layer, parts["q"], parts["k"], parts["v"], queries)
        out = self.computer.head_output(layer, head, z)
        if queries is None and where == ANSWER:
            out = b.at(out, ANSWER)
        return out

    # -- trials --------------------------------------------------------------------------
    def _trial(self, b: _Batch, v: int, sources: list[int], ablate: torch.Tensor, need) -> tuple[torch.Tensor, dict]:
        """Final residuals [K, B, d] at the answer positions, and the changed nodes' new outputs."""
        need_node, need_in = need
        node, K = self.node_of[v], ablate.shape[0]
        logits_in = self._input(b, self.graph.logits_index, ANSWER)[:, 0]
        if node >= 0 and int(need_node[node]) == DEAD:  # read by nothing: no trial changes the output
            return logits_in.expand(K, -1, -1), {}
        where_v = ANSWER if node < 0 else int(need_in[v])
        src = torch.tensor(sources, device=b.current.device)
        diff = b.table("current", src, where_v) - b.table("ablation", src, where_v)  # what removing each edge takes away
        x = self._input(b, v, where_v)[None] - torch.einsum("kn,nbpd->kbpd", ablate.to(diff.dtype), diff)
        if node < 0:
            return x[:, :, 0], {}
        changed = {node: (int(need_node[node]), self._output(b, node, {v: x}, int(need_node[node])))}
        for c in self._descendants(node):
            if int(need_node[c]) == DEAD:
                continue
            new_inputs = {}
            for vc in self.inputs_of[c]:
                senders = [w for w in changed if bool(self.present[w, vc])]
                if not senders:
                    continue
                where = int(need_in[vc])
                x_c = self._input(b, vc, where)
                for w in senders:
                    x_c = x_c + self._delta(b, w, changed[w], where)
                new_inputs[vc] = x_c
            if new_inputs:
                where = int(need_node[c])
                changed[c] = (where, self._output(b, c, new_inputs, where))
        final = logits_in.expand(K, -1, -1)
        for w, entry in changed.items():
            if bool(self.present[w, self.graph.logits_index]):
                final = final + self._delta(b, w, entry, ANSWER)[..., 0, :]
        return final, changed

    def _delta(self, b: _Batch, node: int, entry: tuple[int, torch.Tensor], where: int) -> torch.Tensor:
        """New minus current output of a changed node, at `where` ([K, B, P', d])."""
        made_at, out = entry
        if made_at == ANSWER and where == EVERY:
            raise AssertionError("a node computed at the answer positions is read at every position")
        out = out if made_at == where else b.at(out, where)
        return out - b.table("current", node, where)

    def trial_values(self, v: int, sources: list[int], ablate: torch.Tensor) -> torch.Tensor:
        """Mean metric [K] with, in trial k, the edges sources[j] -> v with ablate[k, j] removed too."""
        need = self._where_needed()
        K = ablate.shape[0]
        totals = torch.zeros(K, dtype=torch.float64, device="cpu")
        for b in self.batches:
            final, _ = self._trial(b, v, sources, ablate, need)
            # the final residual, not the logits: 60x smaller for GPT-2, and NaN reaches both
            check_finite(final, "a patched run")
            totals += b.readout(final).double().sum(1).cpu()
        return distributed.all_reduce_sum(totals) / self.engine.data.n

    def commit(self, v: int, sources: list[int]) -> None:
        """Remove the edges sources -> v and bring every node output up to date."""
        need = self._where_needed()
        ones = torch.ones(1, len(sources), dtype=torch.bool, device="cpu")
        for b in self.batches:
            _, changed = self._trial(b, v, sources, ones, need)
            for node, (where, out) in changed.items():
                b.set_current(node, out[0], where)
            self._forget(b, [-1, self.node_of[v], *changed])
        self.removed[sources, v] = True
        self.present[sources, v] = False
        self._value, self._need = None, None

    def drop(self, v: int) -> None:
        """Remove every edge into v without testing (its node is read by nothing)."""
        p = self.graph.prefix_len[v]
        self.removed[:p, v] = True
        self.present[:p, v] = False
        self._need = None
        for b in self.batches:
            self._forget(b, [self.node_of[v]])

    def _forget(self, b: _Batch, nodes: list[int]) -> None:
        stale = {v for n in nodes for v in self.inputs_of.get(n, [])}
        b.inputs = {k: x for k, x in b.inputs.items() if k[0] not in stale}
        nodes_set = set(nodes)
        b.projections = {k: x for k, x in b.projections.items() if k[0] not in nodes_set}

    def _rebuild(self) -> None:
        """Recompute every node output under `removed` (at every position), e.g. after a resume."""
        g = self.graph
        for b in self.batches:
            for node in range(1, g.n_upstream):
                new = {v: self._input(b, v, EVERY)[None] for v in self.inputs_of[node]}
                if node in self.head_of:
                    out = self._output(b, node, new, EVERY)
                else:
                    out = self.computer.mlp(self.layer_of[node], new[self.inputs_of[node][0]])
                b.set_current(node, out[0], EVERY)
                b.inputs, b.projections = {}, {}
        self._value = None

