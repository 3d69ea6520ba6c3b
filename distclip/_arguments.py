"""Argument checks: every entry point's arguments are converted and checked here, at the call (or at
construction, for `GradClipper` and the integrations), with errors that say which argument was wrong, its
value, and what to pass instead."""

import math
from typing import Any


def as_float(value: Any, name: str) -> float:
    """``float(value)``, as ``torch.nn.utils`` converts it, with a clearer error of the same type."""
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise type(err)(
            f"`{name}` must be a real number (a float, an int, or a string such as 'inf'), "
            f"got {value!r} of type {type(value).__name__}"
        ) from err


def max_norm_value(max_norm: Any, sharded: bool) -> float:
    """``max_norm`` as a float. Single-process mode accepts what torch accepts (parity); sharded mode also
    rejects NaN and negative values, which would silently turn every gradient into NaN or flip its sign.
    """
    value = as_float(max_norm, "max_norm")
    if sharded and not value >= 0:
        raise ValueError(f"distclip: max_norm must be a non-negative number (inf disables clipping), got {max_norm!r}")
    return value


def norm_order(norm_type: float | str, sharded: bool) -> float:
    """``norm_type`` as a float p; in sharded mode, only the p that have a sharded meaning."""
    p = as_float(norm_type, "norm_type")
    if sharded and not p > 0 and p != -math.inf:
        raise ValueError(
            f"distclip: norm_type={norm_type!r} has no sharded meaning: with group= the norm is "
            "(sum over ranks of local_norm**p)**(1/p), defined for p > 0, inf and -inf. Use one of those, or "
            "clip on a single process with group=None for torch's own semantics"
        )
    return p
