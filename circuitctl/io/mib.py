"""The MIB / EAP-IG interchange format: ``{"cfg", "nodes", "edges"}`` (reading and writing).

``cfg`` is the graph's shape plus ``d_model``; ``nodes`` maps node names to ``{"in_graph",
"score"}`` and ``edges`` maps edge names (``input->a0.h1<v>``) to ``{"score", "in_graph"}``.
"""

from __future__ import annotations

from typing import Any


def mib_record(graph_spec: dict, d_model: int, nodes: dict, edges: dict) -> dict[str, Any]:
    return {"cfg": {**graph_spec, "d_model": d_model}, "nodes": nodes, "edges": edges}


def is_mib(record: Any) -> bool:
    return isinstance(record, dict) and "format" not in record and isinstance(record.get("edges"), dict)
