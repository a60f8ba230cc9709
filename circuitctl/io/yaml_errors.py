"""One-line messages for YAML that cannot be read or does not parse (configs and task specs)."""

from __future__ import annotations

from pathlib import Path

import yaml

from circuitctl.errors import UsageError


def describe_yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line naming the file, the line and column, and the problem."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem:
        # the safe loader constructs no !!python/... objects: configs are data, never code
        tag = problem.split("tag", 1)[1].strip().strip("'").replace("tag:yaml.org,2002:", "!!")
        return f"{path}{where}: YAML tag '{tag}' is not allowed; configs and task specs hold plain data only"
    return f"{path}: malformed YAML{where}: {problem}"


def read_text(path: Path) -> str:
    """A config or task file's text (UTF-8), or one message saying why it cannot be read."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start + 1})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror or exc})") from None


MAX_NESTING = 64  # configs and task specs nest a few levels; PyYAML's pure-Python parser is quadratic in depth


def check_nesting(text: str, path: Path) -> None:
    """Refuse YAML whose [ ] / { } nesting is deeper than MAX_NESTING before parsing it (deep
    nesting makes PyYAML slow, then exhausts Python's recursion). Quoted text and comments are skipped."""
    depth, quote, line = 0, None, 1
    previous = "\n"
    for ch in text:
        if ch == "\n":
            line += 1
        if quote is not None:
            if ch == quote and not (quote == '"' and previous == "\\"):
                quote = None
        elif ch == "#" and previous in " \t\n":
            quote = "\n"  # a comment runs to the end of the line
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise UsageError(f"{path} line {line}: YAML nested more than {MAX_NESTING} levels deep")
        elif ch in "]}":
            depth = max(0, depth - 1)
        previous = "" if previous == "\\" and ch == "\\" else ch
