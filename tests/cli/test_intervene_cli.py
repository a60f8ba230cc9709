"""`circuitctl intervene` through the command line, on the shipped planted models and runs of them.

Ground truth (planted-copy-first: a0.h0 copies the first token; a0.h1 copies the second, a second
task that uses another head): keeping a discovered circuit gives the f that `evaluate
faithfulness` gives; removing it destroys the task (f = 0) and leaves the other task intact
(f = 1); an exported zero-ablation checkpoint loads as a local model and computes the edited
metric; edits that cannot be baked stop with exit 2 and write nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from testkit import cli_exit_code, golden_copy, torchrun
import torch

from helpers import second_token_records

CONFIG = "model: {path: models/planted-copy-first, device: cpu}\ntask: {name: planted-copy-first}\nmethod: {name: exact, batch_size: 8}\nselection: {top_n: %d}\n"


cli = cli_exit_code  # circuitctl ARGS in this process -> its exit code


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A planted run (exact patching, the 2 planted edges) with its faithfulness report, and the second task."""
    root = tmp_path_factory.mktemp("intervene")
    (root / "config.yaml").write_text(CONFIG % 2)
    assert cli(["discover", str(root / "config.yaml"), f"output.dir={root / 'run'}"]) == 0
    assert cli(["evaluate", "faithfulness", str(root / "run")]) == 0
    jsonl(root / "second.jsonl", second_token_records())
    return root


def record(out: Path) -> dict:
    return json.loads((out / "intervention.json").read_text())


def test_keeping_a_discovered_circuit_gives_the_faithfulness_evaluate_reports(world):
    out = world / "keep"
    assert cli(["intervene", str(world / "run" / "config.yaml"), "--ablate", str(world / "run"), "--mode", "keep", "--out", str(out)]) == 0
    found, evaluated = record(out), json.loads((world / "run" / "faithfulness.json").read_text())
    task = found["tasks"]["planted-copy-first"]
    assert task["faithfulness"] >= 0.95
    assert task["faithfulness"] == pytest.approx(evaluated["faithfulness"], abs=1e-9)
    assert (task["metric_before"], task["metric_empty"]) == pytest.approx((evaluated["metric_full"], evaluated["metric_empty"]), abs=1e-9)
    assert found["kind"] == "edge" and found["mode"] == "keep" and sorted(found["selected"]) == ["a0.h0->logits", "input->a0.h0<v>"]
    assert found["n_ablated"] == found["n_total"] - 2 and len(found["ablated"]) == found["n_ablated"]


