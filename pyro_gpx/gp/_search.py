"""One-dimensional maximisation: the best point of a grid, then golden-section search between its neighbours."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def grid_golden_bracket(f: Callable[[float], float], grid: Sequence[float], tol: float) -> tuple[float, float]:
    """The final bracket ``(lo, hi)``, narrower than ``tol``, around a maximiser of ``f``: the grid
    neighbours of the best grid point, narrowed by golden-section search (one new ``f`` value per
    step; a unimodal ``f`` between the neighbours is assumed)."""
    values = [f(x) for x in grid]
    best = max(range(len(grid)), key=values.__getitem__)
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    c, d = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fc, fd = f(c), f(d)
    while hi - lo > tol:
        if fc >= fd:
            hi, d, fd = d, c, fc
            c = hi - _GOLDEN * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + _GOLDEN * (hi - lo)
            fd = f(d)
    return lo, hi
