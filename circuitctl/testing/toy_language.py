"""A small synthetic word-level language for the shipped toy model (``models/toy-gpt``).

The language mixes three kinds of text:

* IOI-style sentences ("when mary and john went to the store , john gave a drink to mary ."),
  in several templates and both name orders, so that predicting the indirect object is useful;
* repeated sequences of nonce "random" tokens ("dif kop ... dif kop ..."), so that an induction
  mechanism is useful;
* filler sentences built from the same words, so that names and objects also occur elsewhere.

Every word is a single token of a word-level tokenizer (see :func:`build_tokenizer`), so prompts
and answers can be reasoned about word by word. All generators are pure functions of their seed.

Prompt pairs (:func:`ioi_pairs`, :func:`induction_pairs`) are records of the form::

    {"clean": str, "corrupt": str, "answers": [str], "wrong_answers": [str],
     "positions": {label: index}}

where the answer is the word that follows the prompt, clean and corrupt have the same number of
tokens, and positions index into the prompt's words (``prompt.split()``), i.e. WITHOUT the BOS
token that the model prepends.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]

NAMES = [
    "mary", "john", "alice", "bob", "sarah", "tom", "emma", "james", "lucy", "david",
    "anna", "peter", "kate", "mark", "laura", "paul", "julia", "sam", "rose", "dan",
    "ellen", "max", "nina", "leo",
]
PLACES = [
    "store", "park", "school", "market", "beach", "station", "garden", "library",
    "office", "river", "museum", "cafe", "farm", "lake", "hospital", "zoo",
]
OBJECTS = [
    "drink", "book", "ball", "key", "apple", "letter", "ring", "gift", "pen", "hat",
    "cake", "map", "flower", "coin", "bag", "cup",
]
VERBS = ["gave", "handed", "sent", "passed", "showed", "offered", "threw", "brought"]
ADJECTIVES = ["big", "small", "quiet", "busy", "old", "new", "warm", "cold", "nice", "dark"]
FUNCTION_WORDS = [
    "when", "and", "went", "to", "the", "a", "then", ",", ".", "after", "while", "were",
    "at", "had", "lot", "of", "fun", "was", "is", "likes", "saw", "in", "it", "very",
    "there", "day", "every", "morning", "later", "walked", "home", "found", "lost",
    "bought", "wanted", "with", "they", "both", "spent", "time",
]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
N_RANDOM_TOKENS = 64


def _nonce_words(n: int) -> list[str]:
    """``n`` distinct consonant-vowel-consonant nonce words, spread over the alphabet."""
    real_words = set(NAMES + PLACES + OBJECTS + VERBS + ADJECTIVES + FUNCTION_WORDS)
    candidates = ["".join(c) for c in itertools.product(_CONSONANTS, _VOWELS, _CONSONANTS)]
    picked = [w for w in candidates[::13] if w not in real_words]
    assert len(picked) >= n, "not enough nonce words"
    return picked[:n]


RANDOM_TOKENS = _nonce_words(N_RANDOM_TOKENS)


def vocabulary() -> list[str]:
    """All tokens, in id order: special tokens first, then words, then random tokens."""
    words = (
        SPECIAL_TOKENS + NAMES + PLACES + OBJECTS + VERBS + ADJECTIVES + FUNCTION_WORDS
        + RANDOM_TOKENS
    )
    assert len(words) == len(set(words)), "duplicate words in the vocabulary"
    return words


# --------------------------------------------------------------------------------------------
# IOI templates. "{A}" is the first name mentioned, "{B}" the second, "{S}" the subject who
# repeats; the sentence ends with "to {IO}". Two name orders: ABBA (S is B) and BABA (S is A).
# Every template ends with "... {S} {verb} {a|the} {obj} to" followed by the IO name.
# --------------------------------------------------------------------------------------------
IOI_TEMPLATES = [
    "when {A} and {B} went to the {place} , {S} {verb} a {obj} to",
    "after {A} and {B} went to the {place} , {S} {verb} the {obj} to",
    "while {A} and {B} were at the {place} , {S} {verb} a {obj} to",
    "then , {A} and {B} had a lot of fun at the {place} . {S} {verb} a {obj} to",
    "{A} and {B} walked to the {place} . later {S} {verb} the {obj} to",
    "when {A} and {B} were in the {place} , {S} {verb} it to",
]

FILLER_TEMPLATES = [
    "{N} went to the {place} .",
    "{N} likes the {obj} .",
    "the {place} was very {adj} .",
    "{N} saw a {adj} {obj} at the {place} .",
    "{N} and {M} spent time at the {place} .",
    "every morning {N} walked to the {place} .",
    "{N} found the {obj} in the {place} .",
    "{N} lost a {obj} at the {place} and went home .",
    "they both bought a {obj} . it was {adj} .",
    "{N} wanted the {adj} {obj} .",
    "the {obj} is {adj} .",
    "{N} {verb} the {obj} to the {place} .",
]


def _ioi_prompt(template: str, io: str, s: str, order: str, **fill: str) -> str:
    a, b = (io, s) if order == "ABBA" else (s, io)
    return template.format(A=a, B=b, S=s, **fill)


def _ioi_fill(rng: random.Random) -> dict[str, str]:
    return {"place": rng.choice(PLACES), "obj": rng.choice(OBJECTS), "verb": rng.choice(VERBS)}


def ioi_sentence(rng: random.Random) -> str:
    """One complete IOI sentence (template, names and order drawn from ``rng``)."""
    io, s = rng.sample(NAMES, 2)
    prompt = _ioi_prompt(rng.choice(IOI_TEMPLATES), io, s, rng.choice(["ABBA", "BABA"]),
                         **_ioi_fill(rng))
    return f"{prompt} {io} ."


def induction_sequence(rng: random.Random) -> str:
    """A few unrelated random tokens, then 6-10 distinct random tokens, then the same again."""
    length = rng.randint(6, 10)
    prefix_len = rng.randint(0, 4)
    tokens = rng.sample(RANDOM_TOKENS, length + prefix_len)
    prefix, seq = tokens[:prefix_len], tokens[prefix_len:]
    return " ".join(prefix + seq + seq)


def filler_sentence(rng: random.Random) -> str:
    n, m = rng.sample(NAMES, 2)
    return rng.choice(FILLER_TEMPLATES).format(
        N=n, M=m, place=rng.choice(PLACES), obj=rng.choice(OBJECTS),
        adj=rng.choice(ADJECTIVES), verb=rng.choice(VERBS),
    )


CORPUS_MIX = {"ioi": 0.45, "induction": 0.35, "filler": 0.20}


def sample_corpus(n_sequences: int, seed: int) -> list[str]:
    """``n_sequences`` training texts (without BOS), mixed according to :data:`CORPUS_MIX`."""
    rng = random.Random(seed)
    makers = {"ioi": ioi_sentence, "induction": induction_sequence, "filler": filler_sentence}
    kinds = rng.choices(list(CORPUS_MIX), weights=list(CORPUS_MIX.values()), k=n_sequences)
    return [makers[kind](rng) for kind in kinds]


# --------------------------------------------------------------------------------------------
# Prompt pairs
# --------------------------------------------------------------------------------------------
def ioi_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    """IOI prompts ending right before the indirect object, with ABC-style corruptions.

    The corrupt prompt is the same sentence with IO, S1 and S2 replaced by three other
    distinct names (IO -> C, S1 -> D, S2 -> E), so it holds no IO/S information.
    Answer: the IO name; wrong answer: the S name.
    """
    rng = random.Random(seed)
    records = []
    for i in range(n):
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        order = "ABBA" if (i // len(IOI_TEMPLATES)) % 2 == 0 else "BABA"
        io, s, c, d, e = rng.sample(NAMES, 5)
        fill = _ioi_fill(rng)
        clean = _ioi_prompt(template, io, s, order, **fill)
        words = clean.split()
        io_pos = words.index(io)
        s1_pos = words.index(s)
        s2_pos = len(words) - 1 - words[::-1].index(s)
        corrupt_words = list(words)
        corrupt_words[io_pos], corrupt_words[s1_pos], corrupt_words[s2_pos] = c, d, e
        records.append({
            "clean": clean,
            "corrupt": " ".join(corrupt_words),
            "answers": [io],
            "wrong_answers": [s],
            "positions": {"IO": io_pos, "S1": s1_pos, "S2": s2_pos, "end": len(words) - 1},
        })
    return records


def induction_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    """Induction prompts ``seq + seq[:-1]`` whose answer is ``seq[-1]``.

    The corrupt prompt replaces the first copy of ``seq`` with other random tokens, so the
    second half has nothing to copy from. The wrong answer is the token the corrupt first half
    has at the answer's place (it occurs in the corrupt prompt and not in the clean one).
    ``first_occurrence`` is the index of the token after the earlier occurrence of the last
    prompt token (i.e. where the answer sits in the first copy).
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        length = rng.randint(6, 10)
        tokens = rng.sample(RANDOM_TOKENS, 2 * length)
        seq, other = tokens[:length], tokens[length:]
        records.append({
            "clean": " ".join(seq + seq[:-1]),
            "corrupt": " ".join(other + seq[:-1]),
            "answers": [seq[-1]],
            "wrong_answers": [other[-1]],
            "positions": {"first_occurrence": length - 1, "end": 2 * length - 2},
        })
    return records


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def build_tokenizer():
    """A ``tokenizers.Tokenizer``: word level, whitespace split, ids in :func:`vocabulary` order.

    The tokenizer itself adds no BOS; :func:`load_hf_tokenizer` wraps it so that it does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def load_hf_tokenizer(tokenizer_file: str):
    """The shipped ``tokenizer.json`` as a ``transformers.PreTrainedTokenizerFast``.

    Two arguments are there for TransformerLens (3.9), whose ``set_tokenizer`` reads
    ``init_kwargs["name_or_path"]`` (KeyError without it) and, unless ``add_bos_token`` is set,
    tries to reload the tokenizer with ``AutoTokenizer.from_pretrained(name_or_path)``. With
    ``add_bos_token=True`` the tokenizer prepends ``<bos>`` itself and is used as is.
    ``eos_token`` is given so that TransformerLens does not invent ``<|endoftext|>``.
    """
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        name_or_path=str(Path(tokenizer_file).parent),
        add_bos_token=True,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
    )
