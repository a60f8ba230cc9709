"""Load a run config from YAML: safe loading, `key=value` overrides, every error at once.

Validation is pure pydantic + PyYAML, so `circuitctl validate` never imports torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from circuitctl.config.methods import METHODS
from circuitctl.config.schema import ABLATION_TYPES, METRIC_NAMES, RunConfig
from circuitctl.errors import UsageError
from circuitctl.io.yaml_errors import check_nesting, describe_yaml_error, read_text
from circuitctl.registry import closest

_PLACEHOLDER_METHOD = {"name": "exact"}


def find_config(path: Path) -> Path:
    """A config file given by path, or a shipped config given by name (``demo``, ``mib/gpt2-ioi-eap-ig``)."""
    path = Path(path)
    from circuitctl.resources import shipped_config, shipped_config_names

    if path.is_file():
        return path
    shipped = shipped_config(str(path))
    if shipped is not None:  # also when a directory of that name (a run called `demo`) is here
        return shipped
    if path.exists():
        return path
    hint = closest(str(path).removesuffix(".yaml"), shipped_config_names())
    raise UsageError(
        f"config file '{path}' does not exist" + (f"; did you mean the shipped config '{hint}'?" if hint else "")
    )


def read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """Parse a YAML file safely; return the data and a map from key path to line number."""
    if not path.exists():
        raise UsageError(f"config file '{path}' does not exist")
    if path.is_dir():
        raise UsageError(f"config '{path}' is a directory, not a YAML file")
    text = read_text(path)
    check_nesting(text, path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(describe_yaml_error(path, exc)) from exc
    except RecursionError:  # PyYAML recurses once per nesting level
        raise UsageError(f"{path}: YAML nested too deeply to read") from None
    lines: dict[tuple, int] = {}

    def walk(n, prefix: tuple) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = (*prefix, key_node.value)
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)

    walk(node, ())
    return data, lines


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UsageError(f"override '{text}' is not of the form key=value (e.g. method.name=eap)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UsageError(f"override '{text}': '{key}' is not a dotted key")
    try:
        check_nesting(raw, Path("override"))
        value = yaml.safe_load(raw) if raw else ""
    except (yaml.YAMLError, RecursionError, UsageError):
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        target = data
        for key in keys[:-1]:
            if isinstance(target.get(key), str) and key in ("ablation",):
                target[key] = {"type": target[key]}
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[keys[-1]] = value
    return data


def _valid_keys(model_cls, loc: tuple) -> list[str]:
    """Field names valid at `loc` (for 'did you mean' on unknown keys)."""
    cls = model_cls
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None or not hasattr(field.annotation, "model_fields"):
            return []
        cls = field.annotation
    return list(cls.model_fields) if hasattr(cls, "model_fields") else []


def _describe(error: dict, root_cls, prefix: tuple, lines: dict[tuple, int], given: dict) -> str:
    loc = tuple(str(p) for p in error["loc"] if not str(p).startswith("function-"))
    loc = tuple(p for p in loc if p not in ("function-after[_one_source()]",))
    full = (*prefix, *loc)
    path = ".".join(full) or "(top level)"
    line = next((lines[full[:i]] for i in range(len(full), 0, -1) if full[:i] in lines), None)
    where = f" (line {line})" if line else ""
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        hint = closest(loc[-1], _valid_keys(root_cls, loc)) if loc else None
        msg = "unknown key" + (f"; did you mean '{hint}'?" if hint else "")
    elif kind == "literal_error":
        valid = {"metric": METRIC_NAMES, "type": ABLATION_TYPES}.get(loc[-1] if loc else "", ())
        bad = error.get("input")
        hint = closest(str(bad), list(valid)) if valid else None
        msg = f"'{bad}' is not valid" + (f"; did you mean '{hint}'?" if hint else "") + (f" (valid: {', '.join(valid)})" if valid else f" ({msg})")
    elif kind == "missing":
        msg = "required but missing"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{path}{where}: {msg}"


def validate_config(data: Any, source: str = "config", lines: dict[tuple, int] | None = None, config_dir: Path | None = None) -> RunConfig:
    """Validate a config mapping, reporting every problem at once. A config that names no metric
    gets its task's (`with_task_metric`; task paths are read relative to `config_dir`)."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise UsageError(f"{source}: a config must be a YAML mapping with sections model, task, method, ...")
    problems: list[str] = []
    method_data = data.get("method")
    settings = None
    if isinstance(method_data, str):
        method_data = {"name": method_data}
    if not isinstance(method_data, dict) or "name" not in method_data:
        problems.append(f"method{_line(lines, ('method',))}: required: a mapping with a 'name' (one of {', '.join(METHODS.names())})")
    elif not isinstance(method_data["name"], str) or method_data["name"] not in METHODS:
        name = str(method_data["name"])
        hint = closest(name, METHODS.names())
        problems.append(
            f"method.name{_line(lines, ('method', 'name'))}: unknown method '{name}'"
            + (f"; did you mean '{hint}'?" if hint else "")
            + f" (valid: {', '.join(METHODS.names())})"
        )
    else:
        info = METHODS.get(method_data["name"])
        try:
            settings = info.settings.model_validate(method_data)
        except ValidationError as exc:
            problems += [_describe(e, info.settings, ("method",), lines, data) for e in exc.errors()]
    rest = {**data, "method": _PLACEHOLDER_METHOD}
    config = None
    try:
        config = RunConfig.model_validate(rest)
    except ValidationError as exc:
        problems += [_describe(e, RunConfig, (), lines, data) for e in exc.errors() if e["loc"][:1] != ("method",)]
    if problems:
        header = f"{source} is not a valid config ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"
        raise UsageError(header + "\n  - " + "\n  - ".join(problems))
    assert config is not None and settings is not None
    return with_task_metric(config.model_copy(update={"method": settings}), config_dir)


