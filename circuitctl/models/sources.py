"""Cheap checks of a model source, made before torch or TransformerLens is imported.

Importing TransformerLens takes seconds, so a config that names a model which cannot load
should fail before that: a local checkpoint directory must hold its two files, and a
pretrained name must be one TransformerLens knows and, when downloads are impossible
(``HF_HUB_OFFLINE=1``, or the hub cannot be reached), already be in the Hugging Face cache.

TransformerLens's table of model names lives in ``transformer_lens/supported_models.py``, a
pure-data module; it is read here with ``ast.literal_eval`` so that nothing is imported.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from circuitctl.errors import UsageError
from circuitctl.registry import closest

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_TRUE = {"1", "on", "yes", "true"}


def check_local_checkpoint(path: Path) -> tuple[Path, Path]:
    """(config file, weights file) of a local checkpoint directory, or a UsageError."""
    if not path.is_dir():
        raise UsageError(f"model.path: '{path}' is not a directory")
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise UsageError(f"model.path: '{path}' has no {CONFIG_FILE} (HookedTransformerConfig fields)")
    if not weights_file.is_file():
        raise UsageError(f"model.path: '{path}' has no {WEIGHTS_FILE} (the state dict)")
    return config_file, weights_file


# -- pretrained names ---------------------------------------------------------------------
@lru_cache(maxsize=1)
def _alias_map() -> dict[str, str] | None:
    """Lower-cased official names and aliases -> official name; None if the table is unreadable."""
    spec = importlib.util.find_spec("transformer_lens")
    if spec is None or not spec.submodule_search_locations:
        return None
    table = Path(list(spec.submodule_search_locations)[0]) / "supported_models.py"
    try:
        values = {}
        for node in ast.parse(table.read_text()).body:
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and target.id in ("OFFICIAL_MODEL_NAMES", "MODEL_ALIASES"):
                values[target.id] = ast.literal_eval(node.value)
        official, aliases = values["OFFICIAL_MODEL_NAMES"], values["MODEL_ALIASES"]
    except (OSError, SyntaxError, ValueError, KeyError):
        return None  # another TransformerLens layout: leave the checks to the loader
    mapping: dict[str, str] = {}
    for name in official:
        for alias in aliases.get(name, []):
            mapping[alias.lower()] = name
        mapping[name.lower()] = name
    return mapping


def official_name(name: str) -> str | None:
    """TransformerLens's official name for `name` (an alias is fine); None if unknown here."""
    mapping = _alias_map()
    if mapping is None:
        return None
    if name.lower() not in mapping:
        suggestion = closest(name.lower(), list(mapping))
        hint = f"; did you mean '{mapping[suggestion]}'?" if suggestion else ""
        raise UsageError(
            f"model.name: '{name}' is not a pretrained model TransformerLens knows{hint} "
            "(for your own checkpoint use model.path)"
        )
    return mapping[name.lower()]


def hf_offline() -> bool:
    """Whether Hugging Face downloads are switched off by the environment."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_cache_dir() -> Path:
    from huggingface_hub import constants  # light: no torch

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def hf_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def is_cached(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds a snapshot of `repo_id`."""
    snapshots = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (None if it can, or if a proxy decides that)."""
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(hf_endpoint())
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return None
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or exc}"


def check_pretrained(name: str) -> None:
    """Fail fast when a pretrained model cannot be loaded: unknown name, or not cached and
    not downloadable. Otherwise leave it to the loader."""
    official = official_name(name)
    if official is None or is_cached(official):
        return
    label = f"'{name}'" if official == name else f"'{name}' ({official})"
    fix = (
        f"download it once where the network is reachable (circuitctl loads it through "
        f"TransformerLens into {hf_cache_dir()}), or use a local checkpoint with model.path"
    )
    if hf_offline():
        raise UsageError(
            f"model.name: {label} is not in the Hugging Face cache and offline mode "
            f"(HF_HUB_OFFLINE=1) forbids downloading it; {fix}"
        )
    reason = hub_unreachable()
    if reason is not None:
        raise UsageError(
            f"model.name: {label} is not in the Hugging Face cache and the hub cannot be "
            f"reached ({reason}); {fix}"
        )


def pretrained_cache_note(name: str) -> str | None:
    """For `validate`: the name must be one TransformerLens knows (a UsageError otherwise), but a
    model absent from the Hugging Face cache is only a note, and the network is never tried."""
    official = official_name(name)
    if official is None or is_cached(official):
        return None
    label = f"'{name}'" if official == name else f"'{name}' ({official})"
    return (
        f"model {label} is not in the Hugging Face cache ({hf_cache_dir()}): `discover` downloads it, which "
        "needs the network (and, for gated models, an accepted licence and a token); with HF_HUB_OFFLINE=1 it stops"
    )
