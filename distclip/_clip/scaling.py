"""In-place scaling: every local gradient times the clip coefficient, and value clipping."""

import torch
from torch import Tensor

from distclip._clip import threads
from distclip._clip.foreach import Grouped, kernel_groups


def scale_(grouped: Grouped, coefficient: Tensor, foreach: bool | None) -> None:
    """``g *= coefficient`` for every gradient of ``grouped``, one foreach kernel per device/dtype group."""
    for device, dtype, group, use_foreach in kernel_groups(grouped, foreach):
        factor = coefficient.to(device)
        if dtype in _FLOAT32_MATH and factor.dtype == torch.float64:
            # mul_ computes a float32/bfloat16/float16 tensor times a float64 0-d tensor in float32, so a float32
            # factor gives the same bits, and torch's CPU kernel takes about a third of the time with it (measured
            # on 2000 small tensors). A 0-d gradient is the exception: two 0-d operands are computed in float64.
            if 0 in map(Tensor.dim, group):
                _scale_group_([g for g in group if g.dim() == 0], factor, use_foreach)
                group = [g for g in group if g.dim() != 0]
            factor = factor.to(torch.float32)
        if group:
            _scale_group_(group, factor, use_foreach)


_FLOAT32_MATH = (torch.float32, torch.bfloat16, torch.float16)


def _scale_group_(group: list[Tensor], coefficient: Tensor, use_foreach: bool) -> None:
    if use_foreach:
        torch._foreach_mul_(group, coefficient)
    else:
        for g in group:
            g.mul_(coefficient)


def scale_parts_(parts: list[list[Tensor]], coefficient: Tensor, use_foreach: bool) -> None:
    """`scale_` of one device/dtype group split into ``parts`` (`threads.split`), the parts on threads at once."""
    threads.map_parts(lambda part: _scale_group_(part, coefficient, use_foreach), parts)


def clamp_(grouped: Grouped, clip_value: float, foreach: bool | None) -> None:
    """``g = clamp(g, -clip_value, clip_value)`` for every gradient of ``grouped``, in place."""
    for _, _, group, use_foreach in kernel_groups(grouped, foreach):
        if use_foreach:
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for g in group:
                g.clamp_(min=-clip_value, max=clip_value)
