r"""The pipeline: the clip's stages in sequence, for the functional API and `GradClipper` alike.

    layout (given) -> local partials -> one reduction (sharded only) -> total norm -> coefficient -> scaling

A local layout (``group`` None) takes torch's kernels in torch's order at every stage, so its results are those of
``torch.nn.utils``; a sharded one reduces one row per rank and gets the same float64 norm on every rank.
"""

import torch
from torch import Tensor

from distclip._clip import arguments, coefficient, partials, reduction, row, scaling, threads, total_norm
from distclip._clip.foreach import Grouped, Sizes, kernel_groups
from distclip._clip.layout import Layout


def clip_(layout: Layout, max_norm: float, norm_type: float | str, error_if_nonfinite: bool,
          foreach: bool | None) -> Tensor:
    """Scale the gradients of ``layout`` by ``min(max_norm / (norm + 1e-6), 1)`` in place; return the norm as
    computed (float64 when sharded, torch's dtype when local), before `total_norm.for_caller`."""
    max_norm = arguments.max_norm_value(max_norm, layout.sharded)
    norm = total_norm_of(layout, norm_type, error_if_nonfinite, foreach, max_norm)
    scale_by_norm_(layout.scaled_groups, max_norm, norm, foreach, layout.scaled_sizes if layout.sharded else None)
    return norm


def total_norm_of(layout: Layout, norm_type: float | str, error_if_nonfinite: bool, foreach: bool | None,
                  max_norm: float | None = None, *, check_arguments: bool = True) -> Tensor:
    """The total norm of ``layout``'s gradients, before any scaling.

    ``max_norm``: the clip's, ``None`` for ``get_total_norm``. In sharded mode every rank's arguments travel in
    the same collective and, with ``check_arguments``, are compared on the host (a device-to-host read on
    accelerators); a caller whose arguments cannot change between calls checks them once.
    """
    p = arguments.norm_order(norm_type, layout.sharded)
    if layout.sharded:
        norm = _sharded_norm(layout, p, foreach, row.clip_arguments(p, max_norm, error_if_nonfinite), check_arguments)
    elif not layout.grads:
        return torch.tensor(0.0)
    else:
        norm = total_norm.combine(partials.tensor_norms(layout.norm_groups, p, foreach), p, layout.grads[0].device)
    total_norm.check_finite(norm, p, error_if_nonfinite, layout)
    return norm


def scale_by_norm_(grouped: Grouped, max_norm: float, norm: Tensor, foreach: bool | None,
                   joined: Sizes | None = None) -> None:
    """``g *= min(max_norm / (norm + 1e-6), 1)`` for every gradient of ``grouped``, in place; no collective.
    ``joined``: as in `scaling.scale_`."""
    if grouped:
        scaling.scale_(grouped, coefficient.clip_coefficient(max_norm, norm), foreach, joined)


def threaded_clip_(layout: Layout, max_norm: float, norm_type: float | str, error_if_nonfinite: bool,
                   workers: int) -> Tensor:
    """`clip_` of a local layout with each CPU device/dtype group's foreach kernels split over ``workers``
    threads (`threads.split`): the same kernel per tensor, so the same bits as `clip_`."""
    max_norm = arguments.max_norm_value(max_norm, sharded=False)
    p = arguments.norm_order(norm_type, sharded=False)
    if not layout.grads:
        return torch.tensor(0.0)
    groups = [
        (device, threads.split(group, workers if use_foreach and device.type == "cpu" else 1), use_foreach)
        for device, _, group, use_foreach in kernel_groups(layout.scaled_groups, None)
    ]
    norms = [partials.part_norms(parts, p, use_foreach) for _, parts, use_foreach in groups]
    norm = total_norm.combine_vectors(norms, p, layout.grads[0].device)
    total_norm.check_finite(norm, p, error_if_nonfinite, layout)
    factor = coefficient.clip_coefficient(max_norm, norm)
    for device, parts, use_foreach in groups:
        scaling.scale_parts_(parts, factor.to(device), use_foreach)
    return norm


def _sharded_norm(layout: Layout, p: float, foreach: bool | None, call: tuple[float, ...],
                  check_arguments: bool) -> Tensor:
    """The global norm from every rank's row (local norm and the ``call``'s arguments): one ``all_reduce``."""
    wire = reduction.wire_device(layout.group)
    local = partials.local_norm(layout.norm_groups, p, foreach, wire, layout.norm_sizes)
    rows = reduction.gather_rows(row.encode(local, call, wire), layout.group)
    if check_arguments:
        row.check_agreement(rows)
    return total_norm.from_rows(rows, p).to(layout.grads[0].device if layout.grads else wire)
