"""The task generators with the tokenizers of the MIB models, built by hand in-process (no downloads).

* `sentencepiece_gemma`: SentencePiece-style, word tokens carry "▁" ("▁Mary") and no dummy
  prefix is added (Gemma's normalizer replaces " " by "▁").
* `sentencepiece_llama2`: the same with a dummy prefix (Llama 2, Mistral): alone, " Mary" is
  "▁" + "▁Mary", inside a prompt it is "▁Mary".
* `bpe_llama3`: byte-level BPE with "Ġ" and Llama 3's pre-tokenizer (digits in groups of three,
  a space before digits kept apart; Qwen 2.5 differs only in one digit per token), trained here
  on the generators' words.

Ground truth: IOI's answer id must be the token the indirect object is in the clean prompt, and
the wrong answer the subject's token, whatever the tokenizer.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

import pytest

from circuitctl.errors import UsageError
from circuitctl.tasks.data import tokenize_pairs
from circuitctl.tasks.generators import (
    docstring,
    gendered_pronoun,
    generate,
    ioi,
    subject_verb_agreement,
)
from circuitctl.tasks.records import pair_from_record

BOS = "<bos>"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def words_of(*texts: str) -> list[str]:
    return sorted({w for text in texts for w in re.findall(r"[A-Za-z]+", text)})


IOI_WORDS = words_of(*ioi.BABA_TEMPLATES, *ioi.PLACES, *ioi.OBJECTS)
ALL_WORDS = words_of(
    *ioi.BABA_TEMPLATES, *ioi.PLACES, *ioi.OBJECTS, *ioi.NAMES,
    *gendered_pronoun.TEMPLATES, *gendered_pronoun.NOUNS, *gendered_pronoun.MALE_NAMES, *gendered_pronoun.FEMALE_NAMES, "he she",
    *(w for pair in subject_verb_agreement.NOUN_PAIRS for w in pair), *subject_verb_agreement.PREPOSITIONS, "The the is are was were",
    *docstring.VARIABLE_NAMES, *docstring.DESCRIPTION_WORDS, "def self param",
)


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, unk_token="<unk>")


def sentencepiece(words: list[str], dummy_prefix: bool):
    """A SentencePiece-style unigram tokenizer: "▁word" for every word, single characters else."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    chars = list(string.ascii_letters + string.digits + string.punctuation) + ["▁", "\n"]
    pieces = [("<unk>", 0.0), (BOS, 0.0)] + [("▁" + w, -2.0) for w in words] + [(c, -10.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0))
    replace = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if dummy_prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else [])
    tok.decoder = decoders.Sequence(steps)
    return _wrap(tok)


