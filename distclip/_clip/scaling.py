"""In-place scaling: every local gradient times the clip coefficient, and value clipping."""

import torch
from torch import Tensor

from distclip._clip import threads
from distclip._clip.foreach import kernel_groups


def scale_(grads: list[Tensor], coefficient: Tensor, foreach: bool | None) -> None:
    """``g *= coefficient`` for every gradient, one foreach kernel per device/dtype group."""
    for device, _, group, use_foreach in kernel_groups(grads, foreach):
        _scale_group_(group, coefficient.to(device), use_foreach)


def _scale_group_(group: list[Tensor], coefficient: Tensor, use_foreach: bool) -> None:
    if use_foreach:
        torch._foreach_mul_(group, coefficient)
    else:
        for g in group:
            g.mul_(coefficient)


def scale_parts_(parts: list[list[Tensor]], coefficient: Tensor, use_foreach: bool) -> None:
    """`scale_` of one device/dtype group split into ``parts`` (`threads.split`), the parts on threads at once."""
    threads.map_parts(lambda part: _scale_group_(part, coefficient, use_foreach), parts)


def clamp_(grads: list[Tensor], clip_value: float, foreach: bool | None) -> None:
    """``g = clamp(g, -clip_value, clip_value)`` for every gradient, in place."""
    for _, _, group, use_foreach in kernel_groups(grads, foreach):
        if use_foreach:
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for g in group:
                g.clamp_(min=-clip_value, max=clip_value)
