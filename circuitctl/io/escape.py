"""Escaping of names embedded in output files, in one place.

Task names, position labels, plugin names, model names and file names are user input; they
end up in Graphviz DOT (and the SVG that `dot` makes of it), markdown, HTML and directory
names. Every writer that embeds a name goes through one of these functions, so a quote, an
angle bracket, a newline, ``<script>`` or a control character never breaks a file's syntax or
becomes markup. JSON needs nothing here: `json.dumps` escapes everything itself.
"""

from __future__ import annotations

import re

_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
_MARKDOWN_PUNCTUATION = set("\\`*_{}[]()#+-.!|~=:$^")


def visible(ch: str) -> str:
    """A character as it may appear in text: itself when printable (any script, emoji, a
    space), else its escape (``\\x1b``, ``\\u200b``) so control characters and lone surrogates
    never reach a file."""
    return ch if ch.isprintable() else ascii(ch)[1:-1]


def dot_string(text: str) -> str:
    """A double-quoted DOT string (an ID, a label, a tooltip) that reads as `text`.

    Graphviz interprets backslash escapes (``\\N``, ``\\l``) and HTML entities in labels and
    copies entity-like text (``&nbsp;``) into SVG as it is, which XML would reject: so
    backslashes are doubled, quotes escaped, ``&`` written as ``&amp;`` and a newline as
    Graphviz's line break ``\\n``; everything else unprintable becomes visible escape text."""
    out = []
    for ch in str(text):
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "&":
            out.append("&amp;")
        elif ch == "\n":
            out.append("\\n")
        else:
            out.append(visible(ch).replace("\\", "\\\\"))
    return '"' + "".join(out) + '"'


def html_text(text: str) -> str:
    """`text` as HTML (or XML) character data or an attribute value: inert, on one line."""
    return "".join(_HTML.get(ch) or (" " if ch in "\r\n\t" else visible(ch)) for ch in str(text))


def markdown_text(text: str) -> str:
    """`text` as inline markdown that renders as exactly `text`: markdown punctuation is
    backslash-escaped, HTML-significant characters become entities (renderers pass raw HTML
    through), and line breaks become spaces (a newline could start a heading or a table row)."""
    out = []
    for ch in str(text):
        if ch in _HTML:
            out.append(_HTML[ch])
        elif ch in _MARKDOWN_PUNCTUATION:
            out.append("\\" + ch)
        elif ch in "\r\n\t":
            out.append(" ")
        else:
            out.append(visible(ch).replace("\\", "\\\\"))
    return "".join(out)


def path_component(text: str, fallback: str = "run", limit: int = 80) -> str:
    """A file or directory name made from `text` (e.g. a task name in a default run directory):
    letters (any script), digits, '_', '.', '-' kept, anything else (a '/', '..', a newline)
    replaced by '_', no leading dot."""
    name = re.sub(r"[^\w.-]", "_", str(text))[:limit].lstrip(".")
    return name or fallback
