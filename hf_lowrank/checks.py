"""One set of validators: every bad value is reported as ``<where>.<field>=<value> ...; <fix>.``

A leaf module (standard library only). Config fields, strategy args, recipe options, data
options and layer sizes are checked with these, and a single bad value raises through
:func:`fail`, so every error reads the same way: the field, the value it had, and what to
give instead. Checks that relate two values or name a file or layer (capacity below rank, a
saved rank pattern, an unknown key) raise ``ValueError`` with the same three parts.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn


def fail(field: str, value: Any, fix: str) -> NoReturn:
    """Raise ``ValueError("<field>=<value!r> is not allowed; <fix>.")``."""
    text = repr(value)
    if len(text) > 200:  # a value from a file can be huge: name it, do not print it all
        text = f"{text[:160]}... ({len(text)} characters)"
    raise ValueError(f"{field}={text} is not allowed; {fix.rstrip('.')}.")


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any, minimum: float = -math.inf, inclusive: bool = False) -> bool:
    """A finite int or float (not a bool) above ``minimum`` (or equal to it, when ``inclusive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value >= minimum if inclusive else value > minimum


def check_choice(field: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        fail(field, value, f"choose one of {', '.join(map(repr, allowed))}")


def check_int(field: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not (is_int(value) and value >= minimum):
        fail(field, value, f"give an int >= {minimum}" + (" or None" if allow_none else ""))


def check_number(field: str, value: Any, minimum: float = 0.0, inclusive: bool = False) -> None:
    if not is_number(value, minimum, inclusive):
        fail(field, value, f"give a finite number {'>=' if inclusive else '>'} {minimum:g}")


def check_fraction(field: str, value: Any, low_open: bool = True, high_open: bool = False) -> None:
    """A number in (0, 1] (or [0, 1] when not ``low_open``; up to 1 excluded when ``high_open``)."""
    ok = is_number(value) and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        fail(field, value, f"give a number in {'(' if low_open else '['}0, 1{')' if high_open else ']'}")


def check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(field, value, "give true or false")


def check_size(field: str, value: Any, allow_none: bool = False) -> None:
    """A rank-like value: a positive int (absolute) or a float in (0, 1] (fraction of min(in, out))."""
    if value is None and allow_none:
        return
    if not ((is_int(value) and value >= 1) or (isinstance(value, float) and 0.0 < value <= 1.0)):
        fail(
            field,
            value,
            "give a positive int (absolute rank) or a float in (0, 1] (fraction of min(in_features, out_features))"
            + (" or None" if allow_none else ""),
        )


def resolve_size(value: int | float, in_features: int, out_features: int, name: str = "rank", layer: str = "") -> int:
    """Turn a rank-like value into an absolute rank for a layer of the given shape.

    A fraction is floored (at least 1), as the InRank and Cuttlefish authors size their
    factors: ``0.5`` of an odd ``min(in, out) = 65`` is 32. An int above ``min(in, out)``
    is an error naming the layer.
    """
    full = min(in_features, out_features)
    if isinstance(value, float):
        return max(1, min(full, math.floor(value * full + 1e-9)))
    if value > full:
        where = f" for layer {layer!r}" if layer else ""
        raise ValueError(
            f"LowRankConfig.{name}={value} is larger than min(in_features, out_features)={full}{where}; "
            f"use a rank <= {full}, a fraction such as 0.25, or exclude the layer with exclude_modules."
        )
    return value


def resolve_rank_and_capacity(
    rank: int | float, capacity: int | float | None, in_features: int, out_features: int, layer: str = ""
) -> tuple[int, int]:
    """``LowRankConfig.rank`` and ``capacity`` (None: the rank) as absolute sizes for one layer."""
    r = resolve_size(rank, in_features, out_features, "rank", layer)
    c = r if capacity is None else resolve_size(capacity, in_features, out_features, "capacity", layer)
    if c < r:
        raise ValueError(f"LowRankConfig.capacity resolves to {c} < rank {r} for layer {layer!r}; raise capacity.")
    return r, c


def check_layer_sizes(rank: Any, capacity: Any, out_features: int, in_features: int, where: str = "", fix: str = "") -> None:
    """The one size rule of a factorized layer: ``1 <= rank <= capacity <= min(in, out)``.

    ``where`` prefixes the message (a file and entry), ``fix`` ends it.
    """
    full = min(in_features, out_features)
    if not (is_int(rank) and is_int(capacity) and 1 <= rank <= capacity <= full):
        prefix = f"{where} has " if where else ""
        raise ValueError(
            f"{prefix}rank={rank!r}, capacity={capacity!r}, not allowed for this {out_features}x{in_features} layer: "
            f"need 1 <= rank <= capacity <= {full}.{' ' + fix if fix else ''}"
        )
