"""Markdown output that shows names as text: nothing a name holds is read as markup or HTML."""

from __future__ import annotations

import html

_PUNCTUATION = "\\`*_[]|~"  # characters that change meaning inside a line (CommonMark backslash escapes)


def text(value) -> str:
    """`value` as literal markdown text for a paragraph or a table cell (one line)."""
    escaped = html.escape(str(value), quote=False)  # <, >, & (edge names hold <k>, <v>)
    escaped = "".join("\\" + c if c in _PUNCTUATION else c for c in escaped)
    return " ".join(escaped.splitlines())


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; every cell is escaped with `text`."""
    lines = ["| " + " | ".join(text(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(text(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
