"""Loading what a run needs from its config: the model adapter, the task data, the metric.

Shared by `discover` and `evaluate` so both read configs the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from circuitctl.config.schema import RunConfig
from circuitctl.errors import UsageError
from circuitctl.resources import SHIPPED_TASKS, resolve_path
from circuitctl.tasks.records import TaskSource, read_task


def read_task_source(config: RunConfig, config_dir: Path | None) -> TaskSource:
    path = resolve_path(config.task.path, config_dir) if config.task.path else None
    return read_task(config.task.name, path, SHIPPED_TASKS)


def check_model_source(config: RunConfig, config_dir: Path | None, require_weights: bool = True) -> Path | None:
    """Check the model source before anything heavy is loaded; return a local checkpoint's path.
    `require_weights=False` (validate): a pretrained name must be known, not downloadable now."""
    from circuitctl.models.sources import check_local_checkpoint, check_pretrained, official_name

    if config.model.path is None:
        (check_pretrained if require_weights else official_name)(config.model.name)
        return None
    path = resolve_path(config.model.path, config_dir)
    if not path.exists():
        raise UsageError(f"model.path: '{config.model.path}' does not exist")
    check_local_checkpoint(path)
    return path


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Session:
    config: RunConfig
    adapter: object  # ModelAdapter
    data: object  # TaskData
    metric: object  # Metric
    task: TaskSource
    task_signal: dict | None = None  # circuitctl.checks.check_task_signal's record, for the summary and circuit.json


def open_session(config: RunConfig, config_dir: Path | None) -> Session:
    """Validate the files, then load the model, tokenize the task and look up the metric."""
    task = read_task_source(config, config_dir)
    model_path = check_model_source(config, config_dir)
    from circuitctl.metrics.metrics import METRICS
    from circuitctl.models.adapter import ModelAdapter, load_model

    metric = METRICS.get(config.metric)
    seed_everything(config.seed)
    adapter = ModelAdapter(load_model(config.model.name, model_path, config.model.device, config.model.dtype, config.model.n_devices))
    data = load_task_data(config, task, adapter, metric)
    return Session(config, adapter, data, metric, task)


def load_task_data(config: RunConfig, task: TaskSource, adapter, metric):
    """The task's pairs (`config.task`'s subsample or generated count) tokenized for this model."""
    from circuitctl.tasks.data import task_pairs

    pairs = task_pairs(task, adapter.tokenizer, config.task.n_pairs, config.seed, config.task.options)
    return tokenize_task(pairs, task, adapter, metric)


def tokenize_task(pairs, task: TaskSource, adapter, metric):
    """Prompt pairs as `TaskData` for this model, checked: the metric's wrong answers, finite logits."""
    from circuitctl.tasks.data import tokenize_pairs

    if metric.needs_wrong_answers and any(not p.wrong_answers for p in pairs):
        first = next(p for p in pairs if not p.wrong_answers)
        where = f"{task.origin} line {first.line}" if first.line else task.origin
        raise UsageError(f"{where}: metric '{metric.name}' needs 'wrong_answers' for every pair (or use metric: kl)")
    tokenizer = adapter.tokenizer
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    data = tokenize_pairs(
        pairs,
        tokenizer,
        adapter.d_vocab,
        adapter.bos_token_id(),
        task.origin,
        pad_id=pad if pad is not None else 0,
        max_len=adapter.cfg.n_ctx,
    )
    check_finite_logits(adapter, data)
    return data


def check_finite_logits(adapter, data, n: int = 8) -> None:
    """Fail before a long method runs when the model's logits on the first pairs are NaN or
    infinite (NaN weights, or activations that overflow the dtype)."""
    import torch

    first = data.slice(0, min(n, data.n)).to(adapter.device)
    dtype = str(adapter.dtype).removeprefix("torch.")
    for name, tokens in (("clean", first.clean), ("corrupt", first.corrupt)):
        logits = adapter.run(tokens, first.answer_positions).logits
        if not bool(torch.isfinite(logits).all()):
            raise UsageError(
                f"the model produces NaN or infinite logits on the {name} prompts of the task's first pairs; "
                f"check the weights, and prefer model.dtype: float32 (it is {dtype})"
            )
