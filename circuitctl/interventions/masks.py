"""Units of a circuit space by name: names <-> masks, and a feature space's error nodes."""

from __future__ import annotations

import torch

from circuitctl.errors import UsageError
from circuitctl.graph import naming


def names_of(space, membership: torch.Tensor) -> list[str]:
    """The names of the units in `membership`, in the space's order."""
    if hasattr(space, "name_of"):  # feature spaces: names computed per index (there may be very many units)
        return [space.name_of(int(i)) for i in membership.flatten().nonzero().flatten().tolist()]
    chosen = membership[space.mask]
    return [name for name, keep in zip(space.unit_names(), chosen.tolist()) if keep]


def names_at(space, flat_indices: list[int]) -> list[str]:
    """The names of the units at these indices of the flattened mask."""
    if hasattr(space, "name_of"):
        return [space.name_of(int(i)) for i in flat_indices]
    names = space.unit_names()
    position = {int(flat): k for k, flat in enumerate(space.mask.flatten().nonzero().flatten().tolist())}
    return [names[position[int(i)]] for i in flat_indices]


def error_nodes(space) -> torch.Tensor:
    """Bool mask of a feature space's SAE error nodes (all False for other kinds). `top=N` and
    `by=spurious` rank features only: an edit removes features, not what the SAE fails to explain."""
    found = torch.zeros_like(space.mask, dtype=torch.bool)
    if space.kind == "feature":
        for site in space.sites:
            space.site_view(found, site)[..., -1] = True
    return found


def mask_of(space, names, where: str) -> torch.Tensor:
    """Bool mask (shaped like space.mask) of the named units; UsageError naming one this model lacks."""
    selected = torch.zeros_like(space.mask, dtype=torch.bool)
    for name in names:
        try:
            index = unit_index(space, name)
        except (KeyError, ValueError, IndexError) as exc:
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args and exc.args[0] != name else f"this model has no {space.unit.removesuffix('s')} '{name}'"
            raise UsageError(f"{where}: '{name}': {reason}") from exc
        selected[index] = True
    return selected & space.mask


def unit_index(space, name: str):
    """The index of unit `name` in a node, neuron, edge or feature space's mask."""
    if space.kind == "node":
        return space.graph.upstream_index[name]
    if space.kind == "neuron":
        layer, i = naming.parse_neuron(name)
        if layer >= space.graph.spec.n_layers or i >= space.d_mlp:
            raise IndexError(name)
        return layer, i
    if space.kind == "edge":
        return space.graph.edge_index(name)
    if space.kind == "feature":
        return space.index_of(name)
    raise KeyError(f"units of a {space.kind} circuit can only be named through their run directory")
