"""In-place scaling: every local gradient times the clip coefficient, and value clipping."""

from itertools import accumulate, compress
from operator import not_

import torch
from torch import Tensor

from distclip._clip import threads
from distclip._clip.foreach import Grouped, Sizes, kernel_groups, runs


def scale_(grouped: Grouped, coefficient: Tensor, foreach: bool | None, joined: Sizes | None = None) -> None:
    """``g *= coefficient`` for every gradient of ``grouped``, one foreach kernel per device/dtype group.

    ``joined`` (sharded mode: the sizes of ``grouped``'s tensors): the small tensors of a CPU bfloat16/float16
    group are scaled side by side in a buffer (`_scale_joined_`): the same products, a NaN's payload aside;
    without it, torch's kernels exactly.
    """
    for device, dtype, group, use_foreach in kernel_groups(grouped, foreach):
        factor = coefficient.to(device)
        if dtype in _FLOAT32_MATH and factor.dtype == torch.float64:
            # mul_ computes a float32/bfloat16/float16 tensor times a float64 0-d tensor in float32, so a float32
            # factor gives the same bits, and torch's CPU kernel takes about a third of the time with it (measured
            # on 2000 small tensors). A 0-d gradient is the exception: two 0-d operands are computed in float64.
            sizes = None if joined is None else joined[device, dtype]
            if 0 in map(Tensor.dim, group):
                _scale_group_([g for g in group if g.dim() == 0], factor, use_foreach)
                group = [g for g in group if g.dim() != 0]
                sizes = None if sizes is None else list(map(Tensor.numel, group))
            factor = factor.to(torch.float32)
            if sizes is not None and use_foreach and device.type == "cpu" and dtype != torch.float32 and group and (
                    not torch.compiler.is_compiling()):
                group = _scale_joined_(group, sizes, factor)
        if group:
            _scale_group_(group, factor, use_foreach)


_FLOAT32_MATH = (torch.float32, torch.bfloat16, torch.float16)


def _scale_group_(group: list[Tensor], coefficient: Tensor, use_foreach: bool) -> None:
    if use_foreach:
        torch._foreach_mul_(group, coefficient)
    else:
        for g in group:
            g.mul_(coefficient)


# mul_ of a bfloat16/float16 CPU tensor by a float32 0-d factor costs ~1.3 us however small the tensor (0.4 with a
# factor of its own dtype, which would round the coefficient). Scaled side by side through a buffer (cat, one mul_,
# split_with_sizes_copy back) a tensor of 16 elements costs ~0.7 us, of 1024 1.0 against 1.46, of 2048 1.3 against
# 1.6; above that the gain is within the noise, and the buffer moves each byte three times (one core, bfloat16).
_JOINED_MAX = 1 << 11
_JOINED_BUFFER = 1 << 18  # elements: 512 KiB


def _scale_joined_(group: list[Tensor], sizes: list[int], factor: Tensor) -> list[Tensor]:
    """Scale the tensors under ``_JOINED_MAX`` elements of a CPU bfloat16/float16 ``group`` (1-D, or contiguous) by
    the float32 0-d ``factor``: runs of them joined in one buffer, scaled by one ``mul_`` and copied back. Each
    element is the product ``mul_`` gives (computed in float32, rounded once to the dtype); only which NaN a NaN
    becomes can differ, as it does between torch's vectorised and scalar loops. Return the tensors left to scale:
    the others, or the whole group if a tensor comes twice (``_foreach_mul_`` scales it twice). ``sizes``: the
    tensors' element counts."""
    picked = list(map(_JOINED_MAX.__gt__, sizes))  # n < _JOINED_MAX, at C speed
    if sum(picked) * 2 < len(group):
        return group  # mostly larger tensors: joining the few small ones measured slower in place (the bench's small)
    small, sizes, rest = list(compress(group, picked)), list(compress(sizes, picked)), list(
        compress(group, map(not_, picked)))
    flat = small
    if set(map(Tensor.dim, small)) - {1}:  # contiguous ones are viewed flat, strided ones scaled by themselves
        viewable = [g.dim() == 1 or g.is_contiguous() for g in small]
        rest += compress(small, map(not_, viewable))
        small, sizes = list(compress(small, viewable)), list(compress(sizes, viewable))
        flat = [g if g.dim() == 1 else g.view(-1) for g in small]
    if len(small) < 2 or len(set(map(id, small))) < len(small):
        return group
    # In inference mode the buffer's views (one a tensor, to copy back) carry no autograd view metadata: ~0.25 us
    # a view against ~0.4. The gradients are written in place as outside it, and their version counters bumped.
    with torch.inference_mode():
        buffer = torch.empty(min(_JOINED_BUFFER, sum(sizes)), dtype=group[0].dtype)
        for start, stop, size in runs(list(accumulate(sizes)), _JOINED_BUFFER):
            run = torch.cat(flat[start:stop], out=buffer[:size])
            run.mul_(factor)
            torch.split_with_sizes_copy(run, sizes[start:stop], out=flat[start:stop])
    return rest


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
