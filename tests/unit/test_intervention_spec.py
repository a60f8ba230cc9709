"""The --ablate grammar, the spurious answer sets of a task, and the intervention's markdown (no model)."""

from __future__ import annotations

import pytest

from circuitctl.errors import UsageError
from circuitctl.interventions.spec import parse_spec, unit_kind
from circuitctl.tasks.records import pair_from_record


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "circuit.json").write_text("{}")
    return tmp_path / "runs" / "x"


@pytest.mark.parametrize(
    "names, kind",
    [
        ("a9.h9,a10.h0", "node"), ("m3,input", "node"), ("m3.n120", "neuron"), ("m0.n3,m0.n7", "neuron"),
        ("resid2/f345", "feature"), ("mlp1/err,embed/f0", "feature"), ("input->a0.h0<v>,a0.h0->logits", "edge"),
    ],
)
def test_names_of_one_kind(names, kind):
    spec = parse_spec(names)
    assert spec.run is None and spec.kind == kind and spec.names == tuple(names.split(","))


def test_run_directories_and_their_options(run_dir):
    assert parse_spec("runs/x").run.name == "x" and parse_spec("runs/x").top is None
    spec = parse_spec("runs/x:top=20")
    assert (spec.top, spec.by, spec.group) == (20, "score", None)
    spec = parse_spec("runs/sfc".replace("sfc", "x") + ":top=10:by=spurious")
    assert (spec.top, spec.by) == (10, "spurious")
    assert parse_spec("runs/x:group=g1").group == "g1"
    assert parse_spec("runs/x/circuit.json:top=3").run_dir.name == "x"


@pytest.mark.parametrize(
    "text, part",
    [
        ("", "empty"),
        ("runs/missing", "'runs/missing' does not exist"),
        ("a1.h0,m0.n3", "mixes heads/MLPs (a1.h0) and neurons (m0.n3)"),
        ("a1.h0,,a1.h2", "empty name"),
        ("a1.h0,bogus", "'bogus' is not a unit name"),
        ("a1.h0,a1.h0", "'a1.h0' is listed twice"),
        ("logits", "'logits' is the model's output"),
        ("a1.h0@end", "per-position unit"),
        ("a1.h0:top=3", "apply to a run directory"),
        ("runs/x:topp=3", "unknown option 'topp' in 'runs/x:topp=3'; did you mean 'top'?"),
        ("runs/x:top=0", "'top=0': N must be a positive integer"),
        ("runs/x:top=ten", "'top=ten'"),
        ("runs/x:top=3:top=4", "option 'top' is given twice"),
        ("runs/x:by=spurious", "add :top=N"),
        ("runs/x:top=3:by=spuriuos", "did you mean 'spurious'?"),
        ("runs/x:top=3:group=g1", "either top=N or group=ID"),
        ("runs/x:top", "'top' in 'runs/x:top' is not an option"),
    ],
)
def test_bad_specs_name_the_bad_part(run_dir, text, part):
    with pytest.raises(UsageError) as error:
        parse_spec(text)
    assert part in str(error.value)
    assert str(error.value).startswith("--ablate")


def test_unit_kinds_follow_the_naming_grammar():
    assert [unit_kind(n) for n in ("a0.h1", "m2", "input", "m2.n4", "attn0/f3", "resid1/err", "a0.h1->m2", "logits", "a0.h1<q>", "x")] == [
        "node", "node", "node", "neuron", "feature", "feature", "edge", None, None, None
    ]


def test_a_pair_may_name_spurious_answers():
    pair = pair_from_record(
        {"clean": "a b", "corrupt": "c d", "answers": [" x"], "wrong_answers": [" y"], "spurious_answers": " he", "spurious_wrong_answers": [" she"]},
        "p",
    )
    assert pair.spurious_answers == (" he",) and pair.spurious_wrong_answers == (" she",)
    assert pair_from_record({"clean": "a", "corrupt": "b", "answers": [1]}, "p").spurious_answers == ()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"spurious_wrong_answers": [" she"]}, "'spurious_wrong_answers' is given without 'spurious_answers'"),
        ({"spurious_answers": []}, "'spurious_answers' must be a non-empty list"),
        ({"spurious_answers": [True]}, "'spurious_answers' contains True"),
        ({"spurious": [" he"]}, "unknown field(s) spurious"),
    ],
)
def test_bad_spurious_answers_are_refused_naming_the_field(extra, message):
    with pytest.raises(UsageError, match="task.jsonl line 3") as error:
        pair_from_record({"clean": "a", "corrupt": "b", "answers": [" x"], **extra}, "task.jsonl line 3")
    assert message in str(error.value)


def test_the_markdown_table_escapes_names():
    from circuitctl.interventions.report import markdown

    task = {"metric": "logit_diff", "metric_before": 1.0, "metric_after": 0.0, "faithfulness": None, "accuracy_before": 1.0,
            "accuracy_after": 0.5, "accuracy_rule": "logit_diff > 0", "top1_accuracy_before": 1.0, "top1_accuracy_after": 0.25}
    record = {"spec": "runs/a|b", "mode": "remove", "rule": "r", "ablation": {"type": "zero"}, "ablated": ["a0.h0->a1.h0<v>"],
              "n_ablated": 1, "n_total": 9, "unit": "edges", "tasks": {"my|task<script>": task}}
    text = markdown(record)
    assert "my\\|task&lt;script&gt;" in text and "<script>" not in text and "runs/a\\|b" in text
    assert "| undefined |" in text and "a0.h0->a1.h0<v>" not in text and "a0\\.h0\\-&gt;a1\\.h0&lt;v&gt;" in text
