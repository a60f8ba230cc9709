"""Gendered pronoun (Mathwin, Corlouer, Kran, Barez and Nanda 2023, "Identifying a Preliminary
Circuit for Predicting Gendered Pronouns in GPT-2 Small").

"So Mary is such a good friend, isn't" -> " she" (not " he"). The corrupt prompt swaps the name
for one of the other gender, which flips the expected pronoun.
"""

from __future__ import annotations

from circuitctl.tasks.generators.registry import register_generator
from circuitctl.tasks.generators._common import (
    Tokenizer,
    encode,
    locate,
    make_record,
    require_words,
    sample_records,
    single_token_id,
    single_token_words,
)

TEMPLATES = [
    "So {name} is such a good {noun}, isn't",
    "So {name} is a really great {noun}, isn't",
    "Well, {name} is such a nice {noun}, isn't",
    "So {name} is a very kind {noun}, isn't",
    "I think {name} is a wonderful {noun}, isn't",
]

# Gender-neutral roles, so only the name tells the pronoun.
NOUNS = """
friend person neighbor teacher student doctor writer cook listener colleague partner player driver
artist singer dancer leader worker nurse lawyer manager runner reader
""".split()

MALE_NAMES = """
John David Michael James Robert William Richard Thomas Charles Daniel Matthew Mark Paul Steven
Andrew Kevin Brian George Edward Peter Jack Henry Frank Scott Eric Ryan Jacob Adam Tom Mike Joe Sam
Ben Bob Jim Tony Nick Luke Sean Kyle Jason Justin Tyler Patrick Aaron Carl Greg Dave Fred Ian
""".split()

FEMALE_NAMES = """
Mary Sarah Jennifer Lisa Emily Jessica Laura Rachel Michelle Anna Amy Kate Alice Emma Lucy Julia
Susan Karen Nancy Linda Helen Diana Rose Elizabeth Victoria Maria Jane Anne Kelly Amanda Rebecca
Hannah Megan Sophie Grace Ruth Chloe Olivia Sophia Natalie Claire Ellen Sandra Betty Katie Molly
""".split()

PRONOUNS = {"male": " he", "female": " she"}


@register_generator("gendered_pronoun", "pronoun matching a name's gender (Mathwin et al. 2023)")
def generate_gendered_pronoun(tokenizer: Tokenizer, n: int, seed: int = 0) -> list[dict]:
    """Gendered-pronoun records, male and female names drawn with equal chance; the answer is
    the pronoun for the clean name's gender. Positions: name, end."""
    task = "gendered_pronoun"
    names = {"male": single_token_words(tokenizer, MALE_NAMES),
             "female": single_token_words(tokenizer, FEMALE_NAMES)}
    for gender, listed in names.items():
        require_words(task, f"{gender} names", listed, 1)
    nouns = single_token_words(tokenizer, NOUNS)
    require_words(task, "nouns", nouns, 1)

    def candidate(rng):
        gender = rng.choice(["male", "female"])
        other = "female" if gender == "male" else "male"
        name, other_name = rng.choice(names[gender]), rng.choice(names[other])
        template, noun = rng.choice(TEMPLATES), rng.choice(nouns)
        clean = template.format(name=name, noun=noun)
        corrupt = template.format(name=other_name, noun=noun)
        tokens = encode(tokenizer, clean)
        (name_pos,) = locate(tokens, single_token_id(tokenizer, " " + name), 1)
        return make_record(
            tokenizer,
            clean=clean,
            corrupt=corrupt,
            answers=[PRONOUNS[gender]],
            wrong_answers=[PRONOUNS[other]],
            positions={"name": name_pos, "end": len(tokens) - 1},
        )

    return sample_records(task, n, seed, candidate)