def test_removing_a_discovered_circuit_destroys_its_task_and_leaves_another_head_s_task(world):
    out = world / "remove"
    code = cli(["intervene", str(world / "run" / "config.yaml"), "--ablate", str(world / "run"), "--tasks", str(world / "second.jsonl"), "--out", str(out)])
    assert code == 0
    found = record(out)
    assert set(found) >= {"ablated", "mode", "ablation", "tasks"}
    assert sorted(found["ablated"]) == ["a0.h0->logits", "input->a0.h0<v>"] and found["ablation"]["type"] == "resample"
    first, second = found["tasks"]["planted-copy-first"], found["tasks"][str(world / "second.jsonl")]
    for task in (first, second):
        assert {"metric_before", "metric_after", "accuracy_before", "accuracy_after"} <= set(task)
    assert first["faithfulness"] == pytest.approx(0.0, abs=1e-6) and (first["accuracy_before"], first["accuracy_after"]) == (1.0, 0.0)
    assert second["faithfulness"] == pytest.approx(1.0, abs=1e-6) and second["accuracy_after"] == 1.0
    assert second["metric_after"] == pytest.approx(second["metric_before"], abs=1e-6)
    table = (out / "intervention.md").read_text()
    assert "| planted\\-copy\\-first | logit\\_diff | +5.000 | -5.000 | 0.000 | 1.000 | 0.000 |" in table
    assert (out / "intervention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # never overwritten without --force
    before = (out / "intervention.json").read_text()
    assert cli(["intervene", str(world / "run" / "config.yaml"), "--ablate", "a0.h1", "--out", str(out)]) == 2
    assert (out / "intervention.json").read_text() == before
    assert cli(["intervene", str(world / "run" / "config.yaml"), "--ablate", "a0.h1", "--out", str(out), "--force"]) == 0
    assert record(out)["selected"] == ["a0.h1"]


def test_an_exported_zero_ablation_checkpoint_loads_and_computes_the_edited_metric(world):
    from circuitctl.models.adapter import load_model
    from circuitctl.tasks.data import tokenize_pairs
    from circuitctl.tasks.records import read_pairs_jsonl
    from circuitctl.metrics.metrics import METRICS
    from circuitctl.resources import SHIPPED_TASKS

    out, model_dir = world / "export-run", world / "edited-model"
    args = ["intervene", str(world / "config.yaml"), "ablation=zero", "--ablate", "a0.h0,a0.h2", "--export", str(model_dir), "--out", str(out)]
    assert cli(args) == 0
    assert {p.name for p in model_dir.iterdir()} == {"config.json", "model.safetensors", "edit.json"}
    assert json.loads((model_dir / "edit.json").read_text())["tensors"] == ["blocks.0.attn.W_O"]
    model = load_model(None, model_dir, "cpu")
    data = tokenize_pairs(read_pairs_jsonl(SHIPPED_TASKS / "planted-copy-first" / "pairs.jsonl"), None, 12, None, "t")
    with torch.no_grad():
        logits = model(data.clean)[torch.arange(data.n), data.answer_positions]
    after = record(out)["tasks"]["planted-copy-first"]["metric_after"]
    assert float(METRICS.get("logit_diff")(logits, data).double().mean()) == pytest.approx(after, abs=1e-6)
    assert after == pytest.approx(0.0, abs=1e-6)  # nothing writes the first token any more
    # the checkpoint is a model circuitctl runs: keeping a0.h1 in it changes nothing on the second task
    (world / "edited.yaml").write_text(f"model: {{path: {model_dir}, device: cpu}}\ntask: {{path: {world / 'second.jsonl'}}}\nmethod: exact\nablation: zero\n")
    assert cli(["intervene", str(world / "edited.yaml"), "--ablate", "a0.h0", "--out", str(world / "on-edited")]) == 0
    assert record(world / "on-edited")["tasks"]["second"]["faithfulness"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "overrides, ablate, message",
    [
        ([], "a0.h0", "resample ablation replaces activations"),  # the config's ablation is resample
        (["ablation=zero"], "RUN", "edges (one input of a node, not its output) cannot be written"),
        (["ablation=mean"], "a0.h0", "per-position mean ablation"),
    ],
)
def test_edits_that_cannot_be_baked_stop_before_anything_is_written(world, capsys, overrides, ablate, message):
    out, model_dir = world / "refused-out", world / "refused-model"
    ablate = str(world / "run") if ablate == "RUN" else ablate
    assert cli(["intervene", str(world / "config.yaml"), *overrides, "--ablate", ablate, "--export", str(model_dir), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not model_dir.exists()


def test_a_group_of_the_run_s_explanation_is_ablated(world):
    """discover explains its circuit: explanation.json's group g1 is the planted head a0.h0."""
    groups = json.loads((world / "run" / "explanation.json").read_text())["groups"]
    assert [(g["id"], g["members"]) for g in groups] == [("g1", ["a0.h0"])]
    assert cli(["intervene", str(world / "config.yaml"), "--ablate", f"{world / 'run'}:group=g1", "--out", str(world / "group")]) == 0
    found = record(world / "group")
    assert found["kind"] == "node" and found["ablated"] == ["a0.h0"]
    assert found["tasks"]["planted-copy-first"]["faithfulness"] == pytest.approx(0.0, abs=1e-6)


def test_shift_ranks_the_run_s_units_by_the_spurious_answers_and_removes_them(world):
    """A task whose pairs name a spurious answer set (the second token, moved by a0.h1) beside the
    intended one (the first token, a0.h0): by=spurious picks a0.h1's edges; removing them takes the
    spurious behaviour away and leaves the intended one exactly as it was."""
    task = jsonl(world / "shift.jsonl", second_token_records(spurious=True))
    (world / "shift.yaml").write_text(f"model: {{path: models/planted-copy-first, device: cpu}}\ntask: {{path: {task}}}\nmethod: exact\nselection: {{top_n: 100}}\n")
    assert cli(["discover", str(world / "shift.yaml"), f"output.dir={world / 'shift-run'}"]) == 0
    out = world / "shift-out"
    assert cli(["intervene", str(world / "shift.yaml"), "--ablate", f"{world / 'shift-run'}:top=2:by=spurious", "--out", str(out)]) == 0
    found = record(out)
    assert sorted(found["selected"]) == ["a0.h1->logits", "input->a0.h1<v>"]
    importance = found["selection_details"]["spurious_importance"]
    assert importance["a0.h1->logits"] == pytest.approx(4.0) and importance["a0.h0->logits"] == pytest.approx(0.0, abs=1e-6)
    intended, spurious = found["tasks"]["shift"], found["tasks"]["shift (spurious answers)"]
    assert intended["faithfulness"] == pytest.approx(1.0, abs=1e-6) and intended["accuracy_after"] == 1.0
    assert spurious["accuracy_before"] == 1.0 and spurious["accuracy_after"] == 0.0
    assert spurious["metric_after"] == pytest.approx(-2.0, abs=1e-6)
    # by=spurious on a task without spurious answers: one clear error
    assert cli(["intervene", str(world / "config.yaml"), "--ablate", f"{world / 'run'}:top=1:by=spurious", "--out", str(world / "no-spurious")]) == 2


def test_sae_features_of_an_sfc_run_with_the_text_loss(world, tmp_path):
    run = _golden("sfc", tmp_path)
    tokens = jsonl(tmp_path / "tokens.jsonl", [[1, 9, 10, 11, 12, 13], [5, 8, 9, 10, 11, 12], [2, 13, 12, 11, 10, 9]])
    out = tmp_path / "out"
    assert cli(["intervene", str(run / "config.yaml"), "ablation=mean", "--ablate", f"{run}:top=4", "--text", str(tokens), "--out", str(out)]) == 0
    found = record(out)
    assert found["kind"] == "feature" and len(found["selected"]) == 4 and found["n_ablated"] == 4
    text = found["text"]
    assert text["n_sequences"] == 3 and text["n_predicted_tokens"] == 15 and text["ablation"].startswith("mean")
    assert text["loss_change"] == pytest.approx(text["loss_after"] - text["loss_before"])
    task = found["tasks"]["planted-mlp-neurons"]
    assert task["metric_after"] < task["metric_before"]  # the strongest features carry the task
    # features by name need the SAEs: the sfc config names them
    assert cli(["intervene", str(run / "config.yaml"), "--ablate", "mlp0/f3,resid0/f1", "--out", str(tmp_path / "named")]) == 0
    assert record(tmp_path / "named")["selected"] == ["mlp0/f3", "resid0/f1"]
    # SAE features cannot be baked into a checkpoint
    assert cli(["intervene", str(run / "config.yaml"), "ablation=zero", "--ablate", f"{run}:top=4", "--export", str(tmp_path / "m"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "m").exists()


_golden = golden_copy


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ablate", "a9.h9"], "'a9.h9': this model has no node 'a9.h9'"),
        (["--ablate", "a0.h0", "--mode", "drop"], "--mode: 'drop' is not a mode"),
        (["--ablate", "a0.h0", "--tasks", "no-such-task"], "no-such-task"),
        (["--ablate", "a0.h0", "--text", "missing.txt"], "--text: 'missing.txt' does not exist"),
        (["--ablate", "resid0/f1"], "SAE feature names need SAEs"),
        (["--ablate", "m0.n1"], "neuron circuits need a model with MLPs"),
        (["--ablate", "RUN:group=g9"], "no group 'g9' (groups: g1)"),
        (["--ablate", "BARE:group=g1"], "explanation.json, which does not exist (run `circuitctl explain"),
        (["--ablate", "a0.h0", "--text", "PLAIN"], "is text but the model has no tokenizer"),
        (["--ablate", "RUN", "--text", "TOKENS"], "--text: the loss on text is measured for SAE features"),
        (["ablation=mean", "--ablate", "input", "--text", "TOKENS"], "--text: mean ablation of the 'input' node cannot be written"),
        (["--ablate", "RUN:top=3"], None),  # works: the top 3 edges by |score|
        (["ablation=zero", "--ablate", "a0.h0", "--text", "TOKENS"], None),  # works: token ids on a model without a tokenizer
    ],
)
def test_bad_input_exits_2_with_one_message(world, capsys, args, message):
    (world / "plain.txt").write_text("some text\n")
    jsonl(world / "tokens.jsonl", [[1, 2, 3, 4], [5, 6, 7]])
    bare = world / "bare-run"  # a run directory without explanation.json
    bare.mkdir(exist_ok=True)
    for name in ("circuit.json", "config.yaml"):
        (bare / name).write_text((world / "run" / name).read_text())
    args = [a.replace("BARE", str(bare)).replace("RUN", str(world / "run")).replace("PLAIN", str(world / "plain.txt")).replace("TOKENS", str(world / "tokens.jsonl")) for a in args]
    code = cli(["intervene", str(world / "config.yaml"), *args, "--out", str(world / "bad" / str(abs(hash(tuple(args)))))])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0, err
        return
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.slow
def test_torchrun_gives_the_single_process_intervention(world):
    (world / "ranks.yaml").write_text(CONFIG.replace("batch_size: 8", "batch_size: 5") % 2)  # 24 pairs: shards of 12, a short last batch
    args = ["intervene", "ranks.yaml", "--ablate", "a0.h0,a0.h1", "--tasks", "second.jsonl"]
    result = torchrun(["-m", "circuitctl", *args, "--out", "two"], cwd=world)
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli([*args[:1], str(world / "ranks.yaml"), *args[2:4], "--tasks", str(world / "second.jsonl"), "--out", str(world / "one")]) == 0
    one, two = record(world / "one"), record(world / "two")
    assert len(one["tasks"]) == len(two["tasks"]) == 2
    for (name, a), b in zip(one["tasks"].items(), two["tasks"].values()):
        for key in ("metric_before", "metric_after", "metric_empty", "accuracy_before", "accuracy_after", "top1_accuracy_after"):
            assert b[key] == pytest.approx(a[key], abs=1e-9), (name, key)
    assert one["tasks"]["planted-copy-first"]["accuracy_after"] == 0.0  # a real effect, not an empty agreement
    assert sorted(p.name for p in (world / "two").iterdir()) == ["intervention.json", "intervention.md", "intervention.png"]


@pytest.mark.slow
def test_toy_gpt_ablating_the_s2_heads_breaks_ioi_and_leaves_induction_above_chance(tmp_path):
    """The README's table: the toy GPT's layer-1 S2-attending heads (a1.h0, a1.h1, a1.h3), zero-ablated."""
    out = tmp_path / "toy"
    assert cli(["intervene", "demo", "ablation=zero", "--ablate", "a1.h0,a1.h1,a1.h3", "--tasks", "toy-induction", "--out", str(out)]) == 0
    ioi, induction = record(out)["tasks"]["toy-ioi"], record(out)["tasks"]["toy-induction"]
    assert ioi["accuracy_before"] == 1.0 and ioi["accuracy_after"] < 0.6 and abs(ioi["faithfulness"]) < 0.05
    assert induction["accuracy_after"] == 1.0  # the answer still beats the corrupt prompt's token everywhere
    assert 0.4 < induction["faithfulness"] < 0.8 and induction["top1_accuracy_after"] < 0.9  # but induction is weakened


@pytest.mark.parametrize("name, kind, top", [("node", "node", ["a0.h0", "m0", "a1.h0"]), ("neuron", "neuron", ["m0.n0", "m0.n3", "m0.n7"]), ("acdc", "edge", None)])
def test_the_top_units_of_planted_runs_of_every_kind_carry_their_task(tmp_path, name, kind, top):
    """Version-1 runs (tests/golden/v1) on planted models: their 3 strongest units are the planted
    mechanism, so removing them destroys the task and keeping them alone keeps it."""
    run = _golden(name, tmp_path)
    assert cli(["intervene", str(run / "config.yaml"), "--ablate", f"{run}:top=3", "--out", str(tmp_path / "remove")]) == 0
    removed = record(tmp_path / "remove")
    assert removed["kind"] == kind and len(removed["selected"]) == 3 and (top is None or removed["selected"] == top)
    task = next(iter(removed["tasks"].values()))
    assert task["faithfulness"] == pytest.approx(0.0, abs=1e-6) and task["accuracy_after"] == 0.0


def test_a_per_position_circuit_is_refused_on_a_task_with_other_positions_before_anything_runs(tmp_path, capsys):
    run = _golden("pos_node", tmp_path)
    code = cli(["intervene", str(run / "config.yaml"), "--ablate", f"{run}:top=3", "--tasks", "toy-induction", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--tasks toy-induction: a per-position circuit applies to tasks with the same positions" in err
    assert not (tmp_path / "o").exists()
