"""One-line messages for YAML that does not parse (configs and task specs)."""

from __future__ import annotations

from pathlib import Path

import yaml


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
