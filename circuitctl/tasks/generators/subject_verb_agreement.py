"""Subject-verb agreement (Linzen, Dupoux and Goldberg 2016, "Assessing the Ability of LSTMs to
Learn Syntax-Sensitive Dependencies"; as a circuit-discovery task e.g. in Marks et al. 2024,
"Sparse Feature Circuits").

"The keys near the cabinet" -> " are" (not " is"). The subject may be followed by a
prepositional phrase whose noun (the attractor) has its own number. The corrupt prompt flips
the subject's number and nothing else, which flips the agreeing verb.
"""

from __future__ import annotations

from circuitctl.tasks.generators.registry import register_generator
from circuitctl.tasks.generators._common import (
    Tokenizer,
    check_choice,
    encode,
    locate,
    make_record,
    require_words,
    sample_records,
    single_token_id,
)

# (singular, plural); a pair is used only if both forms are one token.
NOUN_PAIRS = [
    ("key", "keys"), ("dog", "dogs"), ("book", "books"), ("car", "cars"), ("boy", "boys"),
    ("girl", "girls"), ("house", "houses"), ("tree", "trees"), ("friend", "friends"),
    ("student", "students"), ("doctor", "doctors"), ("teacher", "teachers"), ("man", "men"),
    ("woman", "women"), ("child", "children"), ("table", "tables"), ("chair", "chairs"),
    ("door", "doors"), ("window", "windows"), ("bird", "birds"), ("cat", "cats"),
    ("box", "boxes"), ("letter", "letters"), ("picture", "pictures"), ("lamp", "lamps"),
    ("painting", "paintings"), ("player", "players"), ("farmer", "farmers"), ("author", "authors"),
    ("officer", "officers"), ("cabinet", "cabinets"), ("bottle", "bottles"), ("flower", "flowers"),
    ("road", "roads"), ("building", "buildings"), ("river", "rivers"), ("machine", "machines"),
]

# Prepositions joining the subject to the attractor.
PREPOSITIONS = ["near", "behind", "next to", "beside", "on", "by", "under", "above"]

ATTRACTORS = ("random", "opposite", "same", "none")
TENSES = {"present": ([" is"], [" are"]), "past": ([" was"], [" were"]),
          "both": ([" is", " was"], [" are", " were"])}


@register_generator("subject_verb_agreement", "verb number agreeing with the subject (Linzen et al. 2016)")
def generate_subject_verb_agreement(
    tokenizer: Tokenizer,
    n: int,
    seed: int = 0,
    *,
    attractor: str = "random",
    tense: str = "present",
) -> list[dict]:
    """Agreement records "The [subject] [preposition] the [attractor]" -> verb. `attractor`: random
    (its number drawn at random), opposite or same (relative to the subject), or none (the bare
    prompt "The [subject]"); `tense`: present (is/are), past (was/were) or both. Positions:
    subject, attractor (unless none), end."""
    task = "subject_verb_agreement"
    check_choice(task, "attractor", attractor, ATTRACTORS)
    check_choice(task, "tense", tense, list(TENSES))
    pairs = [pair for pair in NOUN_PAIRS if all(single_token_id(tokenizer, " " + w) is not None for w in pair)]
    require_words(task, "singular/plural noun pairs", pairs, 1 if attractor == "none" else 2)
    singular_verbs, plural_verbs = TENSES[tense]

    def candidate(rng):
        # Subject and attractor come from different pairs so each occurs once in the prompt.
        subject_pair, attractor_pair = rng.sample(pairs, 2) if len(pairs) > 1 else (pairs[0], None)
        plural = rng.random() < 0.5
        subject, flipped = subject_pair[plural], subject_pair[not plural]
        template = "The {subject}"
        if attractor != "none":
            attractor_plural = {"random": rng.random() < 0.5, "opposite": not plural, "same": plural}[attractor]
            other = attractor_pair[attractor_plural]
            template += f" {rng.choice(PREPOSITIONS)} the {other}"
        clean, corrupt = template.format(subject=subject), template.format(subject=flipped)

        tokens = encode(tokenizer, clean)
        (subject_pos,) = locate(tokens, single_token_id(tokenizer, " " + subject), 1)
        positions = {"subject": subject_pos}
        if attractor != "none":
            (positions["attractor"],) = locate(tokens, single_token_id(tokenizer, " " + other), 1)
        positions["end"] = len(tokens) - 1
        right, wrong = (plural_verbs, singular_verbs) if plural else (singular_verbs, plural_verbs)
        return make_record(
            tokenizer, clean=clean, corrupt=corrupt, answers=right, wrong_answers=wrong, positions=positions
        )

    return sample_records(task, n, seed, candidate)
