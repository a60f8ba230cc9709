"""The generator registry: `@register_generator` adds a generator, `get_generator` finds one."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from circuitctl.errors import UsageError
from circuitctl.registry import unknown_name_message

GeneratorFn = Callable[..., list[dict]]


@dataclass(frozen=True)
class GeneratorInfo:
    """A registered generator: `function(tokenizer, n, seed=0, *, <options>) -> list[dict]`."""

    name: str
    description: str
    function: GeneratorFn
    metric: str | None = None  # the task's metric when the run config names none

    @property
    def options(self) -> dict[str, Any]:
        """The generator's keyword options and their defaults."""
        parameters = inspect.signature(self.function).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


GENERATORS: dict[str, GeneratorInfo] = {}


def register_generator(name: str, description: str, metric: str | None = None) -> Callable[[GeneratorFn], GeneratorFn]:
    """Decorator registering a generator function under `name` (`metric`: its task's default metric)."""

    def decorator(function: GeneratorFn) -> GeneratorFn:
        if name in GENERATORS and GENERATORS[name].function is not function:
            raise ValueError(f"generator '{name}' is registered twice")
        GENERATORS[name] = GeneratorInfo(name, description, function, metric)
        return function

    return decorator


def get_generator(name: str) -> GeneratorInfo:
    """The generator called `name` (hyphens read as underscores); UsageError naming the closest one."""
    info = GENERATORS.get(name) or GENERATORS.get(name.replace("-", "_"))
    if info is None:
        raise UsageError(unknown_name_message("task generator", name, list(GENERATORS)))
    return info


def generate(name: str, tokenizer: Any, n: int, seed: int = 0, **options: Any) -> list[dict]:
    """`n` records of task `name`, the same for the same seed and options."""
    info = get_generator(name)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UsageError(f"task generator '{info.name}': n must be a non-negative integer, got {n!r}")
    check_options(info.name, options)
    return info.function(tokenizer, n, seed, **options)


def check_options(name: str, options: dict[str, Any]) -> None:
    """Every option is one the generator takes (names only: values are checked with the tokenizer)."""
    info = get_generator(name)
    valid = info.options
    for option in options:
        if option not in valid:
            if not valid:
                raise UsageError(f"task generator '{info.name}' takes no options (got '{option}')")
            raise UsageError(unknown_name_message(f"option of task generator '{info.name}'", option, list(valid)))
