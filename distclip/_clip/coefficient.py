"""Coefficient: the factor every gradient is scaled by, min(max_norm / (total_norm + 1e-6), 1)."""

import torch
from torch import Tensor


def clip_coefficient(max_norm: float | Tensor, total_norm: Tensor) -> Tensor:
    """``min(max_norm / (total_norm + 1e-6), 1)`` as a 0-d tensor beside ``total_norm``.

    Always applied, also when it is 1: a ``coef < 1`` test would synchronise the host with the device.
    """
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
