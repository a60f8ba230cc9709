"""Prompt-pair generators for the standard circuit-discovery tasks.

`generate(name, tokenizer, n, seed, **options)` returns `n` task records::

    {"clean": str, "corrupt": str, "answers": [str, ...], "wrong_answers": [str, ...],
     "positions": {label: int}}

Answers are single tokens of `tokenizer`; clean and corrupt have the same number of tokens;
positions index `tokenizer.encode(clean)` without a BOS token (the runtime adds its own offset);
the answer is read at the last token. The tokenizer only needs `encode` and `decode`.

A generator module registers itself with `@register_generator`; importing this package imports
them all.
"""

from circuitctl.tasks.generators import (  # noqa: F401  (each module registers itself)
    docstring,
    gendered_pronoun,
    greater_than,
    induction,
    ioi,
    subject_verb_agreement,
)
from circuitctl.tasks.generators.registry import GENERATORS, GeneratorInfo, check_options, generate, get_generator, register_generator

__all__ = ["GENERATORS", "GeneratorInfo", "check_options", "generate", "get_generator", "register_generator"]
