"""Data-parallel training across processes with ``torch.distributed`` (``strategy="ddp"``).

Launch one process per device (or per group of CPU cores) with ``torchrun``::

    torchrun --nproc-per-node 4 -m pyro_totalvi train data.h5ad --out results/ --distributed

Every process builds the same model and the same train/validation split, reads its own share of
each minibatch, and the gradients are averaged across processes after every backward pass, so the
processes take identical optimiser steps and hold identical parameters throughout.

Why no ``torch.nn.parallel.DistributedDataParallel`` wrapper: DDP averages gradients from hooks
that it installs on the wrapped module's ``forward``; the Pyro model and guide call the submodules
(encoder, decoders) directly and never the wrapper's ``forward``, so those hooks would not fire.
:func:`all_reduce_gradients` does what DDP does — one all-reduce of all gradients, divided by
the number of processes, between ``loss.backward()`` and ``optimizer.step()`` — explicitly, in a
single collective (DDP overlaps its buckets with the backward pass; with these network sizes the
difference is small).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedSetupError",
    "LAUNCH_HELP",
    "launched_by_torchrun",
    "default_backend",
    "init_distributed",
    "is_initialized",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "broadcast_module",
    "all_reduce_gradients",
    "average_batchnorm_stats",
    "all_reduce_sum",
    "broadcast_object",
    "shard",
]

#: Environment variables that ``torchrun`` sets for each process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

LAUNCH_HELP = (
    "strategy='ddp' needs a torch.distributed process group: launch one process per device with "
    "torchrun, e.g.\n"
    "  torchrun --nproc-per-node 2 -m pyro_totalvi train data.h5ad --out results/ --distributed\n"
    "  torchrun --nproc-per-node 2 my_script.py   # where my_script.py calls "
    "model.train(strategy='ddp')\n"
    "(torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or call "
    "torch.distributed.init_process_group(...) yourself before training. For one process, "
    "leave strategy=None."
)


class DistributedSetupError(RuntimeError):
    """Distributed training was asked for but no process group exists or can be made."""


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its environment variables are set)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def default_backend() -> str:
    """``gloo`` for CPU tensors; with CUDA, ``nccl`` for CUDA tensors and ``gloo`` for CPU ones.

    The mixed form ``"cpu:gloo,cuda:nccl"`` routes each collective by the device of its tensors,
    so collectives work wherever the parameters live.
    """
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    Does nothing when a group is already initialised. Returns ``True`` when this call created the
    group (the caller may then ``torch.distributed.destroy_process_group()`` at the end). Raises
    :class:`DistributedSetupError`, explaining how to launch, outside torchrun.
    """
    if not dist.is_available():
        raise DistributedSetupError("this torch build has no torch.distributed support")
    if dist.is_initialized():
        return False
    if not launched_by_torchrun():
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        raise DistributedSetupError(f"{LAUNCH_HELP}\n(missing environment variables: {missing})")
    local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if 0 <= local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # one GPU per process on a node
    dist.init_process_group(backend=backend or default_backend())  # init_method="env://"
    return True


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process; 0 without a process group (or ``RANK`` before one exists)."""
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0: the process that prints and writes results."""
    return get_rank() == 0


# ----------------------------------------------------------------------------------------------
def _comm(t: torch.Tensor) -> torch.Tensor:
    """``t`` on a device the process group's backend accepts (a group made with plain "nccl"
    by the user takes CUDA tensors only; gloo and the default mixed backend take both)."""
    if t.device.type != "cuda" and dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def _flat(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return _comm(torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors]))


def _unflatten_into(flat: torch.Tensor, tensors: Iterable[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))  # copy_ also moves it back
        offset += n


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of rank ``src`` to all processes (one collective per
    dtype). Initial weights, the empirical background prior (c, d) and the library-size prior
    buffers are then rank 0's on every process, whatever each process computed."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in [*module.parameters(), *module.buffers()]:
        groups.setdefault((t.device, t.dtype), []).append(t.data)
    for (_device, dtype), tensors in groups.items():
        flat = _flat(tensors, dtype)
        dist.broadcast(flat, src)
        _unflatten_into(flat, tensors)


@torch.no_grad()
def all_reduce_gradients(params: Sequence[nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Average ``.grad`` of ``params`` over all processes in place, as DDP does; return the
    average of ``loss`` over the processes.

    One all-reduce carries the gradients, a has-gradient flag per parameter and the loss. A
    parameter without a gradient on some process counts as zero there (DDP's
    ``find_unused_parameters``); one without a gradient anywhere keeps ``grad = None``.
    """
    world = dist.get_world_size()
    dtype = params[0].dtype
    pieces = [p.grad.reshape(-1).to(dtype) if p.grad is not None
              else torch.zeros(p.numel(), dtype=dtype, device=p.device) for p in params]
    flags = torch.tensor([p.grad is not None for p in params], dtype=dtype,
                         device=params[0].device)
    flat = _comm(torch.cat([*pieces, flags, loss.detach().reshape(1).to(dtype)]))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    n_params = len(params)
    flags = flat[-1 - n_params : -1]
    for i, p in enumerate(params):
        n = p.numel()
        if flags[i] > 0:
            g = flat[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n
    return flat[-1].to(device=loss.device, dtype=loss.dtype)


@torch.no_grad()
def average_batchnorm_stats(module: nn.Module) -> None:
    """Average BatchNorm running means and variances over the processes (each saw other cells
    this epoch), so that evaluation, checkpoints and the final model agree everywhere."""
    tensors = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var) if b is not None]
    if not tensors:
        return
    flat = _flat(tensors, tensors[0].dtype)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    _unflatten_into(flat, tensors)


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum Python numbers over the processes (in float64)."""
    t = _comm(torch.tensor(list(values), dtype=torch.float64))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every process (pickled)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """The ``rank``-th of ``world`` contiguous, nearly equal parts of ``indices``."""
    return np.array_split(indices, world)[rank]
