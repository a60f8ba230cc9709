"""bfloat16 / float16 models score edges like float32 ones; out-of-memory errors halve the batch.

Scores and metrics are accumulated in float32 (float64 for dataset sums) whatever the
model's dtype. The out-of-memory path is tested on CPU by injecting the error CUDA raises
(`torch.cuda.OutOfMemoryError`) into the adapter.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from testkit import random_model, random_tokens
from helpers import edge_auc, planted_context

from circuitctl.batching import BatchSizer, ResourceNote, collect_notes
from circuitctl.config.methods import EapSettings, ExactSettings
from circuitctl.config.schema import AblationConfig
from circuitctl.errors import UsageError
from circuitctl.methods import eap, exact
from circuitctl.methods.base import DiscoveryContext
from circuitctl.metrics.metrics import METRICS
from circuitctl.models.adapter import ModelAdapter, load_model
from circuitctl.testing.planted import build, export
from circuitctl.tasks.data import TaskData, tokenize_pairs
from circuitctl.tasks.records import pair_from_record

METHODS = {"exact": (exact, ExactSettings()), "eap": (eap, EapSettings())}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def top_set(scores: torch.Tensor, mask: torch.Tensor, k: int) -> set[int]:
    return set(scores[mask].abs().topk(k).indices.tolist())


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("planted")


def planted_in(dtype: str, name: str, root, n_pairs: int = 12):
    """A planted model exported and loaded back through `load_model` in `dtype`, with its first pairs."""
    from dataclasses import replace

    pc = build(name)
    pc = replace(pc, pairs=pc.pairs[:n_pairs])
    model_dir = root / name / "model"
    if not model_dir.exists():
        export(pc, model_dir, root / name / "task")
    adapter = ModelAdapter(load_model(None, model_dir, "cpu", dtype))
    data = tokenize_pairs([pair_from_record(r, f"{name} {i}") for i, r in enumerate(pc.pairs)], None, adapter.d_vocab, None, name)
    return pc, DiscoveryContext(adapter, data, METRICS.get("logit_diff"), AblationConfig())


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name, dtype", [("layernorm_mlp", "bfloat16"), ("induction_soft", "bfloat16"), ("layernorm_mlp", "float16")])
def test_half_precision_ranks_planted_edges_like_float32(method, name, dtype, planted_dir):
    module, settings = METHODS[method]
    pc, ctx32 = planted_in("float32", name, planted_dir)
    _, ctx16 = planted_in(dtype, name, planted_dir)
    assert ctx16.adapter.dtype == getattr(torch, dtype)
    s32, s16 = module.discover(ctx32, settings).scores, module.discover(ctx16, settings).scores
    assert s16.dtype == torch.float32
    graph = ctx32.graph
    assert edge_auc(graph, s16, pc.true_edges) == edge_auc(graph, s32, pc.true_edges) == 1.0
    k = len(pc.true_edges)
    assert top_set(s16, graph.edge_mask, k) == top_set(s32, graph.edge_mask, k)
    assert float((s16 - s32).abs().max()) < 0.02 * float(s32.abs().max())


def _as_dtype(model, dtype):
    cfg = copy.deepcopy(model.cfg)
    cfg.dtype = dtype
    from transformer_lens import HookedTransformer

    cast = HookedTransformer(cfg)
    cast.load_state_dict(model.state_dict(), strict=False)  # copies (and rounds) into cfg.dtype
    return cast


def _random_data(n=8, length=7, vocab=13):
    return TaskData(
        random_tokens(n, length, vocab, 0), random_tokens(n, length, vocab, 1), torch.full((n,), length),
        random_tokens(n, 1, vocab, 2), random_tokens(n, 1, vocab, 3), {},
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bfloat16_ranks_every_edge_of_a_random_model_like_float32(method):
    """Random weights: no planted structure, every edge's score matters for the ranking."""
    module, settings = METHODS[method]
    model, data = random_model(0), _random_data()
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        ctx = DiscoveryContext(ModelAdapter(_as_dtype(model, dtype)), data, METRICS.get("logit_diff"), AblationConfig())
        scores[dtype] = module.discover(ctx, settings).scores
    mask = ModelAdapter(model).graph.edge_mask
    a, b = scores[torch.float32][mask], scores[torch.bfloat16][mask]
    assert spearman(a, b) > 0.99
    assert len(top_set(scores[torch.float32], mask, 10) & top_set(scores[torch.bfloat16], mask, 10)) >= 8


def test_mean_ablation_means_are_summed_in_float32():
    model, data = random_model(0), _random_data(n=24)
    means = {}
    for dtype in (torch.float32, torch.bfloat16):
        ctx = DiscoveryContext(ModelAdapter(_as_dtype(model, dtype)), data, METRICS.get("logit_diff"), AblationConfig(type="mean"))
        means[dtype] = ctx.engine(batch_size=5).ablation_outputs(data)
    assert means[torch.bfloat16].dtype == torch.bfloat16
    # one bfloat16 rounding of the mean (plus the bf16 model's own error), not one per addition
    error = (means[torch.bfloat16].float() - means[torch.float32]).abs().max()
    assert float(error) < 0.05 * float(means[torch.float32].abs().max())


# -- out-of-memory: halve the batch and continue ------------------------------------------
OOM = torch.cuda.OutOfMemoryError


