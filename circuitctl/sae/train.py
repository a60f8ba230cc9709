"""Training small SAEs on a model's activations, and measuring them.

All sites' SAEs are trained together in one batched loop. ReLU SAEs minimise ||x - x_hat||^2 + l1 * ||f||_1 (L1 coefficient warmed up linearly over the
first `l1_warmup` of the steps); TopK SAEs minimise ||x - x_hat||^2 with exactly k active
features. Decoder rows are kept at unit norm during training (the gradient component along
each row is removed and rows are renormalised after each Adam step, as in Marks et al.'s
dictionary_learning). Activations are scaled to a mean norm of sqrt(d_in) while training, so
that `l1` means the same for every model, and the scale is folded back into the saved weights
(the SAE reads and writes the raw activations; its features are unchanged).

Long trainings save the SAEs, the optimizer's state and the step every few seconds and on Ctrl-C
(`Checkpointing`). A step's minibatch depends only on the seed and the step (`minibatch`), so a
resumed training continues with the minibatches, and ends with the weights, of an uninterrupted one.

Metrics on held-out sequences: per-element MSE, explained variance, L0 (active features per
token), the fraction of features never active, and the fraction of the model's next-token
loss recovered: (CE(site zero-ablated) - CE(SAE spliced in)) / (CE(site zero-ablated) - CE(clean)).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from circuitctl.checkpoint import Autosave, Checkpoint, hold_interrupts
from circuitctl.errors import UsageError
from circuitctl.models.sae_sites import SiteRunner
from circuitctl.progress import bar
from circuitctl.sae.sae import SaeInfo, SparseAutoencoder
from circuitctl.graph.naming import Site
from circuitctl.sae.tokens import TokenSet


@dataclass(frozen=True)
class TrainSettings:
    d_sae: int
    architecture: str = "relu"
    l1: float = 1.0
    k: int | None = None
    steps: int = 1000
    batch_size: int = 512
    lr: float = 1e-3
    l1_warmup: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Checkpointing:
    """Where training saves its progress, how often (seconds), and whether it continues from it."""

    checkpoint: Checkpoint
    every: float = 30.0
    resume: bool = False


CHECKPOINT_METHOD = "train_sae"


@dataclass
class SaeMetrics:
    site: str
    hook_name: str
    architecture: str
    d_in: int
    d_sae: int
    train_tokens: int
    eval_tokens: int
    final_train_loss: float
    mse: float
    explained_variance: float
    l0: float
    dead_fraction: float
    ce_clean: float
    ce_with_sae: float
    ce_zero_ablation: float
    loss_recovered: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def collect_activations(runner: SiteRunner, tokens: TokenSet, batch_size: int = 64) -> dict[Site, torch.Tensor]:
    """Each site's outputs at the real (non-padding) tokens: {site: [n_tokens, d]}."""
    device = runner.model.W_U.device
    chunks: dict[Site, list[torch.Tensor]] = {site: [] for site in runner.sites}
    for lo in range(0, tokens.n, batch_size):
        batch = tokens.tokens[lo : lo + batch_size].to(device)
        real = tokens.real[lo : lo + batch_size].to(device)
        acts = runner.activations(batch)
        for site in runner.sites:
            chunks[site].append(acts[site][real].float())
    return {site: torch.cat(parts) for site, parts in chunks.items()}


