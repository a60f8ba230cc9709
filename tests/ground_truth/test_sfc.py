"""Sparse feature circuits: exact decomposition, node effects against exact feature patching,
integrated gradients against attribution, edges against finite differences, and the CLI
pipeline (train-sae -> discover -> evaluate faithfulness) on a planted model.

Every reference value here is computed with TransformerLens's own hooks (`run_with_hooks`),
not with the library's `SiteRunner`.
"""

from __future__ import annotations

import json

import pytest
import torch
from testkit import random_model, random_tokens

from circuitctl.config.methods import SfcSettings
from circuitctl.config.schema import AblationConfig
from circuitctl.errors import UsageError
from circuitctl.methods.base import DiscoveryContext
from circuitctl.methods.sfc import find_feature_circuit
from circuitctl.metrics.metrics import METRICS
from circuitctl.models.adapter import ModelAdapter
from circuitctl.graph.naming import error_node, feature_node, parse_feature_node, parse_site, split_edge
from circuitctl.tasks.data import tokenize_pairs
from circuitctl.tasks.records import pair_from_record

LOGIT_DIFF = METRICS.get("logit_diff")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


# ----------------------------------------------------------------------------------------
# Setup: a model, SAEs trained on it, prompt pairs; reference computations with TL hooks
# ----------------------------------------------------------------------------------------
def tl_hook(site: str) -> str:
    s = parse_site(site)
    if s.kind == "embed":
        return "blocks.0.hook_resid_pre"
    return f"blocks.{s.layer}." + {"attn": "hook_attn_out", "mlp": "hook_mlp_out", "resid": "hook_resid_post"}[s.kind]


def make_pairs(model, n=12, length=6, changed=(2,), seed=1):
    vocab = model.cfg.d_vocab
    clean = random_tokens(n, length, vocab, seed)
    corrupt = clean.clone()
    for i, p in enumerate(changed):
        corrupt[:, p] = (clean[:, p] + 1 + random_tokens(n, 1, vocab - 1, seed + 10 + i)[:, 0]) % vocab
    answers, wrong = random_tokens(n, 2, vocab, seed + 20).T
    wrong = torch.where(wrong == answers, (wrong + 1) % vocab, wrong)
    records = [{"clean": c.tolist(), "corrupt": k.tolist(), "answers": [int(a)], "wrong_answers": [int(w)]}
               for c, k, a, w in zip(clean, corrupt, answers, wrong)]
    return tokenize_pairs([pair_from_record(r, "test") for r in records], None, vocab, None, "test")


def train(model, site_names, seed=0, steps=200):
    from circuitctl.models.sae_sites import SiteRunner, hook_name
    from circuitctl.sae.tokens import random_tokens as token_stream
    from circuitctl.sae.train import TrainSettings, train_saes

    sites = [parse_site(s) for s in site_names]
    held = token_stream(model.cfg.d_vocab, 240, 6, seed).split(0.1)
    settings = TrainSettings(d_sae=32, architecture="relu", l1=0.3, steps=steps, batch_size=128, lr=3e-3, seed=seed)
    trained = train_saes(SiteRunner(model, sites), *held, settings, {s: hook_name(s) for s in sites}, "test")
    dtype = model.W_U.dtype
    return {site: sae.to(dtype) for site, sae, _ in trained}


def scored(result):
    """A feature-circuit result as plain data: node name -> score, edge name -> score, position names."""
    from types import SimpleNamespace

    space = result.space
    positions = list(space.layout.names) if space.layout is not None else None
    return SimpleNamespace(nodes=dict(zip(space.unit_names(), result.scores.tolist())), edges=space.edges, positions=positions)


def context(model, data, ablation="resample"):
    return DiscoveryContext(ModelAdapter(model), data, LOGIT_DIFF, AblationConfig(type=ablation))


def run_metric(model, data, hooks, tokens=None, repeat=1):
    """Per-circuit mean logit difference with TL's run_with_hooks; `repeat` stacked batches."""
    tokens = data.clean.repeat(repeat, 1) if tokens is None else tokens
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    rows = torch.arange(tokens.shape[0])
    at_answer = logits[rows, data.answer_positions.repeat(repeat)]
    return torch.stack([LOGIT_DIFF(part, data).mean() for part in at_answer.split(data.n)])


def site_outputs(model, tokens, names):
    store = {}

    def keep(name):
        def hook(x, hook):
            store[name] = x.detach().clone()

        return hook

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(tl_hook(n), keep(n)) for n in names])
    return store


@pytest.fixture(scope="module")
def nonlinear():
    """LayerNorm + GELU MLPs, float64 (for finite differences), SAEs at four sites."""
    model = random_model(0)
    model.to(torch.float64)
    model.requires_grad_(False)
    saes = train(model, ["embed", "attn0", "mlp0", "resid0"])
    return model, saes, make_pairs(model)


