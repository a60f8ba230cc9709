"""Ensembles of edge methods: each member runs once, with its own settings, on the run's data,
metric and ablation; their scores are combined edge by edge.

* ``mean_rank``: each member's edges are ranked by |score| (average ranks for ties, divided by
  the number of edges, so the strongest edge gets 1), signed with the member's score, and
  averaged over the members. Insensitive to the members' scales.
* ``mean_normalized``: each member's scores divided by its largest |score|, averaged.

The best GPT-2 IOI entry of the 2025 MIB circuit-localization shared task combined EAP,
EAP-IG-inputs and EAP-IG-activations this way. The run directory records every member's own
scores (``member-<i>-<method>.json``). Resumable: finished members' scores are checkpointed and
not recomputed.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from circuitctl.checkpoint import Autosave
from circuitctl.config.methods import EnsembleSettings
from circuitctl.errors import UsageError
from circuitctl.methods.base import DiscoveryContext, DiscoveryResult, run_method
from circuitctl.metrics.faithfulness import average_ranks

METHOD = "ensemble"


def signed_rank(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sign(score) x rank of |score| among the real edges / number of edges (ties: average rank)."""
    values = scores[mask].double()
    ranks = average_ranks(values.abs()) / len(values)
    out = torch.zeros_like(scores, dtype=torch.float32)
    out[mask] = (torch.sign(values) * ranks).float()
    return out


def normalized(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    largest = float(scores[mask].abs().max()) if bool(mask.any()) else 0.0
    return torch.where(mask, scores.float() / largest, torch.zeros((), device=scores.device)) if largest > 0 else torch.zeros_like(scores, dtype=torch.float32)


COMBINE = {"mean_rank": signed_rank, "mean_normalized": normalized}


def combine(member_scores: list[torch.Tensor], mask: torch.Tensor, how: str) -> torch.Tensor:
    transform = COMBINE[how]
    return torch.stack([transform(s.float(), mask) for s in member_scores]).mean(0)


def member_edge_scores(context: DiscoveryContext, member) -> tuple[torch.Tensor, float]:
    """Run one member (without checkpoints) -> (its edge scores [U, V] on the host, its forward
    passes). Per-position edge scores (path patching) are projected onto the edge graph as their
    MIB file is: each edge's score at the position where it is largest in magnitude."""
    from circuitctl.circuits.edges import EdgeSpace
    from circuitctl.circuits.positional import PositionalEdgeSpace, project

    result = run_method(replace(context, checkpoint=None, resume=False), member)
    scores = result.scores
    if isinstance(result.space, PositionalEdgeSpace):
        scores = project(result.space.pgraph, scores, torch.zeros_like(scores, dtype=torch.bool))[0]
    elif result.space is not None and not isinstance(result.space, EdgeSpace):
        raise UsageError(f"member '{member.name}' scores {result.space.unit}, not edges")
    return scores.float().cpu(), result.forward_passes


def discover(context: DiscoveryContext, settings: EnsembleSettings) -> DiscoveryResult:
    graph = context.graph
    done: list[tuple[torch.Tensor, float]] = []  # (scores, forward passes) of the finished members

    def snapshot() -> tuple[dict, dict]:
        state = {"done": len(done), "forward_passes": [fp for _, fp in done], "n_edges": graph.n_edges}
        return state, {f"member.{i}": scores for i, (scores, _) in enumerate(done)}

    autosave = Autosave(context.checkpoint, METHOD, 0.0, snapshot)  # members are long: save after each
    loaded = autosave.load(context.resume)
    if loaded is not None:
        state, tensors = loaded
        if state.get("n_edges") != graph.n_edges or state.get("done", 0) > len(settings.members):
            raise UsageError(f"{context.checkpoint.dir}: the checkpoint does not fit this model and config; delete it to start over")
        done = [(tensors[f"member.{i}"], fp) for i, fp in enumerate(state["forward_passes"])]
    try:
        for member in settings.members[len(done) :]:
            done = done + [member_edge_scores(context, member)]
            autosave.save()
    except KeyboardInterrupt:
        if context.checkpoint is None:
            raise
        raise autosave.interrupted("the ensemble") from None
    mask = graph.edge_mask
    scores = combine([s for s, _ in done], mask, settings.combine)
    files = {}
    for i, (member, (member_scores, forward_passes)) in enumerate(zip(settings.members, done)):
        files[f"member-{i}-{member.name}.json"] = {
            "method": member.model_dump(mode="json"),
            "forward_passes": forward_passes,
            "scores": {graph.edge_name(u, v): float(member_scores[u, v]) for u, v in mask.nonzero().tolist()},
        }
    extra = {"ensemble": {"combine": settings.combine, "members": [m.name for m in settings.members]}}
    return DiscoveryResult(scores=scores, forward_passes=sum(fp for _, fp in done), extra=extra, files=files)
