"""`train-sae`: config -> SAEs in sae-lens's format plus metrics.json. Never prints.

Training saves its progress to ``OUTPUT_DIR/checkpoint/`` (every `checkpoint_every_seconds` and
on Ctrl-C); ``circuitctl train-sae CONFIG --resume OUTPUT_DIR`` continues it. The checkpoint is
removed once the SAEs and metrics.json are written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from circuitctl.checkpoint import Checkpoint
from circuitctl.config.load import config_hash
from circuitctl.errors import UsageError
from circuitctl.resources import SHIPPED_TASKS, resolve_path
from circuitctl.sae.config import TrainSaeConfig


@dataclass
class TrainSummary:
    out_dir: Path
    metrics: list  # SaeMetrics, one per site
    token_origin: str
    files: list[str]
    seconds: float


def _sites(config: TrainSaeConfig, model):
    from circuitctl.models.sae_sites import check_site
    from circuitctl.graph.naming import Site, parse_site

    if config.sites == "all":
        sites = [Site("embed", -1)]
        for layer in range(model.cfg.n_layers):
            sites += [Site("attn", layer)] + ([] if model.cfg.attn_only else [Site("mlp", layer)]) + [Site("resid", layer)]
        return sites
    sites = [parse_site(name) for name in config.sites]
    for site in sites:
        check_site(model, site)
    return sites


def _tokens(config: TrainSaeConfig, config_dir: Path | None, model):
    from circuitctl.sae.tokens import random_tokens, task_tokens, text_tokens, texts_tokens

    source, cfg, tokenizer = config.tokens, model.cfg, model.tokenizer
    bos = tokenizer.bos_token_id if tokenizer is not None and cfg.default_prepend_bos else None
    length = min(source.length or 64, cfg.n_ctx)
    if source.type == "random":
        return random_tokens(cfg.d_vocab, source.n_sequences, length, config.seed, bos)
    if source.type == "text":
        return text_tokens(resolve_path(source.path, config_dir), tokenizer, source.n_sequences, min(source.length or 128, cfg.n_ctx), bos)
    if source.type == "toy_language":
        from circuitctl.testing.toy_language import sample_corpus

        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        texts = sample_corpus(source.n_sequences, config.seed)
        origin = f"the toy language ({source.n_sequences} sequences, seed {config.seed})"
        return texts_tokens(texts, tokenizer, bos, min(source.length or cfg.n_ctx, cfg.n_ctx), origin, pad or 0)
    from circuitctl.tasks.data import task_pairs, tokenize_pairs
    from circuitctl.tasks.records import read_task

    path = resolve_path(source.path, config_dir) if source.path else None
    task = read_task(source.name, path, SHIPPED_TASKS)
    pairs = task_pairs(task, tokenizer, None, config.seed, source.options)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    data = tokenize_pairs(pairs, tokenizer, cfg.d_vocab, bos, task.origin, pad_id=pad if pad is not None else 0, max_len=cfg.n_ctx)
    return task_tokens(data, task.origin, source.n_sequences)


def output_checkpoint(out_dir: Path, config: TrainSaeConfig) -> Checkpoint:
    """The training checkpoint in `out_dir`, fingerprinted by every config section but `output`
    (the hash discovery runs use), so only the same training can continue from it."""
    return Checkpoint(out_dir, config_hash(config))  # type: ignore[arg-type]  # any config with to_plain()


def check_output_dir(out_dir: Path, force: bool) -> None:
    """A new training never overwrites another's files silently, nor picks up its checkpoint."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output.dir '{out_dir}' exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        if Checkpoint(out_dir, "").exists:
            raise UsageError(
                f"output.dir '{out_dir}' holds an interrupted training; continue it with --resume {out_dir}, "
                "choose another output.dir, or pass --force to start over"
            )
        raise UsageError(f"output.dir '{out_dir}' is not empty; choose another output.dir or pass --force to replace its files")