@pytest.fixture(scope="module")
def linear():
    """Attention-only, no normalisation: the metric is linear in the last layer's outputs."""
    model = random_model(1, attn_only=True, normalization_type=None, n_layers=2)
    model.requires_grad_(False)
    saes = train(model, ["attn1", "resid1"])
    return model, saes, make_pairs(model, changed=(2, 4))


# ----------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------
def test_sae_reconstruction_plus_error_leaves_the_model_unchanged(nonlinear):
    model, saes, data = nonlinear
    names = [s.name for s in saes]
    acts = site_outputs(model, data.clean, names)
    by_name = {s.name: sae for s, sae in saes.items()}
    for name, x in acts.items():
        sae = by_name[name]
        features = sae.encode(x)
        assert torch.allclose(sae.decode(features) + (x - sae.decode(features)), x, atol=1e-12)

    def replaced(name, with_error):
        def hook(x, hook):
            sae = by_name[name]
            reconstruction = sae.decode(sae.encode(x))
            return reconstruction + (x - reconstruction) if with_error else reconstruction

        return hook

    clean = run_metric(model, data, [])
    spliced = run_metric(model, data, [(tl_hook(n), replaced(n, True)) for n in names])
    without_error = run_metric(model, data, [(tl_hook(n), replaced(n, False)) for n in names])
    assert torch.allclose(spliced, clean, atol=1e-10)
    assert not torch.allclose(without_error, clean, atol=1e-3)  # the error term carries something


# ----------------------------------------------------------------------------------------
# Node effects
# ----------------------------------------------------------------------------------------
def exact_node_scores(model, sae, site, data, position=None, error=False):
    """Importance of every feature (or the error) of `site` by patching it alone to its corrupt
    value (at one position, or at all), everything else clean: K forward passes in one batch."""
    clean_x = site_outputs(model, data.clean, [site])[site]
    corrupt_x = site_outputs(model, data.corrupt, [site])[site]
    f_c, f_p = sae.encode(clean_x), sae.encode(corrupt_x)
    e_c, e_p = clean_x - sae.decode(f_c), corrupt_x - sae.decode(f_p)
    where = slice(None) if position is None else slice(position, position + 1)
    if error:
        e = e_c.clone()
        e[:, where] = e_p[:, where]
        patched = [sae.decode(f_c) + e]
    else:
        patched = []
        for j in range(sae.d_sae):
            f = f_c.clone()
            f[:, where, j] = f_p[:, where, j]
            patched.append(sae.decode(f) + e_c)
    stacked = torch.cat(patched)
    values = run_metric(model, data, [(tl_hook(site), lambda x, hook: stacked)], repeat=len(patched))
    clean = run_metric(model, data, [])
    return -(values - clean)  # importance sign of the logit difference


def test_attribution_matches_exact_feature_patching_on_a_linear_model(linear):
    model, saes, data = linear
    ctx = context(model, data)
    for aggregation in ("none", "sum"):
        settings = SfcSettings(saes="unused", steps=1, aggregation=aggregation, node_threshold=1e9, batch_size=5)
        circuit = scored(find_feature_circuit(ctx, settings, saes))
        assert circuit.positions == (["t0", "t1", "t2", "t3", "t4", "end"] if aggregation == "none" else None)
        checked = 0
        for site, sae in saes.items():
            for position in ((2, 4, 5) if aggregation == "none" else (None,)):
                label = None if position is None else circuit.positions[position]
                exact = exact_node_scores(model, sae, site.name, data, position)
                ours = torch.tensor([circuit.nodes.get(feature_node(site.name, j, label), 0.0) for j in range(sae.d_sae)])
                assert torch.allclose(ours, exact.float(), atol=2e-5, rtol=1e-4), (aggregation, site, position)
                exact_error = exact_node_scores(model, sae, site.name, data, position, error=True)
                assert circuit.nodes.get(error_node(site.name, label), 0.0) == pytest.approx(float(exact_error[0]), abs=2e-5)
                checked += int((exact.abs() > 1e-3).sum())
        assert checked > 10  # the comparison is not between zeros


def test_integrated_gradients_improve_on_attribution_where_the_model_is_nonlinear(nonlinear):
    """Patching a whole site (every feature and the error) has an exact effect; a site's node
    scores should add up to it. Attribution's first-order error is large in this LayerNorm/GELU
    model; integrated gradients' shrinks with the number of steps."""
    model, saes, data = nonlinear
    ctx = context(model, data)
    totals = {}
    for steps in (1, 4, 16):
        circuit = scored(find_feature_circuit(ctx, SfcSettings(saes="unused", steps=steps, node_threshold=1e9, batch_size=6), saes))
        totals[steps] = {site: sum(v for n, v in circuit.nodes.items() if parse_feature_node(n).site == site) for site in ("embed", "resid0")}
    clean = float(run_metric(model, data, [])[0])
    for site in ("embed", "resid0"):
        corrupt_x = site_outputs(model, data.corrupt, [site])[site]
        exact = -(float(run_metric(model, data, [(tl_hook(site), lambda x, hook: corrupt_x)])[0]) - clean)
        errors = {steps: abs(totals[steps][site] - exact) for steps in totals}
        assert errors[1] > 0.1 * abs(exact), (site, errors, exact)  # the model is far from linear here
        assert errors[16] < errors[4] < errors[1], (site, errors)
        assert errors[16] < 0.15 * errors[1], (site, errors)