@lru_cache(maxsize=1)
def bpe_llama3():
    """Byte-level BPE ("Ġ") with Llama 3's pre-tokenizer, trained on the generators' words."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = list(ioi.BABA_TEMPLATES) + [" " + w for w in ALL_WORDS] * 3 + [" The war lasted from the year 1732 to the year 17"]
    trainer = trainers.BpeTrainer(
        vocab_size=5000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[BOS, "<unk>"], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return _wrap(tok)


TOKENIZERS = {
    "sentencepiece_gemma": (lambda: sentencepiece(ALL_WORDS, dummy_prefix=False), "▁"),
    "sentencepiece_llama2": (lambda: sentencepiece(ALL_WORDS, dummy_prefix=True), "▁"),
    "bpe_llama3": (bpe_llama3, "Ġ"),
}


def tokenized(records, tokenizer):
    pairs = [pair_from_record(r, f"record {i}") for i, r in enumerate(records)]
    return tokenize_pairs(pairs, tokenizer, len(tokenizer), tokenizer.convert_tokens_to_ids(BOS), "test")


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("corruption", ["abc", "s2_io_flip"])
def test_ioi_answers_are_the_name_tokens_of_the_prompt(name, corruption):
    make, marker = TOKENIZERS[name]
    tokenizer = make()
    records = generate("ioi", tokenizer, 40, seed=3, corruption=corruption)
    data = tokenized(records, tokenizer)
    rows = range(data.n)
    io, s1, s2 = (data.positions[label] for label in ("IO", "S1", "S2"))
    assert all(data.answers[i, 0] == data.clean[i, io[i]] for i in rows)
    assert all(data.wrong[i, 0] == data.clean[i, s1[i]] == data.clean[i, s2[i]] for i in rows)
    assert all(tokenizer.convert_ids_to_tokens(int(data.answers[i, 0])).startswith(marker) for i in rows)
    assert all(data.clean[i, data.lengths[i] - 1] == tokenizer.convert_tokens_to_ids(marker + "to") for i in rows)
    if corruption == "s2_io_flip":  # MIB's counterfactual: S2 becomes IO, nothing else changes
        for i in rows:
            expected = data.clean[i].clone()
            expected[s2[i]] = data.clean[i, io[i]]
            assert data.corrupt[i].tolist() == expected.tolist()
    else:  # ABC: the three names are fresh, nothing else changes
        for i in rows:
            differ = (data.clean[i] != data.corrupt[i]).nonzero().flatten().tolist()
            assert differ == sorted([int(io[i]), int(s1[i]), int(s2[i])])


def test_a_dummy_prefix_tokenizer_splits_a_lone_answer_but_not_the_one_in_the_prompt():
    """What the in-prompt tokenization is for: alone, " Mary" is two tokens for Llama-2-style
    tokenizers, which would drop every name and refuse every answer."""
    tokenizer = sentencepiece(ALL_WORDS, dummy_prefix=True)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" Mary", add_special_tokens=False)) == ["▁", "▁Mary"]
    record = {"clean": "Then, Mary and John went to the store. John gave a drink to",
              "corrupt": "Then, John and Mary went to the store. Mary gave a drink to", "answers": [" Mary"], "wrong_answers": [" John"]}
    data = tokenized([record], tokenizer)
    assert tokenizer.convert_ids_to_tokens(data.answers[0].tolist()) == ["▁Mary"]
    assert tokenizer.convert_ids_to_tokens(data.wrong[0].tolist()) == ["▁John"]


def test_only_single_token_names_are_used():
    kept = ["Mary", "John", "Alice", "Bob", "Carl", "Emma", "Kate", "Paul"]
    tokenizer = sentencepiece(IOI_WORDS + kept, dummy_prefix=False)
    records = generate("ioi", tokenizer, 30, seed=0)
    used = {name.strip() for r in records for name in r["answers"] + r["wrong_answers"]}
    used |= {w for r in records for w in re.findall(r"[A-Z][a-z]+", r["corrupt"])} - {"Then", "After", "When", "While", "Afterwards", "The", "Friends"}
    assert used <= set(kept) and len(used) >= 5


def test_too_few_single_token_names_fail_with_a_clear_message():
    tokenizer = sentencepiece(IOI_WORDS + ["Mary", "John", "Alice"], dummy_prefix=False)
    with pytest.raises(UsageError, match=r"ioi: only 3 of \d+ names are single tokens for this tokenizer \(.*'Mary'.*\); the task needs 5") as info:
        generate("ioi", tokenizer, 10)
    assert "JSONL file of pairs" in str(info.value)


@pytest.mark.parametrize("name", ["gendered_pronoun", "subject_verb_agreement", "docstring", "induction"])
def test_the_other_generators_work_with_sentencepiece_words(name):
    tokenizer = sentencepiece(ALL_WORDS, dummy_prefix=False)
    records = generate(name, tokenizer, 12, seed=1)
    data = tokenized(records, tokenizer)
    assert data.n == 12
    assert all(tokenizer.convert_ids_to_tokens(int(a)).startswith("▁") for a in data.answers[:, 0])


def test_greater_than_needs_two_digit_year_tokens():
    """Llama 3 keeps the space before digits apart and groups digits by three: no ' 17' token."""
    with pytest.raises(UsageError, match="greater_than: ' 17' is not a single token"):
        generate("greater_than", bpe_llama3(), 5)


def test_induction_text_needs_round_trip_tokens_and_says_to_use_ids():
    tokenizer = sentencepiece(ALL_WORDS, dummy_prefix=True)  # decodes a lone "▁Mary" as "Mary"
    with pytest.raises(UsageError, match="use as_ids: true"):
        generate("induction", tokenizer, 4)
    data = tokenized(generate("induction", tokenizer, 4, as_ids=True), tokenizer)
    assert all(data.answers[i, 0] == data.clean[i, data.positions["answer_source"][i]] for i in range(data.n))
