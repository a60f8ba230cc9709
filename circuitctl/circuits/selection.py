"""Choosing a circuit from a method's scores: one rule for every kind of circuit and method.

* Methods that decide membership themselves (ACDC, path patching, CD-T, SFC, edge pruning:
  `DiscoveryResult.membership`) keep their own circuit, unless the config asks for a
  re-selection by score (``selection.reselect: true``, or ``discover --reselect``).
* Otherwise the config's rule picks units by score: ``top_n``, ``threshold`` or ``fraction``
  of the space's units, ranked by |score| (or signed score with ``absolute: false``); with no
  rule, the top 100.
* Then, with ``prune: true``, tree-shaking (edge circuits: drop edges on no input -> logits path).

`select` returns the membership and a one-line description of the rule that chose it, which
the circuit file and the run summary record.
"""

from __future__ import annotations

import math

import torch

from circuitctl.config.schema import SelectionConfig
from circuitctl.metrics.faithfulness import top_edges

DEFAULT_TOP_N = 100


def select(scores: torch.Tensor, space, config: SelectionConfig, native: torch.Tensor | None, method: str) -> tuple[torch.Tensor, str]:
    """(bool membership shaped like ``space.mask``, the rule that chose it)."""
    mask = space.mask
    if native is not None and not config.reselect:
        membership, rule = native.to(mask.device) & mask, f"{method}'s own circuit"
    elif config.threshold is not None:
        key = scores.abs() if config.absolute else scores
        membership = (key >= config.threshold) & mask
        rule = f"{space.unit} with {'|score|' if config.absolute else 'score'} >= {config.threshold:g}"
    else:
        if config.fraction is not None:
            k, what = math.ceil(config.fraction * space.n_total), f"the top {config.fraction:g} of {space.unit}"
        else:
            k = config.top_n or DEFAULT_TOP_N
            what = f"the top {k} {space.unit}"
        membership = top_edges(scores, mask, min(k, space.n_total), config.absolute)
        rule = f"{what} by {'|score|' if config.absolute else 'signed score'}"
    if config.prune:
        pruned = space.prune(membership)
        if not torch.equal(pruned, membership):
            rule += ", tree-shaken"
        membership = pruned
    return membership, rule


def ignored_rule_note(config: SelectionConfig, method: str) -> str | None:
    """A note when the config names a selection rule that a method's own circuit overrides."""
    if config.reselect or config.is_default:
        return None
    given = next(f"{k}: {getattr(config, k)}" for k in ("top_n", "threshold", "fraction") if getattr(config, k) is not None)
    return (
        f"selection.{given} was not applied: {method} chooses its own circuit "
        "(set selection.reselect: true, or pass --reselect, to re-select its units by score)"
    )
