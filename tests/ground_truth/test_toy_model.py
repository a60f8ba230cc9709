"""The shipped toy checkpoint (models/toy-gpt) and its tasks (tasks/toy-ioi, tasks/toy-induction).

The model is loaded the way a user would: config.json -> HookedTransformerConfig, the
safetensors state dict, and tokenizer.json through PreTrainedTokenizerFast.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from circuitctl.testing import toy_language as lang  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "toy-gpt"
TASK_DIRS = {"toy-ioi": ROOT / "tasks" / "toy-ioi",
             "toy-induction": ROOT / "tasks" / "toy-induction"}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(MODEL_DIR / "tokenizer.json"),
        name_or_path=str(MODEL_DIR),
        add_bos_token=True,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**json.loads((MODEL_DIR / "config.json").read_text()))
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_state_dict(load_file(str(MODEL_DIR / "model.safetensors")))
    model.eval()
    return model


def load_pairs(task: str) -> list[dict]:
    lines = (TASK_DIRS[task] / "pairs.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_checkpoint_files_are_small():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 8 * 2**20


def test_vocabulary_matches_tokenizer(tokenizer):
    vocab = lang.vocabulary()
    assert len(vocab) == len(set(vocab))
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(len(vocab))] == vocab


def test_tokenizer_round_trips(tokenizer):
    texts = lang.sample_corpus(50, seed=123)
    texts += [r[k] for t in TASK_DIRS for r in load_pairs(t) for k in ("clean", "corrupt")]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids, text
        assert len(ids) == len(text.split()) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_to_tokens_prepends_bos(model, tokenizer):
    tokens = model.to_tokens("when mary and john")
    assert tokens.shape == (1, 5)
    assert tokens[0, 0].item() == tokenizer.bos_token_id
    assert model.to_str_tokens("when mary and john")[1:] == ["when", "mary", "and", "john"]
    assert model.to_tokens("when mary", prepend_bos=False).shape == (1, 2)


@pytest.mark.parametrize("task", list(TASK_DIRS))
def test_task_spec(task):
    spec = yaml.safe_load((TASK_DIRS[task] / "task.yaml").read_text())
    assert spec["name"] == task
    assert spec["version"] == 1
    assert spec["pairs"] == "pairs.jsonl"
    assert spec["metric"] == "logit_diff"
    records = load_pairs(task)
    assert len(records) >= 32
    for r in records:
        assert set(r["positions"]) == set(spec["positions"])


@pytest.mark.parametrize("task", list(TASK_DIRS))
def test_pairs_are_well_formed(model, task):
    for r in load_pairs(task):
        clean, corrupt = model.to_tokens(r["clean"]), model.to_tokens(r["corrupt"])
        assert clean.shape == corrupt.shape, r
        for word in r["answers"] + r["wrong_answers"]:
            assert model.to_tokens(" " + word, prepend_bos=False).shape == (1, 1), word
        words = r["clean"].split()  # positions index the prompt without BOS
        assert r["positions"]["end"] == len(words) - 1
        for label, index in r["positions"].items():
            assert 0 <= index < len(words), (label, index)
        if task == "toy-ioi":
            pos = r["positions"]
            assert words[pos["IO"]] == r["answers"][0]
            assert words[pos["S1"]] == words[pos["S2"]] == r["wrong_answers"][0]
            changed = [i for i, (a, b) in enumerate(zip(words, r["corrupt"].split())) if a != b]
            assert changed == sorted([pos["IO"], pos["S1"], pos["S2"]])
        else:
            assert words[r["positions"]["first_occurrence"]] == r["answers"][0]
            assert words[r["positions"]["first_occurrence"] - 1] == words[-1]


@pytest.mark.parametrize("task", list(TASK_DIRS))
def test_model_solves_task(model, task):
    records = load_pairs(task)
    answer = torch.tensor([model.to_single_token(r["answers"][0]) for r in records])
    wrong = torch.tensor([model.to_single_token(r["wrong_answers"][0]) for r in records])
    results = {}
    with torch.no_grad():
        for kind in ("clean", "corrupt"):
            # Right-padded; each prompt's logits are read at its own last token.
            tokens = model.to_tokens([r[kind] for r in records], padding_side="right")
            ends = torch.tensor([r["positions"]["end"] + 1 for r in records])  # +1 for BOS
            last = model(tokens)[torch.arange(len(records)), ends]
            logit_diff = last.gather(1, answer[:, None]) - last.gather(1, wrong[:, None])
            results[kind] = ((last.argmax(-1) == answer).float().mean().item(),
                             logit_diff.mean().item())
    clean_acc, clean_ld = results["clean"]
    _, corrupt_ld = results["corrupt"]
    assert clean_acc >= 0.9, results
    assert clean_ld > 0, results
    assert clean_ld > corrupt_ld + 1.0, results