# ----------------------------------------------------------------------------------------
# Edges
# ----------------------------------------------------------------------------------------
def test_edges_are_gradient_times_direct_jacobian_times_delta(nonlinear):
    """Each edge score against central finite differences along the direct path: every site
    except the upstream one frozen at its clean output, the upstream node moved by
    epsilon * (patch - clean), the downstream node read from its site's raw output."""
    model, saes, data = nonlinear
    ctx = context(model, data)
    settings = SfcSettings(saes="unused", steps=1, node_threshold=0.02, edge_threshold=0.0, batch_size=5)
    circuit = scored(find_feature_circuit(ctx, settings, saes))
    by_name = {s.name: sae for s, sae in saes.items()}
    names = list(by_name)
    clean_x = site_outputs(model, data.clean, names)
    corrupt_x = site_outputs(model, data.corrupt, names)

    # the true gradient of the summed metric w.r.t. each site's output, at the clean run
    kept = {}

    def start_graph(x, hook):
        return x.detach().requires_grad_(True)

    def keep(name):
        def hook(x, hook):
            x.retain_grad()
            kept[name] = x

        return hook

    with torch.enable_grad():
        logits = model.run_with_hooks(data.clean, fwd_hooks=[("hook_embed", start_graph)] + [(tl_hook(n), keep(n)) for n in names])
        rows = torch.arange(data.n)
        LOGIT_DIFF(logits[rows, data.answer_positions], data).sum().backward()
    grad_x = {n: kept[n].grad for n in names}

    def direction(node):
        sae = by_name[node.site]
        x_c, x_p = clean_x[node.site], corrupt_x[node.site]
        if node.is_error:
            return (x_p - sae.decode(sae.encode(x_p))) - (x_c - sae.decode(sae.encode(x_c)))
        delta = sae.encode(x_p)[..., node.feature] - sae.encode(x_c)[..., node.feature]
        return delta[..., None] * sae.W_dec[node.feature]

    def downstream_value(upstream, down, eps):
        raw = {}

        def freeze(name):
            def hook(x, hook):
                raw[name] = x
                out = clean_x[name]
                return out + eps * direction(upstream) if name == upstream.site else out

            return hook

        with torch.no_grad():
            logits = model.run_with_hooks(data.clean, fwd_hooks=[(tl_hook(n), freeze(n)) for n in names])
        if down == "logits":  # the logit difference in float64 (the metric itself computes in float32)
            at_answer = logits[torch.arange(data.n), data.answer_positions]
            return (at_answer.gather(1, data.answers) - at_answer.gather(1, data.wrong)).sum()
        node = parse_feature_node(down)
        sae, x = by_name[node.site], raw[node.site]
        g = grad_x[node.site]
        if node.is_error:
            return (g * (x - sae.decode(sae.encode(x)))).sum()
        return ((g @ sae.W_dec.T)[..., node.feature] * sae.encode(x)[..., node.feature]).sum()

    ranked = sorted(circuit.edges.items(), key=lambda item: -abs(item[1]))
    internal = [e for e in ranked if not e[0].endswith("->logits")][:8]
    to_logits = [e for e in ranked if e[0].endswith("->logits")][:2]
    assert len(internal) == 8 and len(to_logits) == 2
    eps = 1e-4
    for name, score in internal + to_logits:
        up, down = split_edge(name)
        derivative = (downstream_value(parse_feature_node(up), down, eps) - downstream_value(parse_feature_node(up), down, -eps)) / (2 * eps)
        expected = -float(derivative) / data.n  # importance sign of the logit difference, mean over examples
        assert score == pytest.approx(expected, rel=1e-3, abs=1e-7), name
    assert abs(internal[0][1]) > 1e-3


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------
def test_usage_errors(nonlinear, tmp_path):
    model, saes, data = nonlinear
    kl = DiscoveryContext(ModelAdapter(model), data, METRICS.get("kl"), AblationConfig())
    with pytest.raises(UsageError, match="KL divergence is zero at the clean run"):
        find_feature_circuit(kl, SfcSettings(saes="x", steps=1), saes)
    ragged = tokenize_pairs(
        [pair_from_record({"clean": c, "corrupt": c, "answers": [1], "wrong_answers": [2]}, "t") for c in ([1, 2, 3], [4, 5])],
        None, model.cfg.d_vocab, None, "t",
    )
    with pytest.raises(UsageError, match="prompts of one token length"):
        find_feature_circuit(context(model, ragged), SfcSettings(saes="x", aggregation="none"), saes)
    from circuitctl.sae.loading import resolve_saes

    mlp_sae = next(sae for site, sae in saes.items() if site.name == "mlp0")
    mlp_sae.save(tmp_path / "mlp0")
    with pytest.raises(UsageError, match="reads 'blocks.0.hook_mlp_out', which is site mlp0, not resid0"):
        resolve_saes({"resid0": str(tmp_path / "mlp0")}, None, model, "cpu")
    found = resolve_saes(str(tmp_path), None, model, "cpu")  # a directory of SAEs, placed by hook name
    assert [s.name for s in found] == ["mlp0"]
    with pytest.raises(ValueError, match="not a site"):
        SfcSettings(saes={"mlp": "x"})
    for ablation in ("zero", "mean"):  # the other ablations run and give finite scores
        result = find_feature_circuit(context(model, data, ablation), SfcSettings(saes="x", steps=2, node_threshold=1e9), saes)
        assert bool(torch.isfinite(result.scores).all())


