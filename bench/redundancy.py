"""Which methods handle OR-gates and backup heads: the planted `or_gate` and `backup_head` models.

    python bench/redundancy.py            # every method on both models (a few minutes on one CPU thread)
    python bench/redundancy.py --smoke    # short edge-pruning run: checks that the script works

For each method: ROC AUC of |score| against the true edges, and f of the circuit made of the
top-|GT| edges by |score| (for edge pruning: its native, binarised circuit trained at the
ground-truth size), with resample ablation and the logit difference. Path patching's
per-position scores are projected onto the edge graph as its MIB file is (each edge's score at
its largest-magnitude position). Quality numbers, not timings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import write_results  # noqa: E402

MODELS = ("or_gate", "backup_head")


def method_rows(n_true: int, smoke: bool) -> dict:
    from circuitctl.config.methods import EdgePruningSettings, EnsembleSettings, IfrSettings
    from circuitctl.config.methods import AcdcSettings, CdtSettings, EapIgSettings, EapSettings, ExactSettings, PathPatchingSettings

    steps = dict(steps=40, sparsity_warmup_steps=20, lr_warmup_steps=5) if smoke else dict(steps=1500, sparsity_warmup_steps=700, lr_warmup_steps=100)
    return {
        "exact": ExactSettings(),
        "eap": EapSettings(),
        "eap_ig (inputs, 5 steps)": EapIgSettings(steps=5),
        "eap_ig (activations, 5 steps)": EapIgSettings(steps=5, variant="activations"),
        "acdc (tau 0.01)": AcdcSettings(tau=0.01),
        "path_patching": PathPatchingSettings(),
        "cdt (decompose_qk)": CdtSettings(decompose_qk=True),
        "ifr": IfrSettings(),
        "ensemble (eap + eap_ig x2, mean_rank)": EnsembleSettings(
            members=["eap", {"name": "eap_ig", "steps": 5}, {"name": "eap_ig", "variant": "activations", "steps": 5}]
        ),
        "edge_pruning (native circuit, trained at the ground-truth size)": EdgePruningSettings(edges=n_true, lr=0.1, lambda_lr=0.1, batch_size=24, **steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from helpers import edge_auc, planted_context

    from circuitctl.methods.base import run_method
    from circuitctl.methods.ensemble import member_edge_scores
    from circuitctl.metrics.faithfulness import normalized_faithfulness, top_edges

    torch.set_num_threads(1)
    rows = []
    for model in MODELS:
        pc, context = planted_context(model)
        graph = context.graph
        engine = context.engine(batch_size=24, keep_cache=True)
        m_full, m_empty = engine.full_and_empty()
        for label, settings in method_rows(len(pc.true_edges), args.smoke).items():
            if settings.name == "edge_pruning":
                result = run_method(context, settings)
                scores, keep = result.scores, result.membership
            else:  # path patching's per-position scores projected onto the edge graph, as its MIB file
                scores, _ = member_edge_scores(context, settings)
                keep = top_edges(scores, graph.edge_mask, len(pc.true_edges), absolute=True)
            f = normalized_faithfulness(float(engine.circuit_values(keep[None])[0]), m_full, m_empty)
            row = {"model": model, "method": label, "roc_auc": edge_auc(graph, scores, pc.true_edges), "f_at_gt_size": f, "n_true": len(pc.true_edges)}
            rows.append(row)
            print(f"{model:12s} {label:40s} AUC {row['roc_auc']:.2f}  f(top-{row['n_true']}) {f:5.2f}", flush=True)
    print("\n| method | OR-gate: ROC AUC | OR-gate: f at 5 edges | backup head: ROC AUC | backup head: f at 2 edges |")
    print("|---|---|---|---|---|")
    for label in dict.fromkeys(r["method"] for r in rows):
        a, b = (next(r for r in rows if r["model"] == m and r["method"] == label) for m in MODELS)
        print(f"| {label} | {a['roc_auc']:.2f} | {a['f_at_gt_size']:.2f} | {b['roc_auc']:.2f} | {b['f_at_gt_size']:.2f} |")
    print(f"wrote {write_results('redundancy_smoke' if args.smoke else 'redundancy', {'rows': rows})}")


if __name__ == "__main__":
    main()