def test_batch_sizer_halves_retries_and_says_so():
    seen = []

    class Rows:
        def __init__(self, start, stop):
            self.start, self.stop = start, stop

        @property
        def n(self):
            return self.stop - self.start

        def slice(self, a, b):
            return Rows(self.start + a, self.start + b)

    def work(piece):
        if piece.n > 3:
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append((piece.start, piece.stop))
        return piece.n

    sizer = BatchSizer(16, "a test loop")
    with collect_notes() as notes:
        assert sum(sizer.map(Rows(0, 21), work)) == 21
    assert sizer.size == 2  # 16 -> 8 -> 4 -> 2: pieces of 3 would fit, but halving is by powers of two
    assert [s for s, _ in seen] == sorted(s for s, _ in seen) and seen[-1][1] == 21  # in order, every row once
    assert sum(b - a for a, b in seen) == 21
    assert len(notes) == 3 and "continuing with 8" in notes[0] and "a test loop" in notes[0]
    with pytest.warns(ResourceNote, match="continuing with"):  # outside collect_notes: a warning
        list(BatchSizer(8, "another loop").map(Rows(0, 8), work))
    with pytest.raises(RuntimeError, match="not memory"):  # other errors pass through untouched
        list(BatchSizer(8, "x").map(Rows(0, 8), lambda piece: (_ for _ in ()).throw(RuntimeError("not memory"))))


def _fail_above(monkeypatch, adapter, method: str, limit: int, rows_of):
    """Make adapter.<method> raise CUDA's OOM error when its batch is larger than `limit` rows."""
    original = getattr(adapter, method)
    calls = []

    def wrapper(*args, **kwargs):
        rows = rows_of(*args, **kwargs)
        calls.append(rows)
        if rows > limit:
            raise OOM("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter, method, wrapper)
    return calls


def test_engine_and_exact_patching_halve_on_out_of_memory(monkeypatch):
    _, ctx = planted_context("v_composition", n_pairs=16)
    expected = exact.discover(ctx, ExactSettings(batch_size=16, candidates_per_pass=4)).scores
    engine = ctx.engine(batch_size=16)
    masks = (torch.rand(3, ctx.graph.n_upstream, ctx.graph.n_downstream, generator=torch.Generator().manual_seed(0)) < 0.4)
    values = engine.metric_values(masks, chunk=3)
    # the patched pass (K circuits x B examples) fails above 12 rows: B = 16 -> 8 -> 4 with K = 3
    calls = _fail_above(monkeypatch, ctx.adapter, "patched_logits", 12, lambda clean, abl, masks, pos: masks.shape[0] * clean.logits.shape[0])
    with collect_notes() as notes:
        again = ctx.engine(batch_size=16).metric_values(masks, chunk=3)
        halved = exact.discover(ctx, ExactSettings(batch_size=16, candidates_per_pass=4)).scores
    assert torch.allclose(again, values, atol=1e-6)
    assert torch.allclose(halved, expected, atol=1e-5)
    assert max(calls) > 12 and any(c <= 12 for c in calls)
    assert any("patching engine" in n and "continuing with 8" in n for n in notes)


def test_attribution_halves_on_out_of_memory(monkeypatch):
    _, ctx = planted_context("layernorm_mlp", n_pairs=8)
    expected = eap.discover(ctx, EapSettings(batch_size=8)).scores
    calls = _fail_above(monkeypatch, ctx.adapter, "input_gradients", 2, lambda tokens, *a, **k: tokens.shape[0])
    with collect_notes() as notes:
        halved = eap.discover(ctx, EapSettings(batch_size=8)).scores
    assert torch.allclose(halved, expected, atol=1e-5)
    assert calls[:3] == [8, 4, 2] and max(calls[3:]) <= 2  # 8 fails, 4 fails, then pieces of 2
    assert notes == [
        "out of accelerator memory with 8 examples per batch in attribution scoring; continuing with 4",
        "out of accelerator memory with 4 examples per batch in attribution scoring; continuing with 2",
    ]


def test_out_of_memory_with_one_example_is_a_usage_error(monkeypatch):
    _, ctx = planted_context("copy_first")
    _fail_above(monkeypatch, ctx.adapter, "input_gradients", 0, lambda tokens, *a, **k: tokens.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceNote)
        with pytest.raises(UsageError, match="even with one example per batch"):
            eap.discover(ctx, EapSettings(batch_size=4))


def test_runner_reports_the_halving_and_applies_max_batch_size(monkeypatch, tmp_path):
    import yaml

    from circuitctl.config.load import load_config
    from circuitctl.runner import discover

    export(build("copy_first"), tmp_path / "model", tmp_path / "task")
    (tmp_path / "run.yaml").write_text(
        "model: {path: model, device: cpu}\ntask: {path: task}\nmethod: {name: eap, batch_size: 64}\nmax_batch_size: 8\n"
    )
    original = ModelAdapter.input_gradients

    def fails_above_4(self, tokens, *args, **kwargs):
        if tokens.shape[0] > 4:
            raise OOM("CUDA out of memory")
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(ModelAdapter, "input_gradients", fails_above_4)
    summary = discover(load_config(tmp_path / "run.yaml", [f"output.dir={tmp_path / 'run'}"]), tmp_path)
    assert summary.notes[0] == "out of accelerator memory with 8 examples per batch in attribution scoring; continuing with 4"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]["batch_size"] == 8
