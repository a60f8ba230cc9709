"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild: a Circuit for
Indirect Object Identification in GPT-2 small", arXiv:2211.00593).

"Then, Mary and John went to the store. John gave a drink to" -> " Mary" (the indirect object IO),
not " John" (the subject S). The corrupt prompt follows the paper's ABC distribution by default
(`corruption: abc`): the three names are replaced by three fresh, distinct names, so no name is
repeated and IO cannot be found by elimination. `corruption: s2_io_flip` is MIB's circuit-track
counterfactual (Mueller et al. 2025, the `s2_io_flip_counterfactual` column of its IOI data): the
second subject becomes IO ("... Mary gave a drink to"), so the answer flips to S.
"""

from __future__ import annotations

import re

from circuitctl.errors import UsageError
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
    single_token_words,
)

# The paper's 15 templates in BABA order ([B] is S, [A] is IO). The paper's templates end with
# " [A]", the answer, which the model has to predict, so it is left off here.
BABA_TEMPLATES = [
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
]


def _abba(template: str) -> str:
    """The ABBA form of a BABA template: swap the first [B] and the [A]."""
    return template.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1)


ABBA_TEMPLATES = [_abba(template) for template in BABA_TEMPLATES]

# The paper's places, objects and names, plus more common first names so that 100+ remain
# after dropping those that are not one token.
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]
NAMES = """
Aaron Adam Alan Alex Alice Amy Anderson Andre Andrew Andy Anna Anthony Arthur Austin Blake Brandon
Brian Carter Charles Charlie Christian Christopher Clark Cole Collins Connor Crew Crystal Daniel
David Dean Edward Elizabeth Emily Eric Eva Ford Frank George Georgia Graham Grant Henry Ian Jack
Jacob Jake James Jamie Jane Jason Jay Jennifer Jeremy Jessica John Jonathan Jordan Joseph Joshua
Justin Kate Kelly Kevin Kyle Laura Leon Lewis Lisa Louis Luke Madison Marco Marcus Maria Mark Martin
Mary Matthew Max Michael Michelle Morgan Patrick Paul Peter Prince Rachel Richard River Robert Roman
Rose Ruby Russell Ryan Sarah Scott Sean Simon Stephen Steven Sullivan Taylor Thomas Tyler Victoria
Warren William Ben Bob Carl Chris Dan Dave Emma Fred Greg Jim Joe Karen Kim Leo Lucy Matt Mike Nick
Sam Tom Tony Will Anne Diana Helen Julia Linda Nancy Susan Steve Tim Bill
""".split()

TEMPLATE_TYPES = ("mixed", "BABA", "ABBA")
CORRUPTIONS = ("abc", "s2_io_flip")


def _fill(template: str, io: str, s1: str, s2: str, place: str, obj: str) -> str:
    """Put the names in: [A] is IO, the first [B] is S1 and the second [B] is S2."""
    second_names = iter([s1, s2])
    text = template.replace("[A]", io).replace("[PLACE]", place).replace("[OBJECT]", obj)
    return re.sub(r"\[B\]", lambda _: next(second_names), text)


@register_generator("ioi", "indirect object identification (Wang et al. 2022), ABC-corrupted (or MIB's s2_io_flip)")
def generate_ioi(
    tokenizer: Tokenizer,
    n: int,
    seed: int = 0,
    *,
    template_type: str = "mixed",
    template_ids: list[int] | None = None,
    corruption: str = "abc",
) -> list[dict]:
    """IOI records. `template_type`: mixed (both name orders, chosen at random), BABA or ABBA;
    `template_ids`: indices into the 15 templates to use (default all; one template gives
    prompts of equal length); `corruption`: abc (three fresh names) or s2_io_flip (S2 becomes
    IO, MIB's counterfactual). Positions: IO, S1, S2, end."""
    task = "ioi"
    check_choice(task, "template_type", template_type, TEMPLATE_TYPES)
    check_choice(task, "corruption", corruption, CORRUPTIONS)
    ids = list(range(len(BABA_TEMPLATES))) if template_ids is None else list(template_ids)
    if not ids or any(not isinstance(i, int) or not 0 <= i < len(BABA_TEMPLATES) for i in ids):
        raise UsageError(f"{task}: template_ids must be indices in 0..{len(BABA_TEMPLATES) - 1}, got {template_ids!r}")
    orders = ["BABA", "ABBA"] if template_type == "mixed" else [template_type]
    names = single_token_words(tokenizer, NAMES)
    require_words(task, "names", names, 5, len(set(NAMES)))  # IO, S and three fresh corrupt names

    def candidate(rng):
        order = rng.choice(orders)
        template = (BABA_TEMPLATES if order == "BABA" else ABBA_TEMPLATES)[rng.choice(ids)]
        io, s, x, y, z = rng.sample(names, 5)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        clean = _fill(template, io, s, s, place, obj)
        corrupt = _fill(template, x, y, z, place, obj) if corruption == "abc" else _fill(template, io, s, io, place, obj)
        tokens = encode(tokenizer, clean)
        (io_pos,) = locate(tokens, single_token_id(tokenizer, " " + io), 1)
        s1_pos, s2_pos = locate(tokens, single_token_id(tokenizer, " " + s), 2)
        return make_record(
            tokenizer,
            clean=clean,
            corrupt=corrupt,
            answers=[" " + io],
            wrong_answers=[" " + s],
            positions={"IO": io_pos, "S1": s1_pos, "S2": s2_pos, "end": len(tokens) - 1},
        )

    return sample_records(task, n, seed, candidate)
