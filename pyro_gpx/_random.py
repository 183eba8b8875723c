"""Seeding a block of code without changing the caller's random streams."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import pyro
import torch


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed Pyro's random streams within the block, and give the caller's torch, NumPy and Python
    random states back afterwards (``None``: leave the streams alone)."""
    if seed is None:
        yield
        return
    numpy_state, python_state = np.random.get_state(), random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            pyro.set_rng_seed(seed)
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
