"""Direct logit attribution at the answer position: answer minus wrong answer.

A component's output x at the answer position reaches the logits through the final
normalisation and the unembedding. With the normalisation's scale s taken from the clean run
(per example), that path is linear: DLA(x) = (centre(x) * w) . (W_U[:, answer] - W_U[:, wrong]) / s,
where centring applies to LayerNorm (not RMSNorm) and w is the normalisation's weight. Every
component's DLA plus the biases' sums to the clean logit difference exactly (tested). Several
answers or wrong answers are averaged, as in the logit-difference metric; without wrong answers
the reference is the mean logit over the vocabulary.

MLP neurons: each neuron's DLA (its activation times its output weights, read the same way) and
the existing neuron attribution of EAP-IG at one step (`circuitctl.models.gradients`): (clean -
corrupt activation) x the gradient of the logit difference at the clean run, summed over
positions; positive = the neuron's clean value supports the answer.
"""

from __future__ import annotations

import torch


def _norm_kind(model) -> str:
    ln = getattr(model, "ln_final", None)
    if ln is None:
        return "none"
    return "rms" if "RMS" in type(ln).__name__ else "ln"


def logit_directions(model, answers: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """[N, d_model] per example: the unembedding difference, with the final normalisation's
    weight folded in and (LayerNorm) centred, so DLA(x) = x . direction / scale."""
    W_U = model.W_U.detach().float().cpu()  # [d, V]
    ans_mask = (answers >= 0).float()
    ans = (W_U.T[answers.clamp(min=0)] * ans_mask[..., None]).sum(1) / ans_mask.sum(1, keepdim=True).clamp(min=1)
    if wrong.shape[1] and bool((wrong >= 0).any()):
        wrong_mask = (wrong >= 0).float()
        ref = (W_U.T[wrong.clamp(min=0)] * wrong_mask[..., None]).sum(1) / wrong_mask.sum(1, keepdim=True).clamp(min=1)
    else:
        ref = W_U.mean(1).expand_as(ans)
    direction = ans - ref
    kind = _norm_kind(model)
    weight = getattr(getattr(model, "ln_final", None), "w", None)
    if weight is not None:
        direction = direction * weight.detach().float().cpu()
    if kind == "ln":
        direction = direction - direction.mean(-1, keepdim=True)
    return direction


def final_scale(model, resid_final: torch.Tensor) -> torch.Tensor:
    """[N] the final normalisation's scale at the answer position (1 without normalisation)."""
    kind = _norm_kind(model)
    if kind == "none":
        return torch.ones(resid_final.shape[0])
    x = resid_final.float()
    if kind == "ln":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1) + model.ln_final.eps).sqrt()


def dla(outputs: torch.Tensor, direction: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """outputs [N, ..., d] -> [N, ...] direct logit attribution per example."""
    extra = outputs.dim() - 2
    d = direction.reshape(direction.shape[0], *([1] * extra), direction.shape[1])
    s = scale.reshape(scale.shape[0], *([1] * extra))
    return (outputs * d).sum(-1) / s


def summary(clean: torch.Tensor, corrupt: torch.Tensor) -> dict[str, float]:
    """clean / corrupt [N] -> means and their difference."""
    c, k = float(clean.mean()), float(corrupt.mean())
    return {"clean": c, "corrupt": k, "difference": c - k}


def neuron_dla(model, layer: int, post: torch.Tensor, direction: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """post [N, d_mlp] at the answer -> [N, d_mlp] each neuron's direct logit attribution."""
    W_out = model.blocks[layer].mlp.W_out.detach().float().cpu()  # [d_mlp, d]
    return post * (direction @ W_out.T) / scale[:, None]


def _objective(batch):
    """Sum over the batch of answer minus wrong answer (or minus the mean logit)."""

    def value(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        ans_mask = batch.answers >= 0
        ans = (logits.gather(1, batch.answers.clamp(min=0)) * ans_mask).sum(1) / ans_mask.sum(1).clamp(min=1)
        if batch.wrong.shape[1] and bool((batch.wrong >= 0).any()):
            wrong_mask = batch.wrong >= 0
            ref = (logits.gather(1, batch.wrong.clamp(min=0)) * wrong_mask).sum(1) / wrong_mask.sum(1).clamp(min=1)
        else:
            ref = logits.mean(-1)
        return (ans - ref).sum()

    return value


def neuron_attribution(adapter, data, layers: list[int], batch_size: int) -> dict[int, torch.Tensor]:
    """layer -> [d_mlp] mean over examples of (clean - corrupt activation) . gradient at the
    clean run, summed over positions (EAP-IG's neuron attribution at one step)."""
    from circuitctl.models.gradients import gradient_pass, neuron_activations

    if not layers:
        return {}
    totals = {layer: torch.zeros(adapter.cfg.d_mlp) for layer in layers}
    for batch in data.batches(batch_size):
        batch = batch.to(adapter.device)
        clean_post = neuron_activations(adapter, batch.clean)
        corrupt_post = neuron_activations(adapter, batch.corrupt)
        passed = gradient_pass(adapter, adapter.embed(batch.clean), batch.answer_positions, _objective(batch), neurons=True)
        for layer in layers:
            delta = (clean_post[layer] - corrupt_post[layer]).float()
            totals[layer] += (delta * passed.post_grads[layer].float()).sum((0, 1)).cpu()
    return {layer: total / data.n for layer, total in totals.items()}
