"""Data-parallel runs with torch.distributed (``torchrun --nproc-per-node N -m circuitctl ...``).

Every rank loads the same model and the same examples, scores a contiguous share of the
examples (`shard`) and all-reduces its sums (`all_reduce_sum`), so every rank ends with the
totals of a single-process run (up to the order of floating-point additions) and takes the
same decisions. Only the main rank writes files (`is_main`).

`init_from_env()` starts the process group from the variables torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo on CPU, nccl on CUDA with the rank's
own GPU (cuda:LOCAL_RANK). In a plain process it does nothing and every helper here is the
identity. torch is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import atexit
import os


def requested() -> bool:
    """Whether this process was started by torchrun (or similar) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init_from_env(device: str = "auto") -> None:
    """Join the process group described by the environment (no-op without one, or if joined)."""
    if not requested():
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    use_cuda = (device == "auto" or device.startswith("cuda")) and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    atexit.register(_shutdown)


def _shutdown() -> None:
    dist = _dist()
    if dist is not None:
        # wait for every rank before tearing down: a rank that destroys the group while
        # another still talks to it makes gloo abort ("terminate called without an active exception")
        try:
            dist.barrier()
        except Exception:  # a rank already failed; tear down anyway
            pass
        dist.destroy_process_group()


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device_for(device: str) -> str:
    """The device this rank uses for `device` ('auto' or 'cuda' mean this rank's GPU)."""
    dist = _dist()
    if dist is None or dist.get_backend() != "nccl":
        return device
    if device in ("auto", "cuda"):
        return f"cuda:{local_rank()}"
    return device


def shard_range(n: int) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of n examples (shares differ by at most one)."""
    size, r = world_size(), rank()
    return r * n // size, (r + 1) * n // size


def shard(data):
    """This rank's share of a `TaskData` (the whole of it in a single process)."""
    if world_size() == 1:
        return data
    start, stop = shard_range(data.n)
    return data.slice(start, stop)


def all_reduce_sum(tensor):
    """The sum of `tensor` over all ranks (a new tensor on tensor's device; `tensor` itself in a
    single process). Every rank must call it, in the same order."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return tensor
    import torch

    if dist.get_backend() == "nccl":
        work = tensor.to(torch.device("cuda", torch.cuda.current_device()), copy=True)
    else:
        work = tensor.to("cpu", copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def gather_rows(local, n: int):
    """Per-example rows of this rank's share (`shard_range(n)`, leading dim) placed in a zero
    tensor of n rows and summed over ranks: every rank gets all n rows (`local` in a single process)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return local
    import torch

    start, stop = shard_range(n)
    rows = torch.zeros((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
    rows[start:stop] = local
    return all_reduce_sum(rows)


def broadcast_from_main(value):
    """`value` as given on the main rank, on every rank (any picklable object)."""
    dist = _dist()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
