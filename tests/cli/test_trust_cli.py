"""The trust commands from the command line: per-example faithfulness in `evaluate faithfulness`,
`evaluate stability` (files, no silent overwrite, resume, seeds) and `compare` (any circuit file,
refusals, faithfulness computed where missing, escaped markdown)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from circuitctl.cli.app import main
from circuitctl.io.escape import markdown_text

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "v1"


def cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def golden(name: str, root: Path) -> Path:
    run = root / name
    shutil.copytree(GOLDEN / name, run)
    return run


# ----------------------------------------------------------------------------------------------
# evaluate faithfulness: per-example values and confidence intervals
# ----------------------------------------------------------------------------------------------
def test_faithfulness_reports_per_example_values_and_intervals(tmp_path, capsys):
    run = golden("node", tmp_path)
    code, out = cli(["evaluate", "faithfulness", run, "--out", tmp_path / "report", "--bootstrap", "200"], capsys)
    assert code == 0, out
    report = json.loads((tmp_path / "report" / "faithfulness.json").read_text())
    per, ci = report["per_example"], report["confidence"]
    assert set(per["quantiles"]) == {"5", "25", "50", "75", "95"} and per["n_examples"] == 24
    q = [per["quantiles"][k] for k in ("5", "25", "50", "75", "95")]
    assert q == sorted(q)
    assert len(per["worst"]) == 5 and per["worst"][0]["f"] == pytest.approx(q[0], abs=1.0)
    assert all("tokens" in row for row in per["worst"])  # the planted model has no tokenizer: token ids
    assert [row["f"] for row in per["worst"]] == sorted(row["f"] for row in per["worst"])
    assert per["ranking"]["criterion"].startswith("logit_diff > 0") and 0.0 <= per["ranking"]["fraction"] <= 1.0
    assert ci["n_resamples"] == 200 and ci["faithfulness"][0] <= report["faithfulness"] <= ci["faithfulness"][1]
    assert ci["cpr"][0] <= ci["cpr"][1] and ci["cmd"][0] <= ci["cmd"][1]
    assert "per-example f: 5/25/50/75/95 %" in out and "lowest per-example f" in out and "95 % CI (200 resamples)" in out


def test_kl_ranks_the_answer_by_the_logit_difference_of_the_same_circuit(tmp_path, capsys):
    run = golden("acdc", tmp_path)
    counts = {}
    for metric in ("logit_diff", "kl"):
        code, out = cli(["evaluate", "faithfulness", run, f"metric={metric}", "--out", tmp_path / metric, "--bootstrap", "0"], capsys)
        assert code == 0, out
        report = json.loads((tmp_path / metric / "faithfulness.json").read_text())
        ranking = report["per_example"]["ranking"]
        counts[metric] = (ranking["n_model_right"], ranking["n_circuit_right"], ranking["n_both_right"])
        assert report["confidence"] is None
    assert "kl ranks no answer" in ranking["criterion"]
    assert counts["kl"] == counts["logit_diff"]


def test_an_undefined_f_is_never_a_number(tmp_path):
    """A metric that no ablation moves (constant 0): m(full) = m(empty) exactly, so f, every
    per-example f and every interval are undefined: null in the report, 'undefined' in the table."""
    import torch
    from helpers import planted_context
    from rich.console import Console

    from circuitctl.circuits.edges import EdgeSpace
    from circuitctl.circuits.evaluator import CircuitEvaluator
    from circuitctl.cli.evaluate import per_example_rows, report_table
    from circuitctl.config.load import load_config
    from circuitctl.metrics.metrics import Metric
    from circuitctl.report import faithfulness_report

    _, context = planted_context("layernorm_mlp", n_pairs=8)
    flat = Metric("flat", lambda logits, batch, reference=None: torch.zeros(logits.shape[0], device=logits.device), -1.0, False, "0")
    space = EdgeSpace(context.graph)
    evaluator = CircuitEvaluator(space, context.adapter, context.data, flat, context.ablation, 4)
    scores = torch.rand(space.mask.shape, generator=torch.Generator().manual_seed(0)) * space.mask
    circuit = scores > 0.5
    config = load_config(ROOT / PLANTED[0], PLANTED[1:])
    report = faithfulness_report(tmp_path / "circuit.json", config, evaluator, scores, circuit, n_resamples=50)
    assert report.metric_full == report.metric_empty == 0.0
    assert report.faithfulness is None and report.completeness is None and report.cpr is None
    per = report.per_example
    assert per["n_undefined"] == 8 and per["quantiles"] is None and per["worst"] == []
    assert "metric flat ranks no answer" in per["ranking"]["criterion"]  # the ranking falls back on logit_diff
    assert report.confidence["faithfulness"] is None and report.confidence["cpr"] is None
    console = Console(record=True, width=200)
    console.print(report_table(report, []))
    text = console.export_text()
    row = text.split("faithfulness f(C)")[1].splitlines()[0]
    assert "undefined" in row and "0.0" not in row
    assert ("95 % CI (50 resamples): f / completeness", "n/a / n/a") in per_example_rows(report)


# ----------------------------------------------------------------------------------------------
# evaluate stability
# ----------------------------------------------------------------------------------------------
PLANTED = ["configs/planted-layernorm-mlp-eap.yaml", "selection.top_n=4", "model.device=cpu"]


def test_stability_writes_its_files_and_never_overwrites_them(tmp_path, capsys):
    out_dir = tmp_path / "stab"
    code, out = cli(["evaluate", "stability", ROOT / PLANTED[0], *PLANTED[1:], "--bootstrap", "5", "--out", out_dir], capsys)
    assert code == 0, out
    record = json.loads((out_dir / "stability.json").read_text())
    assert record["n_resamples"] == 5 and record["jaccard"]["mean"] == 1.0 and len(record["core"]) == 4
    for key in ("frequency", "score_mean", "score_ci"):
        assert key in record["edges"]["a1.h0->logits"]
    assert "Jaccard between resamples" in out and "core (in >= 90 %)" in out
    before = (out_dir / "stability.json").read_bytes()
    code, out = cli(["evaluate", "stability", ROOT / PLANTED[0], *PLANTED[1:], "--bootstrap", "5", "--out", out_dir], capsys)
    assert code == 2 and "already exists" in out and "--force" in out
    assert (out_dir / "stability.json").read_bytes() == before
    code, out = cli(["evaluate", "stability", ROOT / PLANTED[0], *PLANTED[1:], "--bootstrap", "5", "--out", out_dir, "--force"], capsys)
    assert code == 0, out


@pytest.mark.parametrize("args,message", [
    (["--bootstrap", "1"], "at least 2 resamples"),
    (["--seeds", "0"], "at least 1 seed"),
    (["--resume", "/nonexistent/stability"], "no stability checkpoint"),
    (["method.tau=[0.01,0.02]", "method.name=acdc"], "one circuit per run"),
])
def test_stability_refuses_bad_input_clearly(args, message, tmp_path, capsys):
    out_dir = [] if "--resume" in args else ["--out", tmp_path / "s"]
    code, out = cli(["evaluate", "stability", ROOT / PLANTED[0], *PLANTED[1:], *out_dir, *args], capsys)
    assert code == 2 and message in out, out
    assert "Traceback" not in out


def test_an_interrupted_stability_analysis_resumes_to_the_same_result(tmp_path, monkeypatch):
    """Reruns (exact patching) stopped by Ctrl-C after 3 of 6 resamples: the progress is saved, and
    --resume runs only the rest and ends with the record of an uninterrupted analysis."""
    from circuitctl.analysis.stability import stability
    from circuitctl.config.load import load_config
    from circuitctl.errors import InterruptedRun
    from circuitctl.methods import base

    config = load_config(ROOT / "configs" / "planted-layernorm-mlp-exact.yaml", ["model.device=cpu", "task.n_pairs=12"])
    whole = stability(config, ROOT / "configs", tmp_path / "whole", n_resamples=6).record
    calls = {"n": 0, "stop": 5}  # call 1: all the data; calls 2-4: resamples 0-2; call 5: stopped
    original = base.run_method

    def counted(context, settings):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return original(context, settings)

    monkeypatch.setattr(base, "run_method", counted)
    with pytest.raises(InterruptedRun, match="--resume"):
        stability(config, ROOT / "configs", tmp_path / "cut", n_resamples=6)
    assert not (tmp_path / "cut" / "stability.json").exists()
    calls.update(n=0, stop=None)
    resumed = stability(config, ROOT / "configs", tmp_path / "cut", n_resamples=6, resume=True).record
    assert calls["n"] == 3  # resamples 3-5 only: neither all the data nor the finished ones again
    for key in ("jaccard", "runs", "core", "contingent", "edges", "faithfulness", "spearman_vs_full", "spearman_abs_vs_full"):
        assert resumed[key] == whole[key], key
    assert not (tmp_path / "cut" / "checkpoint").exists()


def test_an_interrupted_eap_ig_run_of_the_stability_analysis_resumes(tmp_path, monkeypatch):
    """The shortcut's one EAP-IG run over all the examples, stopped by Ctrl-C after 2 of 6 batches,
    resumes from its checkpoint (its per-example rows) to the record of an uninterrupted analysis."""
    from circuitctl.analysis.stability import stability
    from circuitctl.config.load import load_config
    from circuitctl.errors import InterruptedRun
    from circuitctl.methods import eap

    config = load_config(ROOT / PLANTED[0], [*PLANTED[1:], "method.name=eap_ig", "method.batch_size=4"])
    whole = stability(config, ROOT / "configs", tmp_path / "whole", n_resamples=5).record
    calls = {"n": 0, "stop": 3}
    original = eap.attribution_block

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(eap, "attribution_block", counted)
    with pytest.raises(InterruptedRun, match="evaluate stability CONFIG --resume"):
        stability(config, ROOT / "configs", tmp_path / "cut", n_resamples=5)
    calls.update(n=0, stop=None)
    resumed = stability(config, ROOT / "configs", tmp_path / "cut", n_resamples=5, resume=True).record
    assert calls["n"] == 4  # batches 3-6 only
    assert resumed["how"].startswith("per-example")
    for key in ("jaccard", "runs", "core", "edges", "faithfulness"):
        assert resumed[key] == whole[key], key


STOCHASTIC_PLUGIN = {
    "noisy_plugin/__init__.py": '''
        from typing import Literal
        from circuitctl.config.methods import MethodInfo, MethodSettings

        class NoisySettings(MethodSettings):
            name: Literal["noisy_scores"] = "noisy_scores"

        NOISY = MethodInfo("noisy_scores", NoisySettings, "noisy_plugin.impl:noisy", "seeded random scores", stochastic=True)
    ''',
    "noisy_plugin/impl.py": '''
        import torch
        from circuitctl.methods.base import DiscoveryResult

        def noisy(context, settings):
            graph = context.graph
            scores = torch.rand(graph.n_upstream, graph.n_downstream, generator=torch.Generator().manual_seed(context.seed))
            return DiscoveryResult(scores=scores * graph.edge_mask)
    ''',
    "noisy_plugin-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: noisy-plugin\nVersion: 0.1\n",
    "noisy_plugin-0.1.dist-info/entry_points.txt": "[circuitctl.methods]\nnoisy_scores = noisy_plugin:NOISY\n",
}


@pytest.mark.slow
def test_stochastic_methods_run_every_seed_and_deterministic_ones_one(tmp_path):
    for name, text in STOCHASTIC_PLUGIN.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def run(*args):
        command = [sys.executable, "-c", "from circuitctl.cli.app import main; main()", "evaluate", "stability", str(ROOT / PLANTED[0]), *PLANTED[1:], *args]
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    result = run("method.name=noisy_scores", "selection.prune=false", "--bootstrap", "2", "--seeds", "3", "--out", "noisy")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "noisy" / "stability.json").read_text())
    assert record["n_runs"] == 6 and [(r["resample"], r["seed"]) for r in record["runs"]] == [(b, s) for b in range(2) for s in range(3)]
    assert record["jaccard"]["min"] < 1.0  # other seeds, other random circuits
    result = run("--bootstrap", "2", "--seeds", "3", "--out", "eap")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "eap" / "stability.json").read_text())["n_runs"] == 2
    assert "does not depend on the seed" in result.stdout


# ----------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------
def test_compare_reads_every_circuit_file_and_escapes_its_markdown(tmp_path, capsys):
    run = golden("demo", tmp_path)
    code, out = cli(["compare", run, run / "circuit.mib.json", "--out", tmp_path / "cmp"], capsys)
    assert code == 0, out
    record = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    (pair,) = record["pairs"]
    assert pair["jaccard"] == 1.0 and pair["spearman"] == pytest.approx(1.0)
    assert {"a", "b", "jaccard", "spearman", "only_a", "only_b"} <= set(pair)
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    code, out = cli(["compare", run, run, "--out", tmp_path / "cmp"], capsys)
    assert code == 2 and "already exists" in out


def test_compare_lists_units_only_one_run_has_with_the_others_scores(tmp_path, capsys):
    demo = golden("demo", tmp_path)
    other = tmp_path / "other"
    shutil.copytree(demo, other)
    record = json.loads((other / "circuit.json").read_text())
    first = next(name for name, edge in record["edges"].items() if edge["in_graph"])
    record["edges"][first]["in_graph"] = False
    (other / "circuit.json").write_text(json.dumps(record))
    code, out = cli(["compare", demo, other, "--out", tmp_path / "cmp"], capsys)
    assert code == 0, out
    (pair,) = json.loads((tmp_path / "cmp" / "compare.json").read_text())["pairs"]
    assert pair["n_only_a"] == 1 and pair["n_only_b"] == 0 and pair["jaccard"] == pytest.approx(38 / 39)
    assert pair["only_a"] == [{"unit": first, "score_a": record["edges"][first]["score"], "score_b": record["edges"][first]["score"]}]
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert markdown_text(first) in markdown and "&gt;" in markdown_text(first)  # edge names as text: a0\.h0\-&gt;...
    assert "<" not in markdown and ">" not in markdown


@pytest.mark.parametrize("a,b,message", [
    ("demo", "node", "different models"),  # toy GPT vs planted model
    ("node", "acdc", "different kinds of circuit"),  # same model: node vs edge circuit
])
def test_compare_refuses_runs_that_are_not_comparable(a, b, message, tmp_path, capsys):
    code, out = cli(["compare", golden(a, tmp_path), golden(b, tmp_path), "--out", tmp_path / "cmp"], capsys)
    assert code == 2 and message in out, out
    assert not (tmp_path / "cmp").exists()


def test_compare_needs_two_runs(tmp_path, capsys):
    code, out = cli(["compare", golden("demo", tmp_path), "--out", tmp_path / "cmp"], capsys)
    assert code == 2 and "at least two runs" in out


def test_compare_computes_missing_faithfulness_without_touching_the_runs(tmp_path, capsys):
    acdc, cdt = golden("acdc", tmp_path), golden("cdt", tmp_path)
    (cdt / "faithfulness.json").unlink()
    code, out = cli(["compare", acdc, cdt, "--out", tmp_path / "cmp"], capsys)
    assert code == 0, out
    assert not (cdt / "faithfulness.json").exists() and (tmp_path / "cmp" / "cdt" / "faithfulness.json").is_file()
    runs = json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]
    computed = json.loads((tmp_path / "cmp" / "cdt" / "faithfulness.json").read_text())
    assert runs[1]["faithfulness"] == computed["faithfulness"] and runs[1]["cpr"] == computed["cpr"]
    assert runs[0]["faithfulness"] == json.loads((acdc / "faithfulness.json").read_text())["faithfulness"]
