"""The run config: one pydantic model per section, unknown keys rejected everywhere."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from circuitctl.config.methods import MethodSettings

METRIC_NAMES = ("logit_diff", "prob_diff", "kl")  # built in (circuitctl/metrics/metrics.py)


def metric_names() -> list[str]:
    """Built-in metrics and plugin metrics (entry points are listed, not loaded: no torch)."""
    from circuitctl.registry import entry_point_names

    return sorted(set(METRIC_NAMES) | set(entry_point_names("circuitctl.metrics")))
ABLATION_TYPES = ("resample", "zero", "mean")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_empty(value: Optional[str]) -> Optional[str]:
    if value is not None and not value.strip():
        raise ValueError("must not be empty")
    return value


class ModelConfig(Section):
    name: Optional[str] = Field(None, description="a TransformerLens pretrained model name, e.g. gpt2")
    path: Optional[str] = Field(None, description="a local checkpoint directory (config.json + model.safetensors)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    n_devices: int = Field(
        1, ge=1, description="GPUs to split the model's layers over (TransformerLens n_devices); only 1 is supported yet"
    )

    _names = field_validator("name", "path")(_not_empty)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of model.name (pretrained) or model.path (local checkpoint)")
        return self

    @field_validator("n_devices")
    @classmethod
    def _one_device(cls, value: int) -> int:
        # circuitctl.models.adapter runs the blocks itself and stacks every node's output into one
        # tensor, so a model whose layers TransformerLens spread over several GPUs cannot run yet
        if value > 1:
            raise ValueError(
                f"{value}: splitting one model's layers over several GPUs (TransformerLens n_devices) is not "
                "supported yet; use model.dtype: bfloat16 and max_batch_size on one GPU (README: Scale), or "
                "torchrun to split the examples over GPUs"
            )
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"'{value}' is not a device (auto, cpu, cuda, cuda:N)")


class TaskConfig(Section):
    name: Optional[str] = Field(None, description="a shipped task or a task generator")
    path: Optional[str] = Field(None, description="a task YAML spec, or a JSONL file of prompt pairs")
    n_pairs: Optional[int] = Field(None, ge=1, description="use (or generate) this many pairs")
    options: dict[str, Any] = Field(default_factory=dict, description="options for a task generator")

    _names = field_validator("name", "path")(_not_empty)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of task.name or task.path")
        return self


class AblationConfig(Section):
    type: Literal["resample", "zero", "mean"] = "resample"
    per_position: bool = Field(True, description="mean ablation: average per position (else over all positions)")


class SelectionConfig(Section):
    top_n: Optional[int] = Field(None, ge=1)
    threshold: Optional[float] = Field(None, ge=0)
    fraction: Optional[float] = Field(None, gt=0, le=1)
    absolute: bool = Field(True, description="rank by |score| (else by signed score)")
    prune: bool = Field(True, description="drop edges with no path from input or to logits")
    reselect: bool = Field(
        False,
        description="apply top_n / threshold / fraction also to methods that choose their own circuit "
        "(acdc, path_patching, cdt, sfc): re-select their units by score",
    )

    @model_validator(mode="after")
    def _at_most_one(self):
        given = [k for k in ("top_n", "threshold", "fraction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of top_n, threshold, fraction (got {', '.join(given)})")
        return self

    @property
    def is_default(self) -> bool:
        return self.top_n is None and self.threshold is None and self.fraction is None


class OutputConfig(Section):
    dir: Optional[str] = Field(None, description="run directory; default runs/<task>-<method>-<time>")


class ChecksConfig(Section):
    """Checks run before a method (circuitctl.checks); they never change a result, only refuse or allow a run."""

    allow_small_gap: bool = Field(
        False, description="run even when the task has no clean-corrupt gap (f(C) is then undefined and scores are noise)"
    )


class RunConfig(Section):
    model: ModelConfig
    task: TaskConfig
    method: SerializeAsAny[MethodSettings]  # the settings class of the named method (METHODS)
    ablation: AblationConfig = AblationConfig()
    metric: str = Field(
        "logit_diff",
        description="a built-in metric (logit_diff, prob_diff, kl) or a plugin metric; "
        "omitted: the task's metric (task.yaml `metric:`), else logit_diff",
    )
    selection: SelectionConfig = SelectionConfig()
    output: OutputConfig = OutputConfig()
    checks: ChecksConfig = ChecksConfig()
    seed: int = Field(0, ge=-(2**63), le=2**64 - 1, description="random seed (the range torch.manual_seed accepts)")
    cache_gib: Optional[float] = Field(
        None,
        ge=0,
        description="accelerator memory (GiB) for the batches that evaluation and ACDC keep between uses; beyond it "
        "they wait on the host (or are recomputed); default: half the GPU's free memory, no limit on the CPU",
    )
    explain: bool = Field(True, description="explain the circuit at the end of discover (circuitctl explain RUN_DIR)")
    max_batch_size: Optional[int] = Field(
        None,
        ge=1,
        description="cap on examples per forward pass for discovery and evaluation, whatever method.batch_size says "
        "(batches also halve automatically when the GPU runs out of memory)",
    )

    @property
    def batch_size(self) -> int:
        """Examples per forward pass: method.batch_size, capped by max_batch_size."""
        return min(self.method.batch_size, self.max_batch_size or self.method.batch_size)

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        names = metric_names()
        if value not in names:
            from circuitctl.registry import unknown_name_message

            raise ValueError(unknown_name_message("metric", value, names))
        return value

    @field_validator("method", mode="before")
    @classmethod
    def _method_settings(cls, value):
        """Validate `method` with its own method's settings class, so that a dumped config
        validates back to the same settings (`RunConfig.model_validate(config.to_plain())`)."""
        if isinstance(value, MethodSettings):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            from circuitctl.config.methods import METHODS

            if value["name"] in METHODS:
                return METHODS.get(value["name"]).settings.model_validate(value)
        return value

    @field_validator("ablation", mode="before")
    @classmethod
    def _ablation_shorthand(cls, value):
        return {"type": value} if isinstance(value, str) else value

    def to_plain(self) -> dict:
        data = self.model_dump(mode="json")
        data["method"] = self.method.model_dump(mode="json")
        return data