def with_task_metric(config: RunConfig, config_dir: Path | None) -> RunConfig:
    """The config with the metric its run uses: the config's `metric` when it names one, else the
    task's (`metric:` in its task.yaml, or a generator's), else the default, logit_diff. The
    metric is then part of the config: config.yaml, circuit.json and the config hash record it,
    so `discover --from RUN_DIR` reruns with the same metric. A task that cannot be read here
    keeps the default (the run reports the problem when it reads the task)."""
    if "metric" in config.model_fields_set:
        return config
    from circuitctl.config.schema import metric_names
    from circuitctl.resources import SHIPPED_TASKS, resolve_path
    from circuitctl.registry import unknown_name_message
    from circuitctl.tasks.records import read_task_spec

    try:
        path = resolve_path(config.task.path, config_dir) if config.task.path else None
        spec, origin = read_task_spec(config.task.name, path, SHIPPED_TASKS)
    except (UsageError, OSError):
        return config
    if spec.metric is None:
        return config
    names = metric_names()
    if spec.metric not in names:
        raise UsageError(f"{origin}: {unknown_name_message('metric', spec.metric, names)}; fix the task's metric or name one in the config")
    return config.model_copy(update={"metric": spec.metric})


def _line(lines: dict[tuple, int], key: tuple) -> str:
    return f" (line {lines[key]})" if key in lines else ""


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    data, lines = read_yaml(path)
    if data is None:
        raise UsageError(f"{path}: the config file is empty")
    if isinstance(data, dict):
        data = apply_overrides(data, list(overrides or []))
    return validate_config(data, str(path), lines, path.parent)


def config_hash(config: RunConfig) -> str:
    """A short hash that identifies the experiment: every section except those that change no
    result (`output`, `explain`, `checks`, `cache_gib`), so the same config rerun into another
    directory, or with another memory budget, keeps its hash."""
    experiment = {k: v for k, v in config.to_plain().items() if k not in ("output", "explain", "checks", "cache_gib")}
    canonical = json.dumps(experiment, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
