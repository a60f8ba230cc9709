"""EAP scoring pass vs a plain clean forward + backward on the same batch.

    python bench/bench_eap.py [--batch 8] [--length 16] [--shapes gpt2-small-shape tiny]

Baselines (same batch, same model, 2 threads):
  fwd+bwd (activations): clean forward, logit-difference metric, backward to the
      embeddings with the parameters frozen: exactly the gradient work attribution needs.
  fwd+bwd (params): the same with parameter gradients, as a training step computes.
  floor: one plain corrupt forward + the activations fwd+bwd: EAP's floor (issue 19: within 1.15x).
  strict floor: the same without the logits EAP never computes (the corrupt run's, and the clean
      run's at positions other than the answer's), with W_U's transpose copied once (as circuitctl's
      adapter does; TransformerLens copies it on every call): a lower bound no implementation can beat.
EAP = one corrupt forward + one clean forward + backward + the per-layer score contraction.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, peak_rss_mb, random_pairs, run_inner, time_it, write_results  # noqa: E402


def inner(kind: str, shape: str, batch: int, length: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from circuitctl.config.schema import AblationConfig
    from circuitctl.methods.base import DiscoveryContext
    from circuitctl.methods.eap import attribution_scores, clean_gradient_run
    from circuitctl.metrics.metrics import METRICS
    from circuitctl.models.adapter import ModelAdapter

    model = build_model(shape)
    data = random_pairs(model.cfg.d_vocab, batch, length)
    clean, answers, wrong = data.clean, data.answers, data.wrong
    rss_before = peak_rss_mb()
    if kind == "eap":
        adapter = ModelAdapter(model)
        context = DiscoveryContext(adapter, data, METRICS.get("logit_diff"), AblationConfig())
        seconds = time_it(lambda: attribution_scores(context, batch, clean_gradient_run(context)))
    elif kind in ("floor", "strict_floor"):
        model.requires_grad_(False)
        L = model.cfg.n_layers

        def make_leaf(x, hook):
            return x.detach().requires_grad_(True)

        unembed_weight = model.W_U.T.contiguous()  # the strict floor copies W_U.T once, as EAP does

        def step():
            with torch.no_grad():
                model(data.corrupt, stop_at_layer=L if kind == "strict_floor" else None)
            with model.hooks(fwd_hooks=[("hook_embed", make_leaf)]):
                if kind == "strict_floor":
                    resid = model(data.clean, stop_at_layer=L)
                    logits = torch.nn.functional.linear(model.ln_final(resid[:, -1:, :]), unembed_weight, model.b_U)[:, 0]
                else:
                    logits = model(data.clean)[:, -1]
            (logits.gather(1, answers) - logits.gather(1, wrong)).sum().backward()

        seconds = time_it(step)
    else:
        with_params = kind == "fwd_bwd_params"
        model.requires_grad_(with_params)

        def step():
            def make_leaf(x, hook):
                return x.detach().requires_grad_(True) if not with_params else x

            logits = model.run_with_hooks(clean, fwd_hooks=[("hook_embed", make_leaf)])[:, -1]
            value = (logits.gather(1, answers) - logits.gather(1, wrong)).sum()
            value.backward()
            model.zero_grad(set_to_none=True)

        seconds = time_it(step)
    return {"kind": kind, "shape": shape, "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner", nargs=4, metavar=("KIND", "SHAPE", "BATCH", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--shapes", nargs="+", default=["gpt2-small-shape", "tiny"])
    args = parser.parse_args()
    if args.inner:
        kind, shape, batch, length = args.inner
        print(json.dumps(inner(kind, shape, int(batch), int(length))))
        return
    from rich.console import Console
    from rich.table import Table

    rows = []
    for shape in args.shapes:
        runs = {
            k: run_inner(__file__, [k, shape, str(args.batch), str(args.length)])
            for k in ("fwd_bwd_acts", "fwd_bwd_params", "floor", "strict_floor", "eap")
        }
        rows.append(
            {
                "shape": shape,
                "batch": args.batch,
                "length": args.length,
                "fwd_bwd_activations_s": runs["fwd_bwd_acts"]["seconds"],
                "fwd_bwd_params_s": runs["fwd_bwd_params"]["seconds"],
                "floor_s": runs["floor"]["seconds"],
                "strict_floor_s": runs["strict_floor"]["seconds"],
                "eap_s": runs["eap"]["seconds"],
                "ratio_vs_floor": runs["eap"]["seconds"] / runs["floor"]["seconds"],
                "ratio_vs_strict_floor": runs["eap"]["seconds"] / runs["strict_floor"]["seconds"],
                "ratio_vs_activations": runs["eap"]["seconds"] / runs["fwd_bwd_acts"]["seconds"],
                "ratio_vs_params": runs["eap"]["seconds"] / runs["fwd_bwd_params"]["seconds"],
                "peak_rss_mb": {k: round(v["peak_rss_mb"]) for k, v in runs.items()},
            }
        )
    table = Table(title=f"EAP scoring pass vs plain forward + backward (batch {args.batch}, {args.length} tokens, CPU)")
    for column in (
        "model", "fwd+bwd acts (s)", "floor (s)", "strict floor (s)", "EAP (s)", "EAP / floor", "EAP / strict floor", "EAP / acts", "EAP / params",
        "peak RSS MB (acts/params/EAP)",
    ):
        table.add_column(column)
    for r in rows:
        rss = r["peak_rss_mb"]
        table.add_row(
            r["shape"], f"{r['fwd_bwd_activations_s']:.3f}", f"{r['floor_s']:.3f}", f"{r['strict_floor_s']:.3f}", f"{r['eap_s']:.3f}",
            f"{r['ratio_vs_floor']:.2f}x", f"{r['ratio_vs_strict_floor']:.2f}x", f"{r['ratio_vs_activations']:.2f}x", f"{r['ratio_vs_params']:.2f}x",
            f"{rss['fwd_bwd_acts']}/{rss['fwd_bwd_params']}/{rss['eap']}",
        )
    Console().print(table)
    print(f"wrote {write_results('eap', {'rows': rows})}")


if __name__ == "__main__":
    main()
