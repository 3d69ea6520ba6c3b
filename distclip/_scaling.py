"""In-place scaling: every local gradient times the clip coefficient, and value clipping."""

import torch
from torch import Tensor

from distclip._foreach import kernel_groups


def scale_(grads: list[Tensor], coefficient: Tensor, foreach: bool | None) -> None:
    """``g *= coefficient`` for every gradient, one foreach kernel per device/dtype group."""
    for device, _, group, use_foreach in kernel_groups(grads, foreach):
        coefficient_on_device = coefficient.to(device)
        if use_foreach:
            torch._foreach_mul_(group, coefficient_on_device)
        else:
            for g in group:
                g.mul_(coefficient_on_device)


def clamp_(grads: list[Tensor], clip_value: float, foreach: bool | None) -> None:
    """``g = clamp(g, -clip_value, clip_value)`` for every gradient, in place."""
    for _, _, group, use_foreach in kernel_groups(grads, foreach):
        if use_foreach:
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for g in group:
                g.clamp_(min=-clip_value, max=clip_value)
