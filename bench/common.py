"""Shared helpers for the benchmarks: model shapes, timing, peak memory, result tables.

Each measurement runs in a fresh subprocess so its peak RSS is its own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    # GPT-2 small's shape with random weights: same cost as the real model, no download
    "gpt2-small-shape": dict(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024,
        act_fn="gelu_new", normalization_type="LN",
    ),
    "tiny": dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=64, n_ctx=32, act_fn="gelu", normalization_type="LN"),
}


def build_model(shape: str, seed: int = 0, **overrides):
    warnings.filterwarnings("ignore")
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    fields = {**SHAPES[shape], **overrides, "seed": seed}
    return HookedTransformer(HookedTransformerConfig(**fields))


def random_pairs(vocab: int, n: int, length: int, seed: int = 0):
    """IOI-shaped random prompt pairs: n clean and n corrupt prompts of `length` tokens, one
    answer and one wrong answer each, read at the last token (the same draws for every benchmark)."""
    import torch

    from circuitctl.tasks.data import TaskData

    g = torch.Generator().manual_seed(seed)

    def tokens(*shape):
        return torch.randint(0, vocab, shape, generator=g)

    return TaskData(tokens(n, length), tokens(n, length), torch.full((n,), length), tokens(n, 1), tokens(n, 1), {})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_it(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_inner(script: str, args: list[str]) -> dict:
    """Run `script --inner ARGS` in a subprocess and parse the JSON it prints last."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, script, "--inner", *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script} {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path