def check_resumable(out_dir: Path, config: TrainSaeConfig) -> Checkpoint:
    """The checkpoint of an interrupted training in `out_dir`, written by this same config."""
    if not out_dir.is_dir():
        raise UsageError(f"--resume: '{out_dir}' is not a directory")
    checkpoint = output_checkpoint(out_dir, config)
    if not checkpoint.exists:
        finished = " (it holds finished SAEs)" if (out_dir / "metrics.json").exists() else ""
        raise UsageError(f"--resume: '{out_dir}' has no checkpoint to resume{finished}")
    checkpoint.check()
    return checkpoint


def train_from_config(config: TrainSaeConfig, config_dir: Path | None = None, force: bool = False, resume: Path | None = None) -> TrainSummary:
    """Train and write the SAEs; `resume`: continue the interrupted training in that directory."""
    started = time.perf_counter()
    if resume is not None:
        out_dir = Path(resume)
        checkpoint = check_resumable(out_dir, config)
    else:
        out_dir = Path(config.output.dir)
        check_output_dir(out_dir, force)
        checkpoint = output_checkpoint(out_dir, config)
    model_path = None
    if config.model.path is not None:
        model_path = resolve_path(config.model.path, config_dir)
        if not model_path.exists():
            raise UsageError(f"model.path: '{config.model.path}' does not exist")
    if config.tokens.type == "text" and not resolve_path(config.tokens.path, config_dir).is_file():
        raise UsageError(f"tokens.path: '{config.tokens.path}' does not exist")

    import torch

    from circuitctl.versions import library_versions
    from circuitctl.io.files import write_atomic, write_json
    from circuitctl.models.adapter import load_model
    from circuitctl.models.sae_sites import SiteRunner, hook_name
    from circuitctl.sae.train import Checkpointing, TrainSettings, train_saes

    torch.manual_seed(config.seed)
    model = load_model(config.model.name, model_path, config.model.device, config.model.dtype, config.model.n_devices)
    model.eval()
    model.requires_grad_(False)
    sites = _sites(config, model)
    tokens = _tokens(config, config_dir, model)
    train, held_out = tokens.split(config.eval_fraction)
    d_sae = config.d_sae or 4 * model.cfg.d_model
    if config.architecture == "topk" and config.k > d_sae:
        raise UsageError(f"k ({config.k}) cannot exceed d_sae ({d_sae})")
    settings = TrainSettings(
        d_sae=d_sae,
        architecture=config.architecture,
        l1=(1.0 if config.l1 is None else config.l1) if config.architecture == "relu" else 0.0,
        k=config.k,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
    )
    runner = SiteRunner(model, sites)
    model_name = config.model.name or model.cfg.model_name
    if resume is None:
        checkpoint.clear()  # a stale checkpoint in a --force'd directory is not this training's
    checkpointing = Checkpointing(checkpoint, config.checkpoint_every_seconds, resume=resume is not None)
    results = train_saes(runner, train, held_out, settings, {s: hook_name(s) for s in sites}, model_name, checkpointing)

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for site, sae, _ in results:
        sae.save(out_dir / site.name)
        files += [f"{site.name}/cfg.json", f"{site.name}/sae_weights.safetensors"]
    seconds = time.perf_counter() - started
    write_json(
        out_dir / "metrics.json",
        {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_plain(),
            "tokens": {"origin": tokens.origin, "train_sequences": train.n, "held_out_sequences": held_out.n},
            "library_versions": library_versions(),
            "seconds": round(seconds, 3),
            "saes": [metrics.to_dict() for _, _, metrics in results],
        },
    )
    write_atomic(out_dir / "train_config.yaml", yaml.safe_dump(config.to_plain(), sort_keys=False))
    files += ["metrics.json", "train_config.yaml"]
    checkpoint.clear()  # the training is complete: nothing to resume
    return TrainSummary(out_dir, [m for _, _, m in results], tokens.origin, files, seconds)
