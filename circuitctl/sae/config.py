"""The `train-sae` config: one pydantic model per section, unknown keys rejected (no torch).

    model:   {path: models/toy-gpt}            # or {name: gpt2}; as in run configs
    sites:   [resid0, mlp1]                     # or "all" (embed and every attn/mlp/resid)
    architecture: relu                          # relu (L1 penalty) | topk
    d_sae: 256                                  # default 4 x d_model
    l1: 1.0                                     # relu only; activations are scaled to mean norm sqrt(d_model)
    k: 8                                        # topk only
    steps: 1000
    batch_size: 512                             # activations per step
    lr: 0.001
    tokens: {type: random, n_sequences: 2048, length: 32}   # uniform random token streams
                                                            # | {type: text, path: corpus.txt}
                                                            # | {type: task, name: ioi} or {type: task, path: tasks/x}
                                                            # | {type: toy_language}: the synthetic language of
                                                            #   models/toy-gpt (circuitctl.testing.toy_language)
    output: {dir: saes/toy}
    seed: 0
    checkpoint_every_seconds: 30                # progress saved to OUTPUT_DIR/checkpoint (and on Ctrl-C)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from circuitctl.config.load import apply_overrides, read_yaml
from circuitctl.config.schema import ModelConfig, Section
from circuitctl.errors import UsageError
from circuitctl.registry import closest
from circuitctl.graph.naming import is_site_name


class TokenSourceConfig(Section):
    type: Literal["random", "text", "task", "toy_language"] = "random"
    path: Optional[str] = Field(None, description="text: a text file; task: a task YAML spec or JSONL of prompt pairs")
    name: Optional[str] = Field(None, description="task: a shipped task or task generator")
    n_sequences: int = Field(2048, ge=2, description="sequences to read (at most)")
    length: Optional[int] = Field(None, ge=2, description="tokens per sequence (random, text); default min(n_ctx, 64)")
    options: dict[str, Any] = Field(default_factory=dict, description="task generator options")

    @model_validator(mode="after")
    def _sources(self):
        if self.type in ("random", "toy_language") and (self.path or self.name):
            raise ValueError(f"tokens.type '{self.type}' takes no path or name")
        if self.type == "text" and (not self.path or self.name):
            raise ValueError("tokens.type 'text' needs tokens.path (a text file) and no name")
        if self.type == "task" and (self.path is None) == (self.name is None):
            raise ValueError("tokens.type 'task' needs exactly one of tokens.name or tokens.path")
        return self


class SaeOutputConfig(Section):
    dir: str = Field(..., description="where the SAEs (one sub-directory per site) and metrics.json go")


class TrainSaeConfig(Section):
    model: ModelConfig
    sites: Union[Literal["all"], list[str]]
    architecture: Literal["relu", "topk"] = "relu"
    d_sae: Optional[int] = Field(None, ge=1, description="features per SAE (default 4 x d_model)")
    l1: Optional[float] = Field(None, ge=0, description="relu: L1 coefficient (default 1.0)")
    k: Optional[int] = Field(None, ge=1, description="topk: active features per token")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(512, ge=1, description="activations per training step")
    lr: float = Field(1e-3, gt=0)
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="sequences held out for the metrics")
    tokens: TokenSourceConfig = TokenSourceConfig()
    output: SaeOutputConfig
    seed: int = 0
    checkpoint_every_seconds: float = Field(
        30.0, ge=0, description="save resumable training progress to OUTPUT_DIR/checkpoint this often (and on Ctrl-C)"
    )

    @field_validator("sites")
    @classmethod
    def _site_names(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one site, or 'all'")
            for name in value:
                if not is_site_name(name):
                    raise ValueError(f"'{name}' is not a site (embed, attn<L>, mlp<L> or resid<L>, e.g. resid0, mlp3)")
            if len(set(value)) != len(value):
                raise ValueError("a site is listed twice")
        return value

    @model_validator(mode="after")
    def _architecture(self):
        if self.architecture == "relu" and self.k is not None:
            raise ValueError("k is for architecture 'topk'; a relu SAE takes l1")
        if self.architecture == "topk":
            if self.k is None:
                raise ValueError("architecture 'topk' needs k (active features per token)")
            if self.l1 is not None:
                raise ValueError("l1 is for architecture 'relu'; a topk SAE takes k")
            if self.d_sae is not None and self.k > self.d_sae:
                raise ValueError(f"k ({self.k}) cannot exceed d_sae ({self.d_sae})")
        return self

    def to_plain(self) -> dict:
        return self.model_dump(mode="json")


def _describe(error: dict, lines: dict[tuple, int]) -> str:
    loc = tuple(str(p) for p in error["loc"] if not str(p).startswith("function-") and not str(p).startswith("literal["))
    line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
    where = ".".join(loc) or "(top level)"
    where += f" (line {line})" if line else ""
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        section = {"tokens": TokenSourceConfig, "output": SaeOutputConfig, "model": ModelConfig}.get(loc[0], TrainSaeConfig) if len(loc) > 1 else TrainSaeConfig
        hint = closest(loc[-1], list(section.model_fields))
        message = "unknown key" + (f"; did you mean '{hint}'?" if hint else "")
    elif error["type"] == "missing":
        message = "required but missing"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return f"{where}: {message}"


def validate_train_config(data: Any, source: str = "config", lines: dict[tuple, int] | None = None) -> TrainSaeConfig:
    if not isinstance(data, dict):
        raise UsageError(f"{source}: a train-sae config must be a YAML mapping with sections model, sites, output, ...")
    try:
        return TrainSaeConfig.model_validate(data)
    except ValidationError as exc:
        problems = sorted({_describe(e, lines or {}) for e in exc.errors()})
        header = f"{source} is not a valid train-sae config ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"
        raise UsageError(header + "\n  - " + "\n  - ".join(problems)) from None


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainSaeConfig:
    path = Path(path)
    data, lines = read_yaml(path)
    if data is None:
        raise UsageError(f"{path}: the config file is empty")
    if isinstance(data, dict):
        data = apply_overrides(data, list(overrides or []))
    return validate_train_config(data, str(path), lines)
