"""Value checks shared by every config dataclass: one message shape, `<key> must be <expected>, got <value>`.

Torch-free, like the dataclasses that use them (the workflow validates stage configs at parse time)."""

from __future__ import annotations

import math
from typing import Any

from bsq.errors import BSQError

__all__ = ["is_int", "is_number", "require", "bit_range"]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise BSQError(f"{key} must be {expected}, got {value!r}")


def bit_range(value: Any, key: str, allow_zero: bool = False) -> list[int]:
    """A `[min, max]` pair of integer bit-widths within 0 (or 1) .. 16."""
    low = 0 if allow_zero else 1
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) for v in value)
    require(ok and low <= value[0] <= value[1] <= 16, key, f"[min, max] integer bits, {low} <= min <= max <= 16", value)
    return list(value)