def fit_saes(
    xs: list[torch.Tensor], settings: TrainSettings, infos: list[SaeInfo], advance=None, checkpointing: Checkpointing | None = None
) -> list[tuple[SparseAutoencoder, float]]:
    """Train one SAE per activation set x [n, d_in] (all the same shape) in one batched loop.

    The SAEs are independent (each one's loss depends only on its own parameters, and Adam is
    elementwise), so stacking them along a leading site dimension is exactly training each
    alone with the same minibatch indices, at a fraction of the per-step overhead.
    Returns [(SAE on the raw activation scale, final training loss)].
    """
    S, (n, d_in) = len(xs), xs[0].shape
    x = torch.stack(xs)  # [S, n, d]
    init = torch.Generator().manual_seed(settings.seed)
    scale = math.sqrt(d_in) / x.norm(dim=-1).mean(-1).clamp(min=1e-8)  # [S]
    x = x * scale[:, None, None]
    sae = SparseAutoencoder(d_in, settings.d_sae, settings.architecture, k=settings.k).to(x.device)
    with torch.no_grad():  # the same module, its parameters with a leading site dimension
        W_dec = torch.randn(S, settings.d_sae, d_in, generator=init).to(x.device)
        sae.W_dec = nn.Parameter(W_dec / W_dec.norm(dim=-1, keepdim=True))
        # contiguous, like the optimizer state a resumed training loads: the same layouts give the same bits
        sae.W_enc = nn.Parameter(sae.W_dec.transpose(1, 2).contiguous())
        sae.b_enc = nn.Parameter(torch.zeros(S, 1, settings.d_sae, device=x.device))
        sae.b_dec = nn.Parameter(x.median(dim=1, keepdim=True).values)  # a cheap robust centre
    try:  # one fused kernel per step (torch >= 2.4 on CPU and CUDA): the steps are tiny
        optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.Adam(sae.parameters(), lr=settings.lr)
    warmup = max(1, int(settings.l1_warmup * settings.steps))
    done, losses = 0, torch.full((S,), float("nan"))

    def snapshot() -> tuple[dict, dict]:
        return {"step": done, "steps": settings.steps}, {**training_tensors(sae, optimizer), "losses": losses}

    autosave = Autosave(
        checkpointing.checkpoint if checkpointing else None, CHECKPOINT_METHOD, checkpointing.every if checkpointing else 0.0, snapshot
    )
    loaded = autosave.load(checkpointing is not None and checkpointing.resume)
    if loaded is not None:
        state, tensors = loaded
        restore_training(tensors, sae, optimizer, autosave.checkpoint)
        done, losses = int(state["step"]), tensors["losses"]
        if advance is not None:
            advance(done)
    try:
        for step in range(done, settings.steps):
            batch = x[:, minibatch(n, settings, step).to(x.device)]
            features = sae.encode(batch)
            per_site = (sae.decode(features) - batch).pow(2).sum(-1).mean(-1)  # [S]
            if settings.architecture == "relu":
                per_site = per_site + settings.l1 * min(1.0, (step + 1) / warmup) * features.abs().sum(-1).mean(-1)
            optimizer.zero_grad(set_to_none=True)
            per_site.sum().backward()
            with torch.no_grad():  # keep decoder rows on the unit sphere
                W = sae.W_dec
                W.grad -= (W.grad * W).sum(-1, keepdim=True) * W
            with hold_interrupts():  # the update is applied whole or not at all: a checkpoint is after a step
                optimizer.step()
                with torch.no_grad():
                    sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8)
                done, losses = step + 1, per_site.detach()
            if advance is not None:
                advance()
            autosave.maybe_save()
    except KeyboardInterrupt:
        if autosave.checkpoint is None:
            raise
        raise autosave.interrupted(f"SAE training (at step {done} of {settings.steps})", "circuitctl train-sae CONFIG") from None
    results = []
    with torch.no_grad():  # split the sites and fold the training scale into the weights
        for i, info in enumerate(infos):
            single = SparseAutoencoder(d_in, settings.d_sae, settings.architecture, k=settings.k, info=info).to(x.device)
            single.W_enc.copy_(sae.W_enc[i] * scale[i])
            single.b_enc.copy_(sae.b_enc[i, 0])
            single.W_dec.copy_(sae.W_dec[i] / scale[i])
            single.b_dec.copy_(sae.b_dec[i, 0] / scale[i])
            results.append((single.requires_grad_(False), float(losses[i])))
    return results


def minibatch(n: int, settings: TrainSettings, step: int) -> torch.Tensor:
    """The indices of step `step`'s minibatch among n activations: a function of the seed and the
    step only (not of the number of sites, nor of earlier draws), so that a resumed training
    draws what an uninterrupted one does."""
    generator = torch.Generator().manual_seed((settings.seed + 1) * 2**32 + step)
    return torch.randint(0, n, (settings.batch_size,), generator=generator)


