"""The token ids a piece of text (an answer, a name) has inside a prompt, for any tokenizer.

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen 2.5) and SentencePiece tokenizers without a
dummy prefix (Gemma: " Mary" -> "▁Mary") encode a piece alone exactly as it appears after
other text. SentencePiece tokenizers that add a dummy prefix (Llama 2, Mistral) do not: alone,
" Mary" becomes "▁" + "▁Mary" and "01" becomes "▁01", neither of which occurs after other text.
Encoding the piece after a newline and dropping the newline's ids gives the in-prompt ids for
all of them (a newline merges with no following word, digit or space in these vocabularies);
when it does not (the newline's ids are not a prefix), the piece is encoded alone.
"""

from __future__ import annotations

from typing import Any

CONTEXT = "\n"


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens (no BOS: the runtime adds its own)."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a minimal tokenizer whose encode takes only the text
        return list(tokenizer.encode(text))


def piece_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids `text` tokenizes to when it follows other text in a prompt."""
    base = encode(tokenizer, CONTEXT)
    full = encode(tokenizer, CONTEXT + text)
    if full[: len(base)] == base:
        return full[len(base):]
    return encode(tokenizer, text)


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` if it is exactly one token inside a prompt, else None."""
    ids = piece_ids(tokenizer, text)
    return ids[0] if len(ids) == 1 else None
