"""SAEs: the module, the sae-lens on-disk format, training and its metrics, the train-sae config."""

from __future__ import annotations

import json

import pytest
import torch
from testkit import random_model

from circuitctl.errors import UsageError
from circuitctl.sae.sae import SaeInfo, SparseAutoencoder, load_sae
from circuitctl.graph.naming import Site, parse_site


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def random_sae(architecture="relu", d_in=6, d_sae=10, k=None, seed=0) -> SparseAutoencoder:
    sae = SparseAutoencoder(d_in, d_sae, architecture, k=k, info=SaeInfo(hook_name="blocks.1.hook_mlp_out", model_name="m"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return sae


def sparse_data(n=3000, d=8, atoms=24, active=3, seed=0) -> torch.Tensor:
    """x = sum of `active` random unit atoms with positive coefficients: a known sparse code."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    codes = torch.zeros(n, atoms)
    index = torch.rand(n, atoms, generator=g).topk(active, dim=1).indices
    codes.scatter_(1, index, 0.5 + torch.rand(n, active, generator=g))
    return codes @ dictionary


# ----------------------------------------------------------------------------------------
# The module and the format
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture,k", [("relu", None), ("topk", 3), ("jumprelu", None)])
def test_reconstruction_plus_error_is_exact_and_files_round_trip(tmp_path, architecture, k):
    sae = random_sae(architecture, k=k)
    x = torch.randn(4, 5, 6)
    features = sae.encode(x)
    assert torch.equal(sae.decode(features) + sae.error(x), x) or torch.allclose(sae.decode(features) + sae.error(x), x, atol=1e-6)
    if architecture == "topk":
        assert bool(((features != 0).sum(-1) <= 3).all())
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[architecture]
    assert (cfg["d_in"], cfg["d_sae"], cfg["metadata"]["hook_name"]) == (6, 10, "blocks.1.hook_mlp_out")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    from safetensors.torch import load_file

    shapes = {name: tuple(t.shape) for name, t in load_file(str(tmp_path / "s" / "sae_weights.safetensors")).items()}
    expected = {"W_enc": (6, 10), "b_enc": (10,), "W_dec": (10, 6), "b_dec": (6,)}
    assert shapes == ({**expected, "threshold": (10,)} if architecture == "jumprelu" else expected)
    loaded = load_sae(tmp_path / "s")
    assert loaded.architecture == architecture and loaded.k == k and loaded.info.hook_name == "blocks.1.hook_mlp_out"
    assert torch.equal(loaded.encode(x), features)


def test_reads_pre_6_sae_lens_configs(tmp_path):
    """Older sae-lens files: top-level hook_point, activation_fn 'topk' with its k in kwargs."""
    sae = random_sae("topk", k=2)
    sae.save(tmp_path / "old")
    cfg = {"d_in": 6, "d_sae": 10, "hook_point": "blocks.2.hook_resid_pre", "activation_fn": "topk",
           "activation_fn_kwargs": {"k": 2}, "apply_b_dec_to_input": True, "model_name": "gpt2"}
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(tmp_path / "old")
    assert (loaded.architecture, loaded.k, loaded.info.hook_name) == ("topk", 2, "blocks.2.hook_resid_pre")
    x = torch.randn(3, 6)
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_bad_sae_directories_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="has no cfg.json"):
        load_sae(tmp_path)
    sae = random_sae()
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 11}))
    with pytest.raises(UsageError, match=r"W_enc has shape \(6, 10\), expected \(6, 11\)"):
        load_sae(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(UsageError, match="normalize_activations = 'layer_norm' is not supported"):
        load_sae(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(UsageError, match="architecture 'gated' is not supported"):
        load_sae(tmp_path / "s")


def test_sites_and_hook_names():
    from circuitctl.models.sae_sites import hook_name, site_of_hook

    assert site_of_hook("blocks.0.hook_resid_pre") == Site("embed", -1)
    assert site_of_hook("blocks.3.hook_resid_pre") == parse_site("resid2") == site_of_hook("blocks.2.hook_resid_post")
    assert site_of_hook("blocks.1.hook_attn_out") == parse_site("attn1")
    for name in ("embed", "attn0", "mlp4", "resid7"):
        assert site_of_hook(hook_name(parse_site(name))) == parse_site(name)
    with pytest.raises(UsageError, match="not a supported site"):
        site_of_hook("blocks.1.attn.hook_z")
    with pytest.raises(ValueError, match="not a site"):
        parse_site("resid")


@pytest.mark.slow
def test_sae_lens_reads_our_files_and_we_read_theirs(tmp_path):
    """Interchange with sae-lens itself (the optional `sae` extra; importing it takes ~20 s)."""
    sae_lens = pytest.importorskip("sae_lens")
    for architecture, k in (("relu", None), ("topk", 3)):
        ours = random_sae(architecture, k=k)
        ours.save(tmp_path / architecture)
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / architecture))
        assert theirs.cfg.metadata.hook_name == "blocks.1.hook_mlp_out"
        x = torch.randn(4, 6)
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-6)
        assert torch.allclose(theirs.decode(ours.encode(x)), ours.decode(ours.encode(x)), atol=1e-6)
    written = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=6, d_sae=10))
    written.save_model(str(tmp_path / "theirs"))
    x = torch.randn(4, 6)
    assert torch.allclose(load_sae(tmp_path / "theirs").encode(x), written.encode(x), atol=1e-6)


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_training_recovers_a_sparse_code(architecture):
    """Data made of 2 active atoms out of 32 in 16 dimensions: a trained SAE reconstructs it
    with few active features (L1 shrinkage costs a little reconstruction for the ReLU SAE)."""
    from circuitctl.sae.train import TrainSettings, fit_saes, measure

    x = sparse_data(d=16, atoms=32, active=2)
    train, held_out = x[:2500], x[2500:]
    k = 2 if architecture == "topk" else None
    settings = TrainSettings(d_sae=32, architecture=architecture, l1=1.0, k=k, steps=400, batch_size=256, lr=1e-2)
    (sae, loss), = fit_saes([train], settings, [SaeInfo()])
    before = measure(SparseAutoencoder(16, 32, architecture, k=k), held_out)  # all-zero weights
    after = measure(sae, held_out)
    assert after["explained_variance"] > 0.85 > before["explained_variance"]
    if architecture == "topk":
        assert after["l0"] <= 2.0 + 1e-6 and after["explained_variance"] > 0.9
    else:
        assert after["l0"] < 6
    # decoder rows are unit-norm on the training scale: on the raw scale they share one norm
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4)


def test_batched_training_is_training_each_sae_alone():
    from circuitctl.sae.train import TrainSettings, fit_saes

    x1, x2 = sparse_data(seed=1), 3 * sparse_data(seed=2)
    settings = TrainSettings(d_sae=16, steps=30, batch_size=64, lr=1e-2)
    (alone, _), = fit_saes([x1], settings, [SaeInfo()])
    (together, _), _ = fit_saes([x1, x2], settings, [SaeInfo(), SaeInfo()])
    for name, param in alone.named_parameters():
        assert torch.allclose(param, getattr(together, name), atol=1e-5), name


def test_train_saes_reports_reconstruction_sparsity_and_loss_recovered():
    from circuitctl.models.sae_sites import SiteRunner, hook_name
    from circuitctl.sae.tokens import random_tokens
    from circuitctl.sae.train import TrainSettings, train_saes

    model = random_model(0)
    model.requires_grad_(False)
    sites = [parse_site("mlp0"), parse_site("resid1")]
    runner = SiteRunner(model, sites)
    train, held_out = random_tokens(model.cfg.d_vocab, 200, 8, seed=0).split(0.2)
    settings = TrainSettings(d_sae=32, architecture="topk", k=4, steps=200, batch_size=128, lr=3e-3)
    results = train_saes(runner, train, held_out, settings, {s: hook_name(s) for s in sites}, "random")
    for site, sae, m in results:
        assert m.eval_tokens == 40 * 8 and m.train_tokens == 160 * 8
        assert m.l0 == pytest.approx(4.0) and 0.7 < m.explained_variance <= 1.0
        assert m.ce_zero_ablation != pytest.approx(m.ce_clean, abs=1e-3)  # the site matters
        assert m.loss_recovered == pytest.approx((m.ce_zero_ablation - m.ce_with_sae) / (m.ce_zero_ablation - m.ce_clean))
        assert abs(m.ce_with_sae - m.ce_clean) < abs(m.ce_zero_ablation - m.ce_clean)
        assert sae.info.hook_name == hook_name(site) and sae.info.extra["training"]["k"] == 4
    assert results[0][2].ce_clean == results[1][2].ce_clean


# ----------------------------------------------------------------------------------------
# The train-sae config
# ----------------------------------------------------------------------------------------
def test_train_config_reports_every_problem_with_lines(tmp_path):
    from circuitctl.sae.config import load_train_config

    path = tmp_path / "bad.yaml"
    path.write_text(
        "model: {path: m}\n"
        "sites: [resid0, res1]\n"
        "architecture: topk\n"
        "tokens: {type: text}\n"
        "stepz: 3\n"
        "output: {dir: out}\n"
    )
    with pytest.raises(UsageError) as info:
        load_train_config(path)
    text = str(info.value)
    assert "3 problems" in text
    assert "sites (line 2): 'res1' is not a site" in text
    assert "stepz (line 5): unknown key; did you mean 'steps'?" in text
    assert "tokens (line 4): tokens.type 'text' needs tokens.path" in text
    path.write_text("model: {path: m}\nsites: [resid0]\narchitecture: topk\noutput: {dir: out}\n")
    with pytest.raises(UsageError, match="architecture 'topk' needs k"):  # checked once the fields are valid
        load_train_config(path)
    good = tmp_path / "good.yaml"
    good.write_text("model: {path: m}\nsites: all\narchitecture: topk\nk: 4\noutput: {dir: out}\n")
    config = load_train_config(good, ["steps=7", "tokens.type=random"])
    assert (config.steps, config.k, config.sites, config.tokens.type) == (7, 4, "all", "random")
    with pytest.raises(UsageError, match="l1 is for architecture 'relu'"):
        load_train_config(good, ["l1=0.5"])


def test_shipped_train_sae_configs_are_valid():
    from pathlib import Path

    from circuitctl.sae.config import load_train_config

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("train-sae-*.yaml"))
    assert configs
    for path in configs:
        config = load_train_config(path)
        assert config.output.dir and config.steps >= 1, path
