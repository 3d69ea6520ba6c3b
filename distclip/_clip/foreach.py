"""Grouping of tensors by device and dtype, and the choice between foreach and per-tensor kernels.

This is the rule of ``torch.nn.utils.clip_grad``, kept in one place so that norms, scaling and value
clipping choose their kernels (and raise for ``foreach=True``) exactly as torch does. A clip groups its
tensors once (`by_device_and_dtype`, kept on the `distclip._clip.layout.Layout`): the norm and the scaling
read the same groups, where torch groups the same list twice.
"""

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _foreach_supported_types,
    _group_tensors_by_device_and_dtype,
)

Grouped = dict[tuple[torch.device, torch.dtype], list[Tensor]]


def by_device_and_dtype(tensors: list[Tensor]) -> Grouped:
    """``tensors`` grouped by device and dtype, each group in their order: torch's grouping, one C++ pass.
    Like torch's, it raises ``RuntimeError`` for no tensors (what ``clip_grad_value_`` of none raises)."""
    grouped = _group_tensors_by_device_and_dtype([tensors])  # type: ignore[list-item]
    return {key: group for key, ([group], _) in grouped.items()}


def kernel_groups(
    grouped: Grouped, foreach: bool | None
) -> Iterator[tuple[torch.device, torch.dtype, list[Tensor], bool]]:
    """Yield ``(device, dtype, tensors, use_foreach)`` for each device/dtype group of ``grouped``.

    ``foreach=None`` uses the foreach kernels where the device and tensor types support them;
    ``foreach=True`` raises ``RuntimeError`` on a device without them, with torch's message.
    """
    for (device, dtype), group in grouped.items():
        if (foreach is None and _has_foreach_support(group, device)) or (
            foreach and _device_has_foreach_support(device)
        ):
            yield device, dtype, group, True
        elif foreach:
            raise RuntimeError(
                f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
            )
        else:
            yield device, dtype, group, False


def _has_foreach_support(group: list[Tensor], device: torch.device) -> bool:
    """torch's ``_has_foreach_support`` for a group without ``None``: the types checked as a set, at C speed
    (torch's test is a Python generator over the tensors, ~0.05 us a tensor)."""
    return _device_has_foreach_support(device) and set(map(type, group)) <= set(_foreach_supported_types)
