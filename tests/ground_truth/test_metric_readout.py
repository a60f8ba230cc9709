"""`MetricReadout` (the metric straight from final residuals, computing only the logits it
needs) equals the metric of the full logits: the column-restricted logit difference, the
blockwise probability difference and KL divergence, and the fallback for any other metric."""

from __future__ import annotations

import pytest
import torch
from testkit import random_model

from circuitctl.interventions.measure import TOP1_MARGIN
from circuitctl.metrics.metrics import METRICS
from circuitctl.metrics.readout import MetricReadout, Unembedding
from circuitctl.tasks.data import TaskData

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 13


def full_metric(model, metric, batch, reference, final):
    """The plain way: ln_final and the whole unembedding with TransformerLens's modules, then the metric."""
    K, B, d = final.shape
    x = final.reshape(K * B, 1, d)
    if hasattr(model, "ln_final"):
        x = model.ln_final(x)
    logits = model.unembed(x)[:, 0]
    return metric(logits.float(), batch.repeat(K), reference.float().repeat(K, 1)).view(K, B)


def batch_of(B: int, device, answers: torch.Tensor, wrong: torch.Tensor) -> TaskData:
    tokens = torch.zeros(B, 4, dtype=torch.long, device=device)
    return TaskData(tokens, tokens, torch.full((B,), 4, device=device), answers.to(device), wrong.to(device), {})


def case(model, seed: int = 0, K: int = 3, B: int = 5, spread: float = 0.5):
    """(batch, reference logits, final residuals [K, B, d]) near a random base."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    d = model.cfg.d_model
    # several answers and wrong answers, with padding (-1) and ids shared between rows
    answers = torch.tensor([[1, 4], [2, -1], [1, -1], [7, 3], [12, -1]])[:B]
    wrong = torch.tensor([[0, -1], [5, 6], [4, -1], [2, 9], [0, 11]])[:B]
    base = torch.randn(B, d, generator=g).to(device)
    final = (base + spread * torch.randn(K, B, d, generator=g).to(device)).to(model.cfg.dtype)
    with torch.no_grad():
        reference = full_logits(model, base.to(model.cfg.dtype))
    return batch_of(B, device, answers, wrong), reference, final


def full_logits(model, final):
    x = final.reshape(-1, 1, final.shape[-1])
    if hasattr(model, "ln_final"):
        x = model.ln_final(x)
    return model.unembed(x)[:, 0]


MODELS = {
    "layernorm": {},
    "rmsnorm": {"normalization_type": "RMS"},
    "no-normalization": {"normalization_type": None, "attn_only": True},
}


@pytest.mark.parametrize("metric_name", ["logit_diff", "prob_diff", "kl", "top1_margin"])
@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("chunk", [VOCAB, 5])  # one block, and blocks with a short last one
def test_readout_equals_the_metric_of_the_full_logits(metric_name, model_kind, chunk):
    model = random_model(3, d_vocab=VOCAB, **MODELS[model_kind])
    metric = TOP1_MARGIN if metric_name == "top1_margin" else METRICS.get(metric_name)
    unembedding = Unembedding(model)
    unembedding.chunk = chunk
    for seed in range(3):
        batch, reference, final = case(model, seed)
        with torch.no_grad():
            expected = full_metric(model, metric, batch, reference, final)
            got = MetricReadout(unembedding, metric, batch, reference)(final)
        assert got.shape == expected.shape == final.shape[:2]
        assert got.dtype == torch.float32
        scale = float(expected.abs().max())
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * max(scale, 1e-3)), (got, expected)


def test_logit_difference_reads_only_the_answer_columns():
    """The logit difference unembeds only the batch's answer and wrong-answer ids (sorted, each once)."""
    model = random_model(4, d_vocab=VOCAB)
    batch, reference, final = case(model)
    readout = MetricReadout(Unembedding(model), METRICS.get("logit_diff"), batch, reference)
    ids = torch.cat([batch.answers.flatten(), batch.wrong.flatten()])
    assert readout.columns.tolist() == sorted(set(ids[ids >= 0].tolist()))
    assert len(readout.columns) < VOCAB


def test_kl_is_exact_with_large_logits():
    """Real models' logits sit far from zero (GPT-2's near -100): the KL from the blockwise
    form matches a float64 computation from the same float32 logits, and is not worse than
    the plain float32 formula."""
    model = random_model(5, d_vocab=VOCAB)
    with torch.no_grad():
        model.unembed.b_U -= 95.0
    metric = METRICS.get("kl")
    unembedding = Unembedding(model)
    unembedding.chunk = 4
    batch, reference, final = case(model, spread=0.05)
    with torch.no_grad():
        got = MetricReadout(unembedding, metric, batch, reference)(final).double()
        plain = full_metric(model, metric, batch, reference, final).double()
        logits = full_logits(model, final).double()
    ref = reference.double().repeat(final.shape[0], 1)
    exact = (ref.softmax(-1) * (ref.log_softmax(-1) - logits.log_softmax(-1))).sum(-1).view(final.shape[:2])
    assert float(exact.min()) > 0
    assert torch.allclose(got, exact, rtol=1e-4, atol=1e-6)
    assert float((got - exact).abs().max()) <= float((plain - exact).abs().max()) + 1e-6


def test_readout_follows_the_model_dtype():
    """bfloat16 models: logits in bfloat16 (as the model computes them), the metric in float32."""
    model = random_model(6, d_vocab=VOCAB).to(torch.bfloat16)
    unembedding = Unembedding(model)
    unembedding.chunk = 5
    for name in ("logit_diff", "prob_diff", "kl"):
        metric = METRICS.get(name)
        batch, reference, final = case(model)
        with torch.no_grad():
            expected = full_metric(model, metric, batch, reference, final)
            got = MetricReadout(unembedding, metric, batch, reference)(final)
        assert got.dtype == torch.float32
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())), name
