"""torch.distributed helpers shared by the stages: every helper is a no-op in a single process.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) :func:`init_distributed` creates the
process group (NCCL when CUDA is available, gloo otherwise). A process group created by the caller
(e.g. a test with ``init_method="file://..."``) is used as is.

Failures: :func:`run_on_main` and :func:`run_everywhere` turn an exception on one process into an
exception on every process (a :class:`PeerError` on those that did not fail), so no process waits
forever in a collective that a failed peer will never join.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

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
    """Destroy the process group (call once, on success, at the end of a torchrun program); no-op otherwise.
    The barrier first: a rank that tore down its gloo connections while a peer still used them could
    abort that peer ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


T = TypeVar("T")


class PeerError(HawqError):
    """Another process failed; this one stops with that process's message.

    The failing process (or rank 0, which always learns of the failure) reports the error, so a CLI
    prints a ``PeerError`` only on rank 0.
    """


def describe_error(e: BaseException) -> str:
    """One line for a peer: a HawqError's own message, otherwise ``Type: message``."""
    return str(e) if isinstance(e, HawqError) else f"{type(e).__name__}: {e}"


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Rank 0 runs ``fn`` (which must not use collectives); every process gets its result.

    If ``fn`` raises on rank 0, rank 0 re-raises it and the other processes raise a
    :class:`PeerError` with its message. In a single process this is ``fn(*args, **kwargs)``.
    The result travels by ``broadcast_object_list`` (in memory, between our own processes).
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            broadcast_object(("error", describe_error(e)))
            raise
        broadcast_object(("ok", result))
        return result
    kind, payload = broadcast_object(None)  # type: ignore[misc]
    if kind == "error":
        raise PeerError(payload)
    return payload


def run_everywhere(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Every process runs ``fn`` (no collectives inside); if any raises, every process raises.

    The lowest failing rank re-raises its own exception (marked ``relayed`` when it is not rank 0,
    since rank 0 reports it); every other process raises a :class:`PeerError` with that message,
    tagged with the failing rank when it is not 0. Use it where every process should fail alike
    (bad input found while building the run) so the error is printed once, not once per process.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    error: BaseException | None = None
    result = None
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001  (re-raised below, after the peers know)
        error = e
    messages = all_gather_object(None if error is None else describe_error(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return result  # type: ignore[return-value]
    first_rank, message = failed[0]
    if get_rank() == first_rank and error is not None:
        if first_rank != 0:
            error.relayed = True  # type: ignore[attr-defined]
        raise error
    raise PeerError(message if first_rank == 0 else f"{message} (on rank {first_rank})")


def is_relayed(e: BaseException) -> bool:
    """True for errors another process (rank 0) already reports: print them there, not here."""
    return isinstance(e, PeerError) or bool(getattr(e, "relayed", False))


def shard(items: Sequence[T], rank: int | None = None, world: int | None = None) -> list[T]:
    """This process's share of ``items``: items ``rank, rank + world, ...`` (disjoint; the union is all)."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    return list(items[rank::world])


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers into every process's ``module`` (in place)."""
    if not is_distributed():
        return
    via_cpu = dist.get_backend() != "nccl"  # gloo: accelerator tensors go through the CPU
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_contiguous() and (t.device.type == "cpu" or not via_cpu):
                dist.broadcast(t.data, src=src)
            else:
                buf = t.detach().cpu().contiguous() if via_cpu else t.detach().contiguous()
                dist.broadcast(buf, src=src)
                t.copy_(buf)
