"""SAE sites on a TransformerLens model: hook names, capture, edits and gradients.

The only module that knows where the sites of `circuitctl.graph.naming` live in TransformerLens:

    embed      blocks.0.hook_resid_pre
    attn{L}    blocks.{L}.hook_attn_out
    mlp{L}     blocks.{L}.hook_mlp_out
    resid{L}   blocks.{L}.hook_resid_post   (= blocks.{L+1}.hook_resid_pre, the name sae-lens's
                                             residual SAEs usually carry)

`SiteRunner.forward` runs the model with any site's output passed through an edit function
(an SAE reconstruction plus error, an ablation, an interpolation), optionally starting at a
later layer from a cached residual stream, and returns the logits at the answer positions.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

from circuitctl.errors import UsageError
from circuitctl.graph.naming import Site, sort_sites

Edit = Callable[[torch.Tensor], torch.Tensor]
Objective = Callable[[torch.Tensor], torch.Tensor]

_HOOK_RE = re.compile(r"^blocks\.(?P<layer>\d+)\.hook_(?P<what>resid_pre|resid_post|attn_out|mlp_out)$")


def hook_name(site: Site) -> str:
    if site.kind == "embed":
        return "blocks.0.hook_resid_pre"
    suffix = {"attn": "attn_out", "mlp": "mlp_out", "resid": "resid_post"}[site.kind]
    return f"blocks.{site.layer}.hook_{suffix}"


def site_of_hook(name: str) -> Site:
    """The site a TransformerLens hook name (as an SAE's cfg.json records it) reads."""
    match = _HOOK_RE.match(name or "")
    if not match:
        raise UsageError(
            f"SAE hook '{name}' is not a supported site (blocks.L.hook_resid_pre, hook_resid_post, hook_attn_out or hook_mlp_out)"
        )
    layer, what = int(match["layer"]), match["what"]
    if what == "resid_pre":
        return Site("embed", -1) if layer == 0 else Site("resid", layer - 1)
    return Site({"resid_post": "resid", "attn_out": "attn", "mlp_out": "mlp"}[what], layer)


def check_site(model, site: Site) -> None:
    cfg = model.cfg
    if site.kind != "embed" and not 0 <= site.layer < cfg.n_layers:
        raise UsageError(f"site '{site}': the model has layers 0..{cfg.n_layers - 1}")
    if site.kind == "mlp" and cfg.attn_only:
        raise UsageError(f"site '{site}': the model is attention-only (no MLPs)")


def start_layer(site: Site) -> int:
    """The first block whose run produces the site's activation."""
    return 0 if site.kind == "embed" else site.layer


class SiteRunner:
    """Forward passes of a HookedTransformer with edits at SAE sites."""

    def __init__(self, model, sites: Iterable[Site]) -> None:
        self.model = model
        self.sites = sort_sites(sites)
        for site in self.sites:
            check_site(model, site)

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, stop_at_layer=0)

    def unembed(self, resid: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Logits at `positions` ([B, vocab]); at every position ([B, P, vocab]) when None."""
        if positions is not None:
            rows = torch.arange(resid.shape[0], device=resid.device)
            resid = resid[rows, positions][:, None, :]
        if hasattr(self.model, "ln_final"):
            resid = self.model.ln_final(resid)
        logits = self.model.unembed(resid)
        return logits[:, 0, :] if positions is not None else logits

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None,
        edits: dict[Site, Edit] | None = None,
        start: tuple[int, torch.Tensor] | None = None,
        keep_resid: list | None = None,
        stop_after: int | None = None,
    ) -> torch.Tensor | None:
        """Run with each edited site's output replaced by ``edit(output)``.

        start:       (layer, residual stream entering it) to skip the earlier layers.
        keep_resid:  a list that receives the residual stream entering each layer that runs.
        stop_after:  stop after this layer (returns None; for capturing activations).
        """
        edits = edits or {}
        hooks = [(hook_name(site), _hook(fn)) for site, fn in edits.items()]
        if keep_resid is not None:
            hooks += [(f"blocks.{i}.hook_resid_pre", _keep(keep_resid)) for i in range(self.n_layers)]
        first, resid = start if start is not None else (0, None)
        last = self.n_layers if stop_after is None else stop_after + 1
        with self.model.hooks(fwd_hooks=hooks):
            if resid is None:
                resid = self.embed(tokens)
            for block in self.model.blocks[first:last]:
                resid = block(resid)
        if stop_after is not None:
            return None
        return self.unembed(resid, positions)

    def activations(self, tokens: torch.Tensor, keep_resid: list | None = None) -> dict[Site, torch.Tensor]:
        """Every site's output on `tokens` (no gradients); stops after the last site's layer
        unless the residual streams of all layers are wanted."""
        acts: dict[Site, torch.Tensor] = {}
        edits = {site: _recorder(acts, site) for site in self.sites}
        stop = None if keep_resid is not None else max(start_layer(s) for s in self.sites)
        with torch.no_grad():
            self.forward(tokens, None, edits, keep_resid=keep_resid, stop_after=stop)
        return acts

    def gradients(
        self, tokens: torch.Tensor, positions: torch.Tensor, objective: Objective
    ) -> tuple[torch.Tensor, dict[Site, torch.Tensor], dict[Site, torch.Tensor]]:
        """(logits, site outputs, d objective / d site output) on an unedited forward pass: the
        true model gradients (an SAE with its error term passed through is the identity)."""
        acts: dict[Site, torch.Tensor] = {}
        edits = {site: _recorder(acts, site) for site in self.sites}
        with torch.enable_grad():
            # make every activation part of the autograd graph without parameter gradients
            resid0 = self.embed(tokens).detach().requires_grad_(True)
            logits = self.forward(tokens, positions, edits, start=(0, resid0))
            value = objective(logits)
            grads = torch.autograd.grad(value, [acts[s] for s in self.sites], allow_unused=True)
        grads_by_site = {s: (torch.zeros_like(acts[s]) if g is None else g) for s, g in zip(self.sites, grads)}
        return logits.detach(), {s: a.detach() for s, a in acts.items()}, grads_by_site

    def interpolated_gradient(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        site: Site,
        clean: torch.Tensor,
        patch: torch.Tensor,
        alphas: list[float],
        objective: Objective,
        resid_pre: list[torch.Tensor],
        rows_per_pass: int = 256,
    ) -> torch.Tensor:
        """Mean over `alphas` of d objective / d output at `site`, with the site's output set to
        clean + alpha * (patch - clean) and every later layer recomputed (integrated gradients).

        resid_pre: the clean run's residual stream entering each layer (earlier layers are not rerun).
        `objective` maps logits [n * B, vocab] (n stacked copies of the batch) to a scalar.
        """
        B = tokens.shape[0]
        layer = start_layer(site)
        diff = (patch - clean).expand_as(clean)
        total = torch.zeros_like(clean)
        per_pass = max(1, rows_per_pass // max(B, 1))
        for lo in range(0, len(alphas), per_pass):
            chunk = torch.tensor(alphas[lo : lo + per_pass], dtype=clean.dtype, device=clean.device)
            n = chunk.shape[0]
            with torch.enable_grad():
                point = (clean[None] + chunk[:, None, None, None] * diff[None]).flatten(0, 1).requires_grad_(True)
                start = (layer, resid_pre[layer].repeat(n, 1, 1))
                logits = self.forward(tokens.repeat(n, 1), positions.repeat(n), {site: lambda x, p=point: p}, start=start)
                (grad,) = torch.autograd.grad(objective(logits), point)
            total += grad.unflatten(0, (n, B)).sum(0)
        return total / len(alphas)


def _hook(fn: Edit):
    def hook(x, hook):
        return fn(x)

    return hook


def _keep(store: list):
    def hook(x, hook):
        store.append(x)
        return x

    return hook


def _recorder(store: dict, site: Site) -> Edit:
    def record(x):
        store[site] = x
        return x

    return record
