"""torch.distributed helpers shared by the stages: every helper is a no-op in a single process.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) :func:`init_distributed` creates the
process group (NCCL when CUDA is available, gloo otherwise). A process group created by the caller
(e.g. a test with ``init_method="file://..."``) is used as is.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hawq import HawqError


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Only the main process (rank 0) writes files and shows progress bars."""
    return get_rank() == 0


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; return ``(rank, world_size)``.

    Idempotent: returns the existing group's rank and size when one is initialised, and ``(0, 1)``
    when the process was not started by torchrun.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return 0, 1
    if not dist.is_available():
        raise HawqError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise HawqError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    """This process's accelerator (``cuda:LOCAL_RANK``) or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over the processes, in place; returns it (unchanged in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a small Python object from ``src`` to every process (in-memory only, never from files)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list:
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown_distributed() -> None:
    """Destroy the process group (call once at the end of a torchrun program); no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
