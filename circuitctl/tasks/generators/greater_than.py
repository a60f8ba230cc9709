"""Greater-than (Hanna, Liu and Variengien 2023, "How does GPT-2 compute greater-than?
Interpreting mathematical abilities in a pre-trained language model", arXiv:2305.00586).

"The war lasted from the year 1732 to the year 17" -> a two-digit year token greater than 32.
The answers are all two-digit tokens above YY and the wrong answers those at or below it, so a
probability-difference metric is the paper's probability difference (mass on greater years minus
the rest): prob_diff is the task's metric when the run config names none. The corrupt prompt uses YY = 01, as in the paper, which leaves no year smaller.
"""

from __future__ import annotations

from circuitctl.errors import UsageError
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
from circuitctl.tasks.tokens import piece_ids

# The paper's event nouns plus "war" from its running example (nouns that are not one token
# are dropped at run time).
NOUNS = """
abduction accord affair agreement appraisal assaults assessment attack attempts campaign captivity
case challenge chaos clash collaboration coma competition confrontation consequence conspiracy
construction consultation contact contract convention cooperation custody deal decline decrease
demonstrations development disagreement disorder dispute domination dynasty effect effort employment
endeavor engagement epidemic evaluation exchange existence expansion expedition experiments fall fame
flights friendship growth hardship hostility illness impact imprisonment improvement incarceration
increase insurgency invasion investigation journey kingdom marriage modernization negotiation
notoriety obstruction operation order outbreak outcome overhaul patrols pilgrimage plague plan
practice process program progress project pursuit quest raids reforms reign relationship retaliation
riot rise rivalry romance rule sanctions shift siege slump stature stint strikes study test testing
tests therapy tour tradition treaty trial trip unemployment voyage war warfare work
""".split()

TEMPLATE = "The {noun} lasted from the year {century}{yy} to the year {century}"
CORRUPT_YY = "01"


def _splits(tokenizer: Tokenizer, century: int, yy: str, century_id: int) -> bool:
    """Whether " {century}{yy}" tokenizes as " {century}" + "{yy}", which the task relies on."""
    return piece_ids(tokenizer, f" {century}{yy}") == [century_id, single_token_id(tokenizer, yy)]


@register_generator("greater_than", "greater-than on years (Hanna et al. 2023), corrupt start year 01", metric="prob_diff")
def generate_greater_than(tokenizer: Tokenizer, n: int, seed: int = 0, *, century: int = 17) -> list[dict]:
    """Greater-than records for years `century`02..`century`98 (those whose year splits into the
    century token and a two-digit token). Positions: noun, YY (the start year's last two digits),
    end."""
    task = "greater_than"
    if isinstance(century, bool) or not isinstance(century, int) or not 10 <= century <= 99:
        raise UsageError(f"{task}: century must be a two-digit integer, got {century!r}")
    century_id = single_token_id(tokenizer, f" {century}")
    if century_id is None:
        raise UsageError(f"{task}: ' {century}' is not a single token for this tokenizer")
    year_ids = {f"{k:02d}": single_token_id(tokenizer, f"{k:02d}") for k in range(100)}
    missing = [yy for yy, token in year_ids.items() if token is None]
    if missing:
        raise UsageError(f"{task}: the two-digit years {', '.join(missing)} are not single tokens")
    if not _splits(tokenizer, century, CORRUPT_YY, century_id):
        raise UsageError(f"{task}: ' {century}{CORRUPT_YY}' does not split into ' {century}' + '{CORRUPT_YY}'")
    years = [f"{k:02d}" for k in range(2, 99) if _splits(tokenizer, century, f"{k:02d}", century_id)]
    require_words(task, "start years", years, 1)
    nouns = single_token_words(tokenizer, NOUNS)
    require_words(task, "nouns", nouns, 1)

    def candidate(rng):
        noun, yy = rng.choice(nouns), rng.choice(years)
        clean = TEMPLATE.format(noun=noun, century=century, yy=yy)
        corrupt = TEMPLATE.format(noun=noun, century=century, yy=CORRUPT_YY)
        tokens = encode(tokenizer, clean)
        (noun_pos,) = locate(tokens, single_token_id(tokenizer, " " + noun), 1)
        (yy_pos,) = locate(tokens, year_ids[yy], 1)
        return make_record(
            tokenizer,
            clean=clean,
            corrupt=corrupt,
            answers=[year for year in year_ids if int(year) > int(yy)],
            wrong_answers=[year for year in year_ids if int(year) <= int(yy)],
            positions={"noun": noun_pos, "YY": yy_pos, "end": len(tokens) - 1},
        )

    return sample_records(task, n, seed, candidate)
