"""Circuits of every kind through one path: spaces (what a circuit is made of), selection,
evaluation and the circuit file. See `circuitctl.circuits.space` for the protocol.

`SPACES` maps a circuit file's ``space.kind`` to the class that rebuilds that space for a
model and task (`space_for`). A new kind of node is one space module plus one entry here.
"""

from __future__ import annotations

SPACES = {
    "edge": "circuitctl.circuits.edges:EdgeSpace",
    "node": "circuitctl.circuits.nodes:NodeSpace",
    "neuron": "circuitctl.circuits.neurons:NeuronSpace",
    "positional_edge": "circuitctl.circuits.positional:PositionalEdgeSpace",
    "positional_node": "circuitctl.circuits.positional:PositionalNodeSpace",
    "feature": "circuitctl.circuits.features:FeatureSpace",
}


def space_for(info: dict, adapter, data):
    """The circuit space a circuit file's ``space`` entry describes, for this model and task."""
    import importlib

    module, name = SPACES[info["kind"]].split(":")
    return getattr(importlib.import_module(module), name).from_info(info, adapter, data)