# ----------------------------------------------------------------------------------------
# The command line: train-sae -> discover -> evaluate faithfulness
# ----------------------------------------------------------------------------------------
def test_pipeline_on_a_planted_model_writes_circuit_and_faithfulness_curve(tmp_path, monkeypatch):
    import yaml

    from circuitctl.cli.app import main
    from circuitctl.testing.planted import build, export

    export(build("mlp_neurons"), tmp_path / "model", tmp_path / "task")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({
        "model": {"path": "model", "device": "cpu"}, "sites": ["attn0", "mlp0"], "d_sae": 32, "l1": 0.5,
        "steps": 150, "batch_size": 128, "lr": 3e-3, "tokens": {"type": "task", "path": "task"}, "output": {"dir": "saes"},
    }))
    main(["train-sae", "train.yaml"])
    metrics = json.loads((tmp_path / "saes" / "metrics.json").read_text())
    assert [m["site"] for m in metrics["saes"]] == ["attn0", "mlp0"]
    assert all(m["explained_variance"] > 0.8 for m in metrics["saes"])
    with pytest.raises(SystemExit) as refused:  # never overwrites silently
        main(["train-sae", "train.yaml"])
    assert refused.value.code == 2

    (tmp_path / "sfc.yaml").write_text(yaml.safe_dump({
        "model": {"path": "model", "device": "cpu"}, "task": {"path": "task"},
        "method": {"name": "sfc", "saes": "saes", "node_threshold": 0.1, "edge_threshold": 0.05, "steps": 4},
        "output": {"dir": "run"},
    }))
    main(["discover", "sfc.yaml"])
    record = json.loads((tmp_path / "run" / "circuit.json").read_text())
    assert record["format"] == "circuitctl.circuit" and record["config_hash"] and record["library_versions"]
    assert record["space"]["kind"] == "feature" and record["space"]["sites"] == ["attn0", "mlp0"]
    assert record["space"]["sae_sources"]["mlp0"] == str((tmp_path / "saes" / "mlp0").resolve())
    in_graph = [n for n, e in record["nodes"].items() if e["in_graph"] and n != "logits"]
    assert in_graph and all(abs(record["nodes"][n]["score"]) > 0.1 for n in in_graph)
    assert all("label" in record["nodes"][n] for n in in_graph if "/err" not in n)
    for name, entry in record["edges"].items():
        up, down = split_edge(name)
        assert up in in_graph and (down in in_graph or down == "logits")
        assert entry["in_graph"] == (abs(entry["score"]) > 0.05)
    assert record["results"]["metric_full"] == pytest.approx(4.0, abs=1e-4)  # clean logit diff of the planted model
    assert "digraph" in (tmp_path / "run" / "circuit.dot").read_text()

    main(["evaluate", "faithfulness", "run"])
    report = json.loads((tmp_path / "run" / "faithfulness.json").read_text())
    assert report["ablation"] == "resample" and report["kind"] == "feature" and report["n_in_circuit"] == len(in_graph)
    n = report["curve_sizes"]
    assert len(n) == len(report["curve_absolute"]) == len(report["curve_signed"]) >= 3
    assert n == sorted(n) and n[0] == 1 and report["cpr"] is None  # node counts, not MIB percentages
    assert report["curve_absolute"][-1] == pytest.approx(1.0, abs=0.05)  # all scored nodes: the model itself
    assert report["faithfulness"] > report["completeness"]
    assert (tmp_path / "run" / "faithfulness_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
