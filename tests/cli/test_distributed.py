"""Data-parallel runs: two gloo processes on CPU give the single-process circuit.

`torchrun --nproc-per-node 2 -m circuitctl discover CONFIG` splits the examples across the
ranks and all-reduces score sums and metric totals; only rank 0 writes the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from testkit import torchrun

from circuitctl.testing.planted import build, export

PLANTED = "layernorm_mlp"  # 24 pairs: ranks get 12 each, batches of 5 leave a short last batch


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    export(build(PLANTED), root / "model", root / "task")
    (root / "exact.yaml").write_text(
        "model: {path: model, device: cpu}\ntask: {path: task}\nmethod: {name: exact, batch_size: 5}\nselection: {top_n: 12}\n"
    )
    return root


def test_torchrun_discover_gives_the_single_process_circuit(world):
    from circuitctl.config.load import load_config
    from circuitctl.runner import discover

    result = torchrun(["-m", "circuitctl", "discover", "exact.yaml", "output.dir=two"], world)
    assert result.returncode == 0, result.stderr[-3000:]
    discover(load_config(world / "exact.yaml", [f"output.dir={world / 'one'}"]), world)
    one, two = (json.loads((world / d / "circuit.json").read_text()) for d in ("one", "two"))
    assert one["edges"].keys() == two["edges"].keys()
    for name, edge in one["edges"].items():
        assert two["edges"][name]["score"] == pytest.approx(edge["score"], abs=1e-5), name
        assert two["edges"][name]["in_graph"] == edge["in_graph"], name
    for key in ("metric_full", "metric_empty", "metric_circuit", "faithfulness"):
        assert two["results"][key] == pytest.approx(one["results"][key], abs=1e-6), key
    assert one["results"]["faithfulness"] > 0.9  # a real circuit, not an empty agreement
    # only rank 0 wrote: the run directory holds one set of files and nothing else
    assert sorted(p.name for p in (world / "two").iterdir()) == sorted(p.name for p in (world / "one").iterdir())


DRIVER = '''
import json, sys
from pathlib import Path
import torch
from circuitctl import distributed
distributed.init_from_env("cpu")
sys.path.insert(0, sys.argv[2])
from helpers import planted_context
from circuitctl.config.methods import AcdcSettings, EapSettings, ExactSettings
from circuitctl.methods import acdc, eap, exact

out = {"rank": distributed.rank(), "world_size": distributed.world_size()}
_, ctx = planted_context("layernorm_mlp", ablation="mean", n_pairs=9)  # odd: shards of 4 and 5
out["eap_mean"] = eap.discover(ctx, EapSettings(batch_size=4)).scores.tolist()
out["exact_mean"] = exact.discover(ctx, ExactSettings(batch_size=4)).scores.tolist()
_, ctx = planted_context("layernorm_mlp", metric="kl", n_pairs=9)
found = acdc.discover(ctx, AcdcSettings(tau=0.05, batch_size=4, evaluator="layerwise"))
out["acdc"] = [found.scores.tolist(), found.membership.tolist()]
found = acdc.discover(ctx, AcdcSettings(tau=0.05, batch_size=4, evaluator="incremental"))
out["acdc_incremental"] = [found.scores.tolist(), found.membership.tolist()]
Path(sys.argv[1], f"rank{distributed.rank()}.json").write_text(json.dumps(out))
'''


def test_ranks_agree_with_one_process_for_eap_exact_and_acdc(tmp_path):
    """Mean ablation (its means are all-reduced too), uneven shards, and ACDC's sequential
    decisions, which must be the same on every rank (both evaluators all-reduce their metric
    totals over the ranks' shards)."""
    from helpers import planted_context

    from circuitctl.config.methods import AcdcSettings, EapSettings, ExactSettings
    from circuitctl.methods import acdc, eap, exact

    (tmp_path / "driver.py").write_text(DRIVER)
    result = torchrun(["driver.py", str(tmp_path), str(Path(__file__).resolve().parents[1])], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    _, ctx = planted_context(PLANTED, ablation="mean", n_pairs=9)
    expected = {
        "eap_mean": eap.discover(ctx, EapSettings(batch_size=4)).scores,
        "exact_mean": exact.discover(ctx, ExactSettings(batch_size=4)).scores,
    }
    _, ctx = planted_context(PLANTED, metric="kl", n_pairs=9)
    found = acdc.discover(ctx, AcdcSettings(tau=0.05, batch_size=4, evaluator="layerwise"))
    for r in ranks:
        for key in ("eap_mean", "exact_mean"):
            assert torch.allclose(torch.tensor(r[key]), expected[key], atol=1e-5), (r["rank"], key)
            assert float(expected[key].abs().max()) > 0.1
        for key in ("acdc", "acdc_incremental"):
            scores, membership = r[key]
            assert torch.equal(torch.tensor(membership), found.membership), (r["rank"], key)
            assert torch.allclose(torch.tensor(scores), found.scores, atol=1e-5), (r["rank"], key)
    assert 0 < int(found.membership.sum()) < int(ctx.graph.n_edges)


def test_shards_cover_every_example_once(monkeypatch):
    from circuitctl import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    covered = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        covered += list(range(*distributed.shard_range(10)))
    assert covered == list(range(10))
    monkeypatch.setattr(distributed, "rank", lambda: 2)
    assert distributed.shard_range(2) == (1, 2)  # fewer examples than ranks: some shares are empty
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert distributed.shard_range(2) == (0, 0)
