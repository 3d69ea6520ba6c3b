r"""The functional API: drop-ins for ``torch.nn.utils``' clipping functions, plus ``group=`` for sharded gradients.

Each function translates its arguments into a layout (``distclip/_clip/layout.py``, ``modules.py``) and runs the
clip's stages on it (``distclip/_clip/pipeline.py``):

    gradients -> layout -> local partials -> one reduction -> total norm -> coefficient -> in-place scaling

With ``group=None`` the reduction is skipped and every stage uses exactly torch's kernels in torch's order,
so values, dtypes, warnings and errors are those of the installed ``torch.nn.utils``.
"""

import warnings
from collections.abc import Iterable
from functools import reduce
from typing import Any

import torch
from torch import Tensor

from distclip._clip import arguments, layout, modules, pipeline, scaling, total_norm
from distclip._clip.foreach import by_device_and_dtype
from distclip._clip.threads import worker_count

_TensorOrTensors = Tensor | Iterable[Tensor]


@torch.no_grad()
def get_total_norm(
    tensors: _TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: Any = arguments.NO_GROUP,
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

    In sharded mode the 2-norm of CPU bfloat16/float16 tensors of 256K elements or more is read by a kernel
    compiled with ``torch.compile`` on the first such call in a process (seconds; about 25 s on 2 cores with an
    empty inductor cache): set ``DISTCLIP_COMPILE=0`` to skip it. Without it (switched off, unavailable, or
    failed, which warns once) the same norm comes from eager kernels, about half as fast.

    Returns:
        Tensor: the norm, 0-d. In single-process mode torch's result (the tensors' dtype, on the first
            tensor's device; ``torch.tensor(0.0)`` for none); in sharded mode float64, on the first local
            tensor's device (the reduction's device on a rank with none).
    """
    laid_out = layout.of_tensors(layout.as_list(tensors, "tensors"), arguments.process_group(group))
    return total_norm.for_caller(pipeline.total_norm_of(laid_out, norm_type, error_if_nonfinite, foreach), laid_out)


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
    grads = layout.local_grads(layout.as_list(parameters, "parameters"))
    max_norm = arguments.max_norm_value(max_norm, sharded=False)
    if grads:
        pipeline.scale_by_norm_(by_device_and_dtype(grads), max_norm, layout.local_tensor(total_norm), foreach)


@torch.no_grad()
def clip_grad_norm_(
    parameters: _TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: Any = arguments.NO_GROUP,
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
    laid_out = layout.of_parameters(layout.parameter_list(parameters, stacklevel=4), arguments.process_group(group))
    return total_norm.for_caller(pipeline.clip_(laid_out, max_norm, norm_type, error_if_nonfinite, foreach), laid_out)


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
    laid_out = layout.of_parameters(layout.parameter_list(parameters, stacklevel=4), None)
    if laid_out.sharded:
        raise ValueError(
            "distclip: fast_clip_grad_norm_ clips one process's plain gradients; these are DTensors, whose "
            "norm needs their mesh's collectives: use distclip.clip_grad_norm_ (or clip_module_grad_norm_)"
        )
    return pipeline.threaded_clip_(laid_out, max_norm, norm_type, error_if_nonfinite, worker_count(threads))


def clip_grad_norm(
    parameters: _TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: Any = arguments.NO_GROUP,
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
    parameters = layout.as_list(parameters, "parameters")
    clip_value = arguments.as_float(clip_value, "clip_value")
    scaling.clamp_(by_device_and_dtype(layout.local_grads(parameters)), clip_value, foreach)


@torch.no_grad()
def clip_module_grad_norm_(
    module: torch.nn.Module,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    r"""Clip the gradients of ``module`` by their global norm and return that norm (before clipping).

    The layout comes from the wrapper, and the result is `distclip.clip_grad_norm_` over it:

    - a plain module or ``DistributedDataParallel`` (its gradients are replicated): the local clip, bitwise
      ``torch.nn.utils.clip_grad_norm_(module.parameters(), ...)``, no collective;
    - FSDP1 ``FullyShardedDataParallel``, any sharding strategy and ``use_orig_params`` either way: the norm
      of all the flat shards over the units' process group, one ``all_reduce``; parameters outside FSDP and
      ``NO_SHARD`` units counted once; no collective if nothing is sharded;
    - FSDP2 ``fully_shard`` and other DTensor parameters: from their placements, one ``all_reduce``.

    Returns a plain 0-d tensor (for a DTensor norm, its value), the same on every rank of a wrapped model, in
    the dtype torch and FSDP return it in: the promoted dtype of this rank's gradients (float16 under an FSDP
    ``MixedPrecision`` that keeps float16 gradients), and the default dtype on a rank that holds none (FSDP1
    also warns there, as ``FullyShardedDataParallel.clip_grad_norm_`` does). What the framework refuses is
    refused: a nested FSDP1 unit raises ``RuntimeError``, as FSDP's clip does.
    """
    parameters, group = modules.parameters_of(module)
    laid_out = layout.of_parameters(parameters, group)
    norm = pipeline.clip_(laid_out, max_norm, norm_type, error_if_nonfinite, foreach)
    dtypes = {dtype for _, dtype in laid_out.scaled_groups}  # the clip's grouping: no pass over the tensors
    if dtypes:
        return norm.to(reduce(torch.promote_types, dtypes))
    default = torch.get_default_dtype()
    if group is not None and modules.is_fsdp1(module):
        modules.warn_no_gradients(group, default, stacklevel=3)  # past the no_grad decorator, to the caller
    return norm.to(default)
