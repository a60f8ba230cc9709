from __future__ import annotations

import pytest

from circuitctl.graph import naming
from circuitctl.graph.graph import Graph, GraphSpec


def test_gpt2_small_sizes_match_methods_md():
    graph = Graph(GraphSpec(n_layers=12, n_heads=12))
    assert graph.n_upstream == 1 + 12 * 13 == 157
    assert graph.n_downstream == 12 * (3 * 12 + 1) + 1 == 445
    assert 32_000 < graph.n_edges < 33_000


def test_edge_rule_prefix_property():
    graph = Graph(GraphSpec(n_layers=2, n_heads=2))
    names = set(graph.edge_names())
    assert "input->a0.h0<q>" in names and "a0.h1->m0" in names and "m1->logits" in names
    assert "a0.h0->a0.h1<v>" not in names  # a head never reads its own layer
    assert "m0->a0.h0<k>" not in names and "a1.h0->a0.h0<q>" not in names
    for name in names:
        assert graph.edge_name(*graph.edge_index(name)) == name


def test_parallel_attention_mlp_does_not_read_own_layer():
    graph = Graph(GraphSpec(n_layers=2, n_heads=2, parallel_attn_mlp=True))
    assert "a0.h0->m0" not in set(graph.edge_names())
    assert "a0.h0->m1" in set(graph.edge_names())


def test_attention_only_graph_has_no_mlps():
    graph = Graph(GraphSpec(n_layers=2, n_heads=2, has_mlps=False))
    assert not any(n.startswith("m") for n in graph.upstream)


def test_graph_agrees_with_the_reference_edge_list(ln_mlp_model, attn_only_model):
    from reference_patching import all_edges

    for model in (ln_mlp_model, attn_only_model):
        cfg = model.cfg
        graph = Graph(GraphSpec(cfg.n_layers, cfg.n_heads, has_mlps=not cfg.attn_only))
        assert set(graph.edge_names()) == set(all_edges(cfg))


@pytest.mark.parametrize("bad", ["a0h1", "a0.h1<x>", "m1<q>", "input->", "x->logits", "a1.h0<q>->logits"])
def test_malformed_names_are_rejected(bad):
    with pytest.raises(ValueError):
        if "->" in bad:
            naming.parse_edge(bad)
        else:
            naming.parse_node(bad)


def test_position_suffix_parses():
    node = naming.parse_node("a3.h0@end")
    assert (node.kind, node.layer, node.index, node.position) == ("head", 3, 0, "end")
