'''Docstring (Heimersheim and Janiak 2023, "A circuit for Python docstrings in a 4-layer
attention-only transformer", Alignment Forum). The prompt is a method whose docstring lists its
parameters in order; the answer is the next parameter name::

    def port(self, load, size, files, last):
        """oil column piece

        :param load: crime population
        :param size: unit dark
        :param                                      -> " files"

Corruptions follow the paper's names: `random_def` (default) renames the def's parameters that
the docstring already listed, so the docstring no longer matches the def (the answer stays in
the def); `random_doc` renames the docstring's parameters instead; `random_random` renames the
def's matching parameters (the answer too) and, differently, the docstring's.
'''

from __future__ import annotations

from string import ascii_uppercase

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

# Common Python identifiers, used as method and parameter names.
VARIABLE_NAMES = """
data name file value test result line user key default request path output node item url model
response text version log string field start number values index error context image message
check size event state row parser files form query fields instance label action target array code
num table source config options status group content client filename results last command base
format color settings order count match tag title parent session token server host date mode
project info page header option task shape load names port root width height weight offset limit
prefix suffix callback handler buffer stream channel socket timeout level depth
scale factor rate threshold sample batch epoch step seed loss score
""".split()

# Common nouns for the descriptions; kept apart from the names so a name appears only where
# the task puts it.
DESCRIPTION_WORDS = [
    word
    for word in """
price control issue course minute education research subject girl age father force act matter
health lot street patient class mind church condition paper bank century section activity building
sense sort staff team student language town plan management morning committee product practice
evidence ground letter foot boy back game food union role land art support range stage trade voice
arm club history account material care manager record example training window air light wife
quality rule pound story tax worker nature bed hospital method unit detail wall computer amount bit
president chapter property son director leader south board king production share lord contract
picture security election future site loss shop animal heart purpose standard doctor hair love
music charge pattern design piece population tree knowledge plant pressure fire crime oil column
dark
""".split()
    if word not in VARIABLE_NAMES
]

CORRUPTIONS = ("random_def", "random_doc", "random_random")
INDENT = " " * 4


def _prompt(method: str, description: list[str], def_args: list[str], doc_args: list[str],
            doc_descriptions: list[list[str]]) -> str:
    """The method with its docstring cut off after the next ':param' (a blank line after the
    summary, as in the paper's prompts)."""
    params = "".join(
        f"{INDENT}:param {arg}: {' '.join(words)}\n" for arg, words in zip(doc_args, doc_descriptions)
    )
    return (
        f"\ndef {method}(self, {', '.join(def_args)}):\n"
        f'{INDENT}"""{" ".join(description)}\n\n'
        f"{params}{INDENT}:param"
    )


@register_generator("docstring", "next docstring parameter (Heimersheim and Janiak 2023)")
def generate_docstring(
    tokenizer: Tokenizer,
    n: int,
    seed: int = 0,
    *,
    corruption: str = "random_def",
    n_matching: int = 3,
    n_def_prefix: int = 0,
    n_def_suffix: int = 1,
) -> list[dict]:
    """Docstring records. The def has `n_def_prefix` parameters the docstring skips, then
    `n_matching` parameters (the docstring lists all but the last, which is the answer), then
    `n_def_suffix` more. Positions: A_def, B_def, ... (the matching parameters in the def; the
    last is the answer), A_doc, B_doc, ... (in the docstring), end."""
    task = "docstring"
    check_choice(task, "corruption", corruption, CORRUPTIONS)
    for option, value, minimum in (("n_matching", n_matching, 2), ("n_def_prefix", n_def_prefix, 0),
                                   ("n_def_suffix", n_def_suffix, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= 10:
            raise UsageError(f"{task}: {option} must be an integer in {minimum}..10, got {value!r}")
    names = single_token_words(tokenizer, VARIABLE_NAMES)
    # Method name, the def's parameters, and fresh names for the def and the docstring corruption.
    n_names = 1 + n_def_prefix + n_matching + n_def_suffix + n_matching + (n_matching - 1)
    require_words(task, "parameter names", names, n_names)
    words = single_token_words(tokenizer, DESCRIPTION_WORDS)
    require_words(task, "description words", words, 3)

    def candidate(rng):
        method, *chosen = rng.sample(names, n_names)
        prefix, chosen = chosen[:n_def_prefix], chosen[n_def_prefix:]
        matching, chosen = chosen[:n_matching], chosen[n_matching:]
        suffix, chosen = chosen[:n_def_suffix], chosen[n_def_suffix:]
        fresh_def, fresh_doc = chosen[:n_matching], chosen[n_matching:]
        description = rng.sample(words, 3)
        doc_descriptions = [rng.sample(words, 2) for _ in range(n_matching - 1)]
        answer, listed = matching[-1], matching[:-1]

        def_args, doc_args = prefix + matching + suffix, listed
        if corruption == "random_def":
            corrupt_def, corrupt_doc = prefix + fresh_def[:-1] + [answer] + suffix, listed
        elif corruption == "random_doc":
            corrupt_def, corrupt_doc = def_args, fresh_doc
        else:  # random_random
            corrupt_def, corrupt_doc = prefix + fresh_def + suffix, fresh_doc
        clean = _prompt(method, description, def_args, doc_args, doc_descriptions)
        corrupt = _prompt(method, description, corrupt_def, corrupt_doc, doc_descriptions)

        tokens = encode(tokenizer, clean)
        positions = {}
        for letter, name in zip(ascii_uppercase, matching):
            found = locate(tokens, single_token_id(tokenizer, " " + name), 1 if name == answer else 2)
            positions[f"{letter}_def"] = found[0]
            if name != answer:
                positions[f"{letter}_doc"] = found[1]
        positions["end"] = len(tokens) - 1
        return make_record(
            tokenizer,
            clean=clean,
            corrupt=corrupt,
            answers=[" " + answer],
            wrong_answers=[" " + arg for arg in def_args if arg != answer],
            positions=positions,
        )

    return sample_records(task, n, seed, candidate)
