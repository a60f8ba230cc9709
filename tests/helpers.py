"""Test helpers: discovery contexts for planted models."""

from __future__ import annotations

import random

from testkit import DEVICE

from circuitctl.config.schema import AblationConfig
from circuitctl.methods.base import DiscoveryContext
from circuitctl.metrics.metrics import METRICS
from circuitctl.models.adapter import ModelAdapter
from circuitctl.testing.planted import REDUNDANT, build, build_model  # the one import of the planted models (re-exported)
from circuitctl.tasks.data import tokenize_pairs
from circuitctl.tasks.records import pair_from_record


def planted_context(name: str, metric: str = "logit_diff", ablation: str = "resample", n_pairs: int | None = None):
    """(PlantedCircuit, DiscoveryContext) for a planted model and its prompt pairs (the first n_pairs)."""
    pc = build(name)
    if n_pairs is not None:
        from dataclasses import replace

        pc = replace(pc, pairs=pc.pairs[:n_pairs])
    adapter = ModelAdapter(build_model(pc).to(DEVICE))
    pairs = [pair_from_record(r, f"{name} pair {i}") for i, r in enumerate(pc.pairs)]
    data = tokenize_pairs(pairs, None, adapter.d_vocab, None, name)
    return pc, DiscoveryContext(adapter, data, METRICS.get(metric), AblationConfig(type=ablation))


def edge_auc(graph, scores, true_edges) -> float:
    from circuitctl.metrics.faithfulness import roc_auc

    names = graph.edge_names()
    return roc_auc([abs(float(scores[graph.edge_index(e)])) for e in names], [e in true_edges for e in names])


def planted_settings(n_edges, **overrides):
    """Edge-pruning settings that recover the planted circuits (graphs of 13-52 edges): the reference's
    schedule shortened, learning rate 0.1 (0.8 overshoots masks into the dead zone on graphs this
    small), expected-L0 sparsity."""
    from circuitctl.config.methods import EdgePruningSettings

    fields = dict(edges=n_edges, steps=1500, sparsity_warmup_steps=700, lr_warmup_steps=100, lr=0.1, lambda_lr=0.1)
    return EdgePruningSettings(**{**fields, **overrides})


def planted_module():
    """The planted ground-truth models' module (one import, for tests that export them)."""
    from circuitctl.testing import planted

    return planted


def second_token_records(n: int = 16, vocab: int = 12, length: int = 6, seed: int = 7, spurious: bool = False) -> list[dict]:
    """copy_first's second task: the answer is the token at position 1 (a0.h1 copies it, gain 2).
    With `spurious`, clean and corrupt differ at positions 0 and 1: the answer is the first token
    (a0.h0) and the spurious answer the second (a0.h1)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b, x, y, *rest = rng.sample(range(vocab), 4 + length - 2)
        if spurious:
            records.append({"clean": [a, x, *rest], "corrupt": [b, y, *rest], "answers": [a], "wrong_answers": [b],
                            "spurious_answers": [x], "spurious_wrong_answers": [y]})
        else:
            records.append({"clean": [a, x, *rest], "corrupt": [a, y, *rest], "answers": [x], "wrong_answers": [y]})
    return records
