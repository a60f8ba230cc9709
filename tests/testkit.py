"""What tests share beyond fixtures: the device tier's device, tiny random models, random tokens,
the golden version-1 run directories, circuitctl run in-process, two torchrun ranks.

(Imported as `testkit`, never as `conftest`: several directories have a conftest.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

# The device tier (tests/ground_truth, `-m device`) runs its models here:
#   CIRCUITCTL_TEST_DEVICE=cuda python -m pytest -m device
DEVICE = torch.device(os.environ.get("CIRCUITCTL_TEST_DEVICE", "cpu"))


def random_model(seed: int = 0, **overrides):
    """A tiny random HookedTransformer with LayerNorm and MLPs unless overridden."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    fields = dict(
        n_layers=2, d_model=16, n_ctx=12, d_head=4, n_heads=3, d_vocab=13, act_fn="gelu",
        normalization_type="LN", d_mlp=32, seed=seed,
    )
    fields.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**fields))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".w"):  # LayerNorm gains stay near one
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.4 * torch.randn(param.shape, generator=generator))
    return model.to(DEVICE)


def random_tokens(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def cli_exit_code(args: list[str]) -> int:
    """Run `circuitctl ARGS` in this process and return its exit code."""
    from circuitctl.cli.app import main

    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


GOLDEN = Path(__file__).resolve().parent / "golden" / "v1"  # run directories written by version 1


def golden_copy(name: str, root: Path) -> Path:
    """The golden version-1 run directory `name` (and the SAEs it reads) copied into `root`, with
    its recorded /tmp/golden paths rewritten to `root`."""
    root = Path(root)
    for part in (name, "saes"):
        shutil.copytree(GOLDEN / part, root / part, dirs_exist_ok=True)
    for file in (root / name).rglob("*"):
        if file.suffix in (".json", ".yaml") and file.is_file():
            file.write_text(file.read_text().replace("/tmp/golden", str(root)))
    return root / name


def torchrun(args: list[str], cwd: Path | None = None, python_path: tuple[str, ...] = (), timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` in a clean environment: no rank variables
    inherited from a surrounding run, offline, one thread per rank; `python_path` adds folders for
    the ranks' imports (a driver script that imports test helpers)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*python_path, env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
