"""Seeded work without reseeding the caller's random number generators.

Pyro draws from torch's global generator (and dropout uses it), so training and posterior draws
cannot simply be handed a local ``torch.Generator``. Instead :func:`rng_scope` seeds the global
generators (torch's, and on an accelerator in use its own; numpy's; Python's ``random``) for the
work inside it and puts the caller's states back on exit, even after an error: the same seed
gives the same result, and a user's own random streams continue as if nothing had run.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pyro.util
import torch

__all__ = ["rng_scope", "seed_torch"]


def _accelerators() -> list:
    """``(get_state, set_state)`` of the accelerator generators in use now: CUDA once
    initialised (a model on a GPU initialises it) and MPS where there is one."""
    out = []
    if torch.cuda.is_initialized():
        out.append((torch.cuda.get_rng_state_all, torch.cuda.set_rng_state_all))
    if torch.backends.mps.is_available():
        out.append((torch.mps.get_rng_state, torch.mps.set_rng_state))
    return out


def seed_torch(seed: int) -> None:
    """Seed torch's CPU generator and those of the accelerators in use. Unlike
    ``torch.manual_seed``, leaves a CUDA that is not initialised alone (that would queue a
    reseed for whenever CUDA starts, outside any :func:`rng_scope`)."""
    torch.default_generator.manual_seed(int(seed))
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(int(seed))
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(int(seed))


@contextlib.contextmanager
def rng_scope(seed: int | None = None):
    """Run the block on the global generators seeded with ``seed`` (``None``: as they are,
    e.g. to set saved states inside), then restore the caller's states."""
    saved = pyro.util.get_rng_state()  # torch CPU, numpy's global, Python's random
    devices = [(get, put, get()) for get, put in _accelerators()]
    try:
        if seed is not None:
            seed_torch(seed)
            random.seed(seed)
            np.random.seed(seed)
        yield
    finally:
        pyro.util.set_rng_state(saved)
        for _, put, state in devices:
            put(state)