def training_tensors(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Everything a training step changes, as named tensors (safetensors; nothing pickled):
    the stacked SAEs' parameters and Adam's per-parameter state."""
    tensors = {f"sae.{name}": param for name, param in sae.named_parameters()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"adam.{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors


def restore_training(tensors: dict, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, checkpoint) -> None:
    """The inverse of `training_tensors` (the optimizer's settings come from the same config)."""
    for name, param in sae.named_parameters():
        saved = tensors.get(f"sae.{name}")
        if saved is None or saved.shape != param.shape:
            raise UsageError(
                f"{checkpoint.dir}: the checkpoint does not fit this training run ({name} "
                f"{'missing' if saved is None else tuple(saved.shape)}, expected {tuple(param.shape)}); delete it to start over"
            )
        with torch.no_grad():
            param.copy_(saved)
    adam = optimizer.state_dict()
    adam["state"] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, name = key.split(".")
            adam["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(adam)


def next_token_loss(logits: torch.Tensor, tokens: TokenSet) -> float:
    """Mean next-token cross-entropy over real tokens; logits [N, P, vocab]."""
    logp = logits[:, :-1].float().log_softmax(-1)
    target = tokens.tokens[:, 1:].to(logits.device)
    nll = -logp.gather(-1, target[..., None])[..., 0]
    mask = (torch.arange(1, tokens.tokens.shape[1])[None] < tokens.lengths[:, None]).to(logits.device)
    return float((nll * mask).sum() / mask.sum().clamp(min=1))


def model_losses(runner: SiteRunner, site: Site, sae: SparseAutoencoder, tokens: TokenSet, batch_size: int = 64) -> tuple[float, float, float]:
    """(clean, SAE spliced in, site zero-ablated) next-token losses, token-weighted."""
    device = runner.model.W_U.device
    def splice(x: torch.Tensor) -> torch.Tensor:  # SAEs are trained in float32 whatever the model's dtype
        return sae.decode(sae.encode(x.float())).to(x.dtype)

    edits = {"clean": {}, "sae": {site: splice}, "zero": {site: torch.zeros_like}}
    totals = dict.fromkeys(edits, 0.0)
    weight = 0
    with torch.no_grad():
        for lo in range(0, tokens.n, batch_size):
            part = TokenSet(tokens.tokens[lo : lo + batch_size], tokens.lengths[lo : lo + batch_size], tokens.origin)
            n = int((part.lengths - 1).clamp(min=0).sum())
            for name, edit in edits.items():
                logits = runner.forward(part.tokens.to(device), None, edit)
                totals[name] += next_token_loss(logits, part) * n
            weight += n
    return tuple(totals[k] / max(weight, 1) for k in ("clean", "sae", "zero"))  # type: ignore[return-value]


def measure(sae: SparseAutoencoder, x: torch.Tensor) -> dict[str, float]:
    """Reconstruction and sparsity on held-out activations x [n, d_in]."""
    with torch.no_grad():
        reconstruction, features = sae(x)
        residual = (x - reconstruction).pow(2)
        variance = (x - x.mean(0)).pow(2).sum()
        active = features != 0
    return {
        "mse": float(residual.mean()),
        "explained_variance": float(1 - residual.sum() / variance.clamp(min=1e-12)),
        "l0": float(active.sum(-1).float().mean()),
        "dead_fraction": float((~active.any(0)).float().mean()),
    }


def train_saes(
    runner: SiteRunner,
    train: TokenSet,
    held_out: TokenSet,
    settings: TrainSettings,
    hook_names: dict[Site, str],
    model_name: str | None = None,
    checkpointing: Checkpointing | None = None,
) -> list[tuple[Site, SparseAutoencoder, SaeMetrics]]:
    """Train one SAE per site of `runner` (all from the same forward passes) and measure each."""
    train_acts = collect_activations(runner, train)
    eval_acts = collect_activations(runner, held_out)
    infos = [
        SaeInfo(
            hook_name=hook_names[site],
            model_name=model_name,
            extra={"circuitctl_site": site.name, "trained_by": "circuitctl train-sae", "training": asdict(settings)},
        )
        for site in runner.sites
    ]
    started = time.perf_counter()
    with bar(f"training {len(infos)} SAE(s)", settings.steps) as advance:
        fitted = fit_saes([train_acts[site] for site in runner.sites], settings, infos, advance, checkpointing)
    seconds = (time.perf_counter() - started) / len(infos)
    results = []
    for site, (sae, final_loss) in zip(runner.sites, fitted):
        started = time.perf_counter()
        stats = measure(sae, eval_acts[site])
        ce_clean, ce_sae, ce_zero = model_losses(runner, site, sae, held_out)
        gap = ce_zero - ce_clean
        metrics = SaeMetrics(
            site=site.name,
            hook_name=hook_names[site],
            architecture=settings.architecture,
            d_in=sae.d_in,
            d_sae=sae.d_sae,
            train_tokens=int(train_acts[site].shape[0]),
            eval_tokens=int(eval_acts[site].shape[0]),
            final_train_loss=final_loss,
            ce_clean=ce_clean,
            ce_with_sae=ce_sae,
            ce_zero_ablation=ce_zero,
            loss_recovered=(ce_zero - ce_sae) / gap if abs(gap) > 1e-12 else float("nan"),
            seconds=seconds + time.perf_counter() - started,
            **stats,
        )
        results.append((site, sae, metrics))
    return results
