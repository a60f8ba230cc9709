"""Task reading and tokenization: shipped tasks, generators with the real GPT-2 tokenizer, errors."""

from __future__ import annotations

import json

import pytest

from circuitctl.errors import UsageError
from circuitctl.resources import SHIPPED_TASKS
from circuitctl.tasks.catalog import copy_task, generator_names, shipped_task_names
from circuitctl.tasks.data import task_pairs, tokenize_pairs
from circuitctl.tasks.records import read_task


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from circuitctl.tasks.gpt2_tokenizer import load_offline_gpt2_tokenizer

    return load_offline_gpt2_tokenizer()


@pytest.mark.parametrize("name", ["ioi", "greater_than", "docstring", "induction", "gendered_pronoun", "subject_verb_agreement"])
def test_generator_tasks_tokenize_with_gpt2(name, gpt2_tokenizer):
    source = read_task(name, None, SHIPPED_TASKS)
    pairs = task_pairs(source, gpt2_tokenizer, 12, seed=0, options={})
    data = tokenize_pairs(pairs, gpt2_tokenizer, 50257, 50256, name)  # BOS prepended, as GPT-2 does
    assert data.n == 12
    assert (data.clean[:, 0] == 50256).all()
    assert (data.answers[:, 0] >= 0).all()
    for label, index in data.positions.items():
        assert ((index >= 0) & (index < data.lengths)).all(), label
    if name == "ioi":
        io = data.clean[range(12), data.positions["IO"]]
        assert (io == data.answers[:, 0]).all()  # the IO label points at the answer name


def test_every_shipped_token_id_task_reads_and_tokenizes():
    names = [n for n in shipped_task_names(SHIPPED_TASKS) if n.startswith("planted-")]
    assert len(names) >= 2
    for name in names:
        source = read_task(name, None, SHIPPED_TASKS)
        data = tokenize_pairs(source.pairs, None, 64, None, source.origin)
        assert data.n == len(source.pairs)


def _write_pairs(tmp_path, lines):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_errors_name_the_line(tmp_path):
    good = json.dumps({"clean": [1, 2], "corrupt": [3, 2], "answers": [1], "wrong_answers": [3]})
    with pytest.raises(UsageError, match="line 2: not valid JSON"):
        read_task(None, _write_pairs(tmp_path, [good, "{oops"]), SHIPPED_TASKS)
    bad_length = json.dumps({"clean": [1, 2], "corrupt": [3], "answers": [1]})
    source = read_task(None, _write_pairs(tmp_path, [good, bad_length]), SHIPPED_TASKS)
    with pytest.raises(UsageError, match="line 2: clean prompt is 2 tokens but corrupt is 1"):
        tokenize_pairs(source.pairs, None, 10, None, source.origin)
    out_of_vocab = json.dumps({"clean": [1, 99], "corrupt": [3, 2], "answers": [1]})
    source = read_task(None, _write_pairs(tmp_path, [out_of_vocab]), SHIPPED_TASKS)
    with pytest.raises(UsageError, match="line 1: 'clean' has token id 99 outside the vocabulary"):
        tokenize_pairs(source.pairs, None, 10, None, source.origin)


def test_multi_token_answers_are_rejected(tmp_path, gpt2_tokenizer):
    record = {"clean": "When Mary and John went", "corrupt": "When Alice and Bob went", "answers": [" Mary Jane"], "wrong_answers": [" John"]}
    source = read_task(None, _write_pairs(tmp_path, [json.dumps(record)]), SHIPPED_TASKS)
    with pytest.raises(UsageError, match="line 1: answer ' Mary Jane' is 2 tokens"):
        tokenize_pairs(source.pairs, gpt2_tokenizer, 50257, None, source.origin)


def test_unknown_task_suggests_a_close_name():
    with pytest.raises(UsageError, match="did you mean 'ioi'"):
        read_task("iio", None, SHIPPED_TASKS)


def test_copy_task_for_editing(tmp_path):
    files = copy_task("planted-copy-first", tmp_path / "a", SHIPPED_TASKS)
    assert {f.name for f in files} >= {"task.yaml", "pairs.jsonl"}
    assert read_task(None, tmp_path / "a", SHIPPED_TASKS).pairs
    copy_task("ioi", tmp_path / "b", SHIPPED_TASKS)
    assert read_task(None, tmp_path / "b", SHIPPED_TASKS).spec.generator == "ioi"
    with pytest.raises(UsageError, match="not empty"):
        copy_task("ioi", tmp_path / "b", SHIPPED_TASKS)
    assert "ioi" in generator_names()
