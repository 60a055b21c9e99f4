"""Where a model runs: ``accelerator`` / ``device`` arguments (scvi-tools' conventions)."""

from __future__ import annotations

import os

import torch

__all__ = ["resolve_device", "module_device"]


def resolve_device(accelerator: str = "auto", device: int | str | torch.device = "auto"
                   ) -> torch.device:
    """The torch device that ``accelerator`` and ``device`` name (scvi-tools' conventions).

    Parameters
    ----------
    accelerator
        ``"auto"`` (a CUDA GPU when torch sees one, else the CPU; under ``torchrun``, only when
        the node has a GPU for each of its processes), ``"cpu"``, ``"gpu"``/``"cuda"`` or
        ``"mps"`` (Apple silicon).
    device
        ``"auto"`` (the current CUDA device, which ``torchrun`` sets per process), a device index
        such as ``1``, or a full name such as ``"cuda:1"`` (which then decides the accelerator).

    Raises
    ------
    ValueError
        For an unknown accelerator or a device that contradicts it.
    RuntimeError
        When the accelerator asked for is not available to this torch build.
    """
    if isinstance(device, str) and device != "auto" and not device.isdigit():
        named = torch.device(device)  # "cpu", "cuda:1", "mps"
        if accelerator not in ("auto", named.type) and not (
                accelerator == "gpu" and named.type == "cuda"):
            raise ValueError(f"device={device!r} does not match accelerator={accelerator!r}")
        accelerator, device = named.type, "auto" if named.index is None else named.index
    elif isinstance(device, torch.device):
        return resolve_device(accelerator, str(device))
    kind = str(accelerator).lower()
    if kind not in ("auto", "cpu", "gpu", "cuda", "mps"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu', 'cuda' or 'mps', got "
                         f"{accelerator!r}")
    if kind == "auto":
        # Under torchrun, a GPU only when every process on this node can have its own.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        kind = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= per_node \
            else "cpu"
    if kind == "gpu":
        kind = "cuda"
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise RuntimeError("accelerator='mps' but torch.backends.mps.is_available() is False")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"accelerator={accelerator!r} needs a CUDA GPU, but torch {torch.__version__} sees "
            "none (a CPU build of torch, or no driver); use accelerator='cpu'")
    index = torch.cuda.current_device() if device == "auto" else int(device)
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device={device!r}: torch sees {torch.cuda.device_count()} CUDA "
                         "device(s)")
    return torch.device("cuda", index)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device holding ``module``'s parameters (where its minibatches must go)."""
    return next(module.parameters()).device
