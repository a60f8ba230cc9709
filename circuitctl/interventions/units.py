"""A parsed ``--ablate`` spec resolved to a circuit space and the units it names.

A run directory gives its circuit file's space (`circuitctl.circuits.space_for`, any kind) and
its circuit, its top-N units by |score| (or by their effect on the spurious answers,
`circuitctl.interventions.spurious`), or a group of its ``explanation.json``, whose members are
unit names like an explicit list. Names become a `NodeSpace` (heads, MLPs, input), a
`NeuronSpace`, an `EdgeSpace` or a `FeatureSpace` (with the run's SAEs, or the config's
``method.saes``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from circuitctl.errors import UsageError
from circuitctl.interventions.masks import error_nodes, mask_of, names_of
from circuitctl.interventions.spec import AblationSpec, unit_kind

EXPLANATION_FILE = "explanation.json"


@dataclass
class Selection:
    """The units a spec names, in a circuit space."""

    space: object  # a `circuitctl.circuits.space.CircuitSpace`
    selected: torch.Tensor  # bool, shaped like space.mask
    rule: str  # how they were chosen, in words
    details: dict = field(default_factory=dict)  # e.g. each unit's effect on the spurious answers

    def names(self) -> list[str]:
        return names_of(self.space, self.selected)


def resolve(spec: AblationSpec, session, config_dir: Path | None, batch_size: int) -> Selection:
    """The space and units of `spec` for this session's model and task."""
    if spec.run is None:
        space = names_space(spec.kind, spec.names, session, config_dir)
        return Selection(space, mask_of(space, spec.names, "--ablate"), f"{len(spec.names)} {space.unit} named in --ablate")
    return _from_run(spec, session, config_dir, batch_size)


def _from_run(spec: AblationSpec, session, config_dir: Path | None, batch_size: int) -> Selection:
    from circuitctl.circuits import space_for
    from circuitctl.circuits.record import load_circuit_file
    from circuitctl.evaluation import check_graph
    from circuitctl.metrics.faithfulness import top_edges

    loaded = load_circuit_file(spec.run)
    check_graph(loaded, session.adapter.graph)
    space = space_for(loaded.record["space"], session.adapter, session.data)
    scores, membership = space.read(loaded.record, loaded.origin)
    run = spec.run_dir
    if spec.group is not None:
        names = group_members(run, spec.group)
        kind = one_kind(names, f"{run / EXPLANATION_FILE} group '{spec.group}'")
        if kind != _names_kind(space):
            space = names_space(kind, names, session, config_dir, run_space=space)
        return Selection(space, mask_of(space, names, f"group '{spec.group}'"), f"group '{spec.group}' of {run / EXPLANATION_FILE}")
    if spec.top is not None and spec.by == "spurious":
        from circuitctl.interventions.spurious import rank_by_spurious

        selected, details, rule = rank_by_spurious(space, scores, membership, spec.top, session, batch_size)
        return Selection(space, selected, rule, details)
    if spec.top is not None:
        rankable = space.mask & ~error_nodes(space)
        n = min(spec.top, int(rankable.sum()))
        selected = top_edges(scores.float(), rankable, n, absolute=True)
        what = "features (error nodes left out)" if space.kind == "feature" else space.unit
        return Selection(space, selected, f"the top {n} {what} of {loaded.origin} by |score|")
    if not bool(membership.any()):
        raise UsageError(f"{loaded.origin}: the circuit is empty; name its top units instead ({spec.text}:top=N)")
    return Selection(space, membership & space.mask, f"the circuit of {loaded.origin} ({int(membership.sum())} {space.unit})")


def group_members(run: Path, group: str) -> list[str]:
    """The members of a group of a run's explanation.json (``{"groups": [{"id", "name", "members"}]}``)."""
    path = run / EXPLANATION_FILE
    if not path.is_file():
        raise UsageError(f"--ablate: group '{group}' needs {path}, which does not exist (run `circuitctl explain {run}` first)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from exc
    groups = record.get("groups") if isinstance(record, dict) else None
    if not isinstance(groups, list):
        raise UsageError(f"{path}: has no 'groups' list")
    ids = [str(g.get("id")) for g in groups if isinstance(g, dict)]
    for item in groups:
        if isinstance(item, dict) and str(item.get("id")) == group:
            members = item.get("members")
            if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
                raise UsageError(f"{path}: group '{group}' has no list of member names")
            return list(members)
    raise UsageError(f"{path}: no group '{group}' (groups: {', '.join(ids) or 'none'})")


def one_kind(names: list[str], where: str) -> str:
    kinds = {unit_kind(name) for name in names}
    if None in kinds:
        bad = next(name for name in names if unit_kind(name) is None)
        raise UsageError(f"{where}: '{bad}' is not a unit name an intervention can ablate")
    if len(kinds) > 1:
        raise UsageError(f"{where}: the members are of several kinds ({', '.join(sorted(kinds))})")
    return kinds.pop()


def _names_kind(space) -> str | None:
    """The name kind (`unit_kind`) of a space's units, for the spaces names can address."""
    return {"node": "node", "neuron": "neuron", "edge": "edge", "feature": "feature"}.get(space.kind)


def names_space(kind: str, names, session, config_dir: Path | None, run_space=None):
    """The space whose units `names` (all of one `kind`) are."""
    from circuitctl.circuits.edges import EdgeSpace
    from circuitctl.circuits.neurons import NeuronSpace
    from circuitctl.circuits.nodes import NodeSpace

    adapter = session.adapter
    if kind == "node":
        return NodeSpace(adapter.graph)
    if kind == "neuron":
        return NeuronSpace(adapter.graph, adapter.cfg.d_mlp)
    if kind == "edge":
        return EdgeSpace(adapter.graph)
    if run_space is not None and run_space.kind == "feature":
        return run_space
    return config_feature_space(session, config_dir)


def config_feature_space(session, config_dir: Path | None):
    """A feature space (summed over positions) of the SAEs the config's ``method.saes`` names."""
    from circuitctl.circuits.features import FeatureSpace
    from circuitctl.sae.loading import resolve_saes

    saes = getattr(session.config.method, "saes", None)
    if saes is None:
        raise UsageError(
            "SAE feature names need SAEs: use a config whose method is sfc (method.saes: DIR, or the override "
            "method.name=sfc method.saes=DIR), or name a feature run directory (runs/sfc, runs/sfc:top=N)"
        )
    adapter = session.adapter
    found = resolve_saes(saes, config_dir, adapter.model, adapter.device)
    return FeatureSpace({s: sae for s, (sae, _) in found.items()}, {s.name: src for s, (_, src) in found.items()}, None)
