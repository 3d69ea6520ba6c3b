"""Grouping of tensors by device and dtype, the choice between foreach and per-tensor kernels, and runs of
small tensors that one kernel reads side by side.

This is the rule of ``torch.nn.utils.clip_grad``, kept in one place so that norms, scaling and value
clipping choose their kernels (and raise for ``foreach=True``) exactly as torch does. A clip groups its
tensors once (`by_device_and_dtype`, kept on the `distclip._clip.layout.Layout`): the norm and the scaling
read the same groups, where torch groups the same list twice.
"""

from bisect import bisect_right
from collections.abc import Iterator
from operator import attrgetter

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _foreach_supported_types,
    _group_tensors_by_device_and_dtype,
)

Grouped = dict[tuple[torch.device, torch.dtype], list[Tensor]]
Sizes = dict[tuple[torch.device, torch.dtype], list[int]]  # the element counts of a Grouped's tensors


def by_device_and_dtype(tensors: list[Tensor]) -> Grouped:
    """``tensors`` grouped by device and dtype, each group in their order: torch's grouping, one C++ pass.
    Like torch's, it raises ``RuntimeError`` for no tensors (what ``clip_grad_value_`` of none raises).

    CPU tensors of one dtype (the common case on the CPU) are recognised by two attribute reads a tensor
    (~0.1 us): torch's pybind11 grouping costs about as much on a fresh heap but ~0.4 us a tensor once glibc's
    heap is fragmented, e.g. after a large model was built and freed (benchmarks/heap_history.py). Under
    ``torch.compile`` torch's grouping is used, which dynamo traces without a graph break.
    """
    if tensors and not torch.compiler.is_compiling() and all(map(_IS_CPU, tensors)):
        dtypes = set(map(_DTYPE, tensors))
        if len(dtypes) == 1:
            return {(_CPU, dtypes.pop()): list(tensors)}
    grouped = _group_tensors_by_device_and_dtype([tensors])  # type: ignore[list-item]
    return {key: group for key, ([group], _) in grouped.items()}


_IS_CPU, _DTYPE, _CPU = attrgetter("is_cpu"), attrgetter("dtype"), torch.device("cpu")


def sizes_of(grouped: Grouped) -> Sizes:
    """The element counts of the tensors of ``grouped``, by group."""
    return {key: list(map(Tensor.numel, group)) for key, group in grouped.items()}


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


def runs(ends: list[int], limit: int) -> Iterator[tuple[int, int, int]]:
    """``(start, stop, size)`` of the consecutive runs of tensors ``[start:stop]`` of at most ``limit`` elements
    (``size``) each, for tensors of at most ``limit`` elements whose running sizes are ``ends``
    (``itertools.accumulate`` of their sizes): found by bisection, with no per-tensor Python."""
    start = 0
    while start < len(ends):
        base = ends[start - 1] if start else 0
        stop = bisect_right(ends, base + limit, lo=start)
        yield start, stop, ends[stop - 1] - base
        start = stop
