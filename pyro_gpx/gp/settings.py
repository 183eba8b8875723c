"""Numerical settings for computation-aware GPs, as context managers (in the style of GPyTorch).

Example::

    >>> from pyro_gpx.gp import settings
    >>> with settings.chunk_size(2048):
    ...     settings.chunk_size.rows(100_000)
    2048
"""

from __future__ import annotations

from .._validation import check_positive_int, is_finite_at_least

__all__ = ["chunk_size", "cholesky_jitter", "cg_tolerance"]


class _Setting:
    """A value with a default, changed for the duration of a ``with`` block."""

    _default: object = None
    _stack: list

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._stack = []

    def __init__(self, value):
        self._value = self._validate(value)

    @classmethod
    def _validate(cls, value):
        return value

    @classmethod
    def value(cls):
        return cls._stack[-1] if cls._stack else cls._default

    def __enter__(self):
        type(self)._stack.append(self._value)
        return self

    def __exit__(self, *exc):
        stack = type(self)._stack  # remove this block's own entry, also when blocks are exited out of order
        del stack[max(i for i, value in enumerate(stack) if value is self._value)]
        return False


class chunk_size(_Setting):
    """Rows of the kernel matrix formed at once in matrix-free products (memory ~ rows x n).

    ``None`` (default) picks about 2**24 kernel entries per chunk (64 MB in float32) for the
    generic autograd path, and 2**18 for the fused stationary products, whose chunks stay in cache.
    """

    _default = None
    _entries = 2**24
    _fused_entries = 2**18

    @classmethod
    def _validate(cls, value):
        return None if value is None else check_positive_int("chunk_size", value)

    @classmethod
    def rows(cls, num_columns: int, fused: bool = False) -> int:
        """Chunk rows for products with ``num_columns`` kernel columns."""
        value = cls.value()
        if value is not None:
            return value
        return max(8, (cls._fused_entries if fused else cls._entries) // max(num_columns, 1))


class cholesky_jitter(_Setting):
    """Initial jitter and number of tenfold escalations tried when a Cholesky factorisation fails."""

    _default = (1e-8, 6)

    @classmethod
    def _validate(cls, value):
        jitter, tries = value if isinstance(value, tuple) else (value, cls._default[1])
        whole = is_finite_at_least(tries, 0.0) and float(tries) == int(tries)  # 3 and 3.0, not 2.5 or NaN
        if not (is_finite_at_least(jitter, 0.0, strict=True) and whole):
            raise ValueError(f"cholesky_jitter needs a finite jitter > 0 and a whole number tries >= 0, got {value}")
        return float(jitter), int(tries)


class cg_tolerance(_Setting):
    """Relative residual tolerance of conjugate gradients (GPyTorch trains with 1; Maddox et al. advise <= 0.01)."""

    _default = 0.01

    @classmethod
    def _validate(cls, value):
        if not is_finite_at_least(value, 0.0, strict=True):  # NaN compared False and switched the tolerance off
            raise ValueError(f"cg_tolerance must be a finite number > 0, got {value}")
        return float(value)
