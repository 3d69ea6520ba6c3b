r"""The functional API: drop-ins for ``torch.nn.utils``' clipping functions, plus ``group=`` for sharded gradients.

Every clip runs the same stages, top to bottom:

    gradients -> layout (_layout) -> local partials (_partials) -> one reduction (_reduction)
              -> total norm (_total_norm) -> coefficient (_coefficient) -> in-place scaling (_scaling)

With ``group=None`` the reduction is skipped and every stage uses exactly torch's kernels in torch's order,
so values, dtypes, warnings and errors are those of the installed ``torch.nn.utils``.
"""

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from distclip import _arguments, _coefficient, _layout, _partials, _reduction, _scaling, _threads, _total_norm
from distclip._foreach import kernel_groups

_TensorOrTensors = Tensor | Iterable[Tensor]


@torch.no_grad()
def get_total_norm(
    tensors: _TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: Any = _arguments.NO_GROUP,
) -> Tensor:
    r"""Return the p-norm of ``tensors`` viewed as one vector, `\|(\|t_1\|_p, \ldots, \|t_k\|_p)\|_p`.

    Args:
        tensors: a tensor or an iterable of tensors (their values, not their ``.grad``).
        norm_type: p, a float, an int or ``'inf'``/``'-inf'``.
        error_if_nonfinite: raise ``RuntimeError`` if the norm is NaN or inf.
        foreach: use the foreach kernels (``None``: where the device supports them).
        group: left out (or ``None``) for this process's tensors alone, bitwise equal to
            ``torch.nn.utils.get_total_norm``. A process group (or ``torch.distributed.group.WORLD``) when
            each rank holds a disjoint piece of one vector: the result is the norm of the whole vector,
            `(\sum_r n_r^p)^{1/p}` over the ranks' local norms `n_r` (max for inf, min for -inf),
            the same float64 value on every rank, from one ``all_reduce`` of a few float64 values. Every
            rank of the group must call it, also one with no tensors. An explicit ``None`` raises
            ``RuntimeError`` in a process launched as one of several ranks (``WORLD_SIZE`` > 1) before
            ``init_process_group()``: that is ``group.WORLD`` read too early, not a local clip.

    Returns:
        Tensor: the norm, 0-d. In single-process mode torch's result (the tensors' dtype, on the first
            tensor's device; ``torch.tensor(0.0)`` for none); in sharded mode float64, on the first local
            tensor's device (the reduction's device on a rank with none).
    """
    layout = _layout.of_tensors(_layout.as_list(tensors, "tensors"), _arguments.process_group(group))
    return _total_norm.returned(_total_norm_of(layout, norm_type, error_if_nonfinite, foreach), layout)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: _TensorOrTensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
) -> None:
    r"""Scale the gradients of ``parameters`` in place by `\min(\text{max\_norm} / (\text{total\_norm} + 10^{-6}), 1)`.

    A drop-in for ``torch.nn.utils.clip_grads_with_norm_``; with ``total_norm`` from
    `get_total_norm` (``group=`` included) it completes a clip. Local only: no collective.
    """
    grads = _layout.local_grads(_layout.as_list(parameters, "parameters"))
    max_norm = _arguments.max_norm_value(max_norm, sharded=False)
    _clip_(grads, max_norm, _layout.local_tensor(total_norm), foreach)


@torch.no_grad()
def clip_grad_norm_(
    parameters: _TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: Any = _arguments.NO_GROUP,
) -> Tensor:
    r"""Clip the gradient norm of ``parameters`` in place and return the norm before clipping.

    The norm is `get_total_norm` of the gradients (parameters without ``.grad`` are skipped), and every
    gradient is multiplied by `\min(\text{max\_norm} / (\text{norm} + 10^{-6}), 1)`.

    ``group=None``: bitwise equal to ``torch.nn.utils.clip_grad_norm_``. With a process group each rank
    passes its own shard of the gradients; the norm is the global one (one ``all_reduce``), the same on
    every rank, every rank scales its own gradients by the same coefficient, and with
    ``error_if_nonfinite=True`` every rank raises together before any gradient changes. In sharded mode
    ``max_norm`` must be a non-negative number and ``norm_type`` positive, inf or -inf, and every
    rank must pass the same arguments (checked in the same collective: a mismatch raises on every rank).
    ``group`` is read as in `get_total_norm`: left out for a local clip; ``group.WORLD`` before
    ``init_process_group()`` in a multi-rank launch raises instead of clipping locally.
    """
    layout = _layout.of_parameters(_layout.parameter_list(parameters, stacklevel=4), _arguments.process_group(group))
    return _total_norm.returned(clip_layout_(layout, max_norm, norm_type, error_if_nonfinite, foreach), layout)


