"""Coefficient: the factor every gradient is scaled by, min(max_norm / (total_norm + 1e-6), 1)."""

from typing import Any

import torch
from torch import Tensor

from distclip._checks import as_float


def max_norm_value(max_norm: Any, sharded: bool) -> float:
    """``max_norm`` as a float. Single-process mode accepts what torch accepts (parity); sharded mode also
    rejects NaN and negative values, which would silently turn every gradient into NaN or flip its sign.
    """
    value = as_float(max_norm, "max_norm")
    if sharded and not value >= 0:
        raise ValueError(f"distclip: max_norm must be a non-negative number (inf disables clipping), got {max_norm!r}")
    return value


def clip_coefficient(max_norm: float | Tensor, total_norm: Tensor) -> Tensor:
    """``min(max_norm / (total_norm + 1e-6), 1)`` as a 0-d tensor beside ``total_norm``.

    Always applied, also when it is 1: a ``coef < 1`` test would synchronise the host with the device.
    """
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