@torch.no_grad()
def fast_clip_grad_norm_(
    parameters: _TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    *,
    threads: int | None = None,
) -> Tensor:
    r"""`clip_grad_norm_` on one process with the CPU gradients' kernels spread over ``threads`` cores.

    Computes what ``torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite)``
    computes: the per-tensor norms `n_i = \|g_i\|_p` with torch's foreach kernel in the gradients' dtype, the
    total `\|(n_1, \ldots, n_k)\|_p`, and `g_i \leftarrow g_i \cdot \min(\text{max\_norm} / (\text{total} +
    10^{-6}), 1)`. What differs is where the kernels run: each CPU device/dtype group of gradients is split
    into ``threads`` contiguous parts of about equal size (default ``torch.get_num_threads()``) and each part's
    foreach call runs on its own thread, once for the norms and once for the scaling. On the CPU a foreach
    kernel is a loop of per-tensor kernels and a tensor under torch's grain size (32K elements) is read by
    one core, so without this a model of many small tensors keeps one core busy. Accelerator gradients take
    torch's foreach kernels unchanged. No communication; plain (not DTensor) gradients only.

    Accuracy: each tensor gets the kernel torch gives it, with torch's intra-op thread count, so the norm and
    the scaled gradients are bitwise those of ``torch.nn.utils.clip_grad_norm_``, and so is the error against
    a float64 norm: torch's float32 norm kernel accumulates in float32, a relative error of about 1e-8 on
    2000 tensors of 1K-16K elements and about 1e-3 on GPT-2 small (tensors up to 38M elements), measured;
    ``distclip bench`` prints it for every workload. Cost: a pool of ``threads - 1`` worker threads, made on
    the first call and kept (a forked child makes its own).
    """
    layout = _layout.of_parameters(_layout.parameter_list(parameters, stacklevel=4), None)
    if layout.sharded:
        raise ValueError(
            "distclip: fast_clip_grad_norm_ clips one process's plain gradients; these are DTensors, whose "
            "norm needs their mesh's collectives: use distclip.clip_grad_norm_ (or clip_module_grad_norm_)"
        )
    max_norm = _arguments.max_norm_value(max_norm, sharded=False)
    p = _arguments.norm_order(norm_type, sharded=False)
    workers = _threads.worker_count(threads)
    if not layout.grads:
        return torch.tensor(0.0)
    groups = [
        (device, _threads.split(group, workers if use_foreach and device.type == "cpu" else 1), use_foreach)
        for device, _, group, use_foreach in kernel_groups(layout.grads, None)
    ]
    norms = [_partials.part_norms(parts, p, use_foreach) for _, parts, use_foreach in groups]
    total_norm = _total_norm.combine_vectors(norms, p, layout.grads[0].device)
    _total_norm.check_finite(total_norm, p, error_if_nonfinite, layout)
    coefficient = _coefficient.clip_coefficient(max_norm, total_norm)
    for device, parts, use_foreach in groups:
        _scaling.scale_parts_(parts, coefficient.to(device), use_foreach)
    return total_norm


def clip_grad_norm(
    parameters: _TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: Any = _arguments.NO_GROUP,
) -> Tensor:
    """Deprecated alias of `clip_grad_norm_` (``FutureWarning``), as in ``torch.nn.utils``."""
    warnings.warn(
        "`distclip.clip_grad_norm` is now deprecated in favor of `distclip.clip_grad_norm_`.",
        FutureWarning,
        stacklevel=2,
    )
    return clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach, group=group)


@torch.no_grad()
def clip_grad_value_(
    parameters: _TensorOrTensors,
    clip_value: float,
    foreach: bool | None = None,
) -> None:
    r"""Clamp every gradient of ``parameters`` in place to `[-\text{clip\_value}, \text{clip\_value}]`.

    A drop-in for ``torch.nn.utils.clip_grad_value_``: elementwise, so it needs no collective in any layout.
    """
    parameters = _layout.as_list(parameters, "parameters")
    clip_value = _arguments.as_float(clip_value, "clip_value")
    _scaling.clamp_(_layout.local_grads(parameters), clip_value, foreach)


def clip_layout_(
    layout: _layout.Layout, max_norm: float, norm_type: float | str, error_if_nonfinite: bool, foreach: bool | None
) -> Tensor:
    """Clip the gradients of ``layout`` (`clip_grad_norm_` after its layout stage); return the total norm as
    computed (float64 when sharded, torch's dtype on one process), before `_total_norm.returned`."""
    max_norm = _arguments.max_norm_value(max_norm, layout.sharded)
    total_norm = _total_norm_of(layout, norm_type, error_if_nonfinite, foreach, max_norm)
    _clip_(layout.scaled, max_norm, total_norm, foreach)
    return total_norm


def _total_norm_of(
    layout: _layout.Layout,
    norm_type: float | str,
    error_if_nonfinite: bool,
    foreach: bool | None,
    max_norm: float | None = None,
    check_arguments: bool = True,
) -> Tensor:
    """The total norm of ``layout`` (before any scaling). ``max_norm``: the clip's, ``None`` for
    ``get_total_norm``. In sharded mode every rank's arguments travel in the same collective and, with
    ``check_arguments``, are compared on the host (a device-to-host read on accelerators)."""
    p = _arguments.norm_order(norm_type, layout.sharded)
    if layout.sharded:
        device = _reduction.wire_device(layout.group)
        arguments = (p, -1.0 if max_norm is None else max_norm, float(bool(error_if_nonfinite)))
        rows = _reduction.gather_rows(_partials.local_row(layout.norm_pieces, p, foreach, device, arguments), layout.group)
        if check_arguments:
            _total_norm.check_agreement(rows)
        total = _total_norm.from_rows(rows, p).to(layout.grads[0].device if layout.grads else device)
    elif not layout.grads:
        return torch.tensor(0.0)
    else:
        norms = _partials.tensor_norms(layout.counted, p, foreach)
        total = _total_norm.combine(norms, p, layout.grads[0].device)
    _total_norm.check_finite(total, p, error_if_nonfinite, layout)
    return total


def _clip_(grads: list[Tensor], max_norm: float, total_norm: Tensor, foreach: bool | None) -> None:
    if grads:
        _scaling.scale_(grads, _coefficient.clip_coefficient(max_norm, total_norm), foreach)
