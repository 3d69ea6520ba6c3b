"""``clip_module_grad_norm_``: clip a model's gradients however it is wrapped, reading the layout from the wrapper."""

import sys
from functools import reduce
from typing import Any

import torch
from torch import Tensor

from distclip import _layout
from distclip._clip_grad import clip_layout_


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
    parameters, group = _layout_of(module)
    layout = _layout.of_parameters(parameters, group)
    norm = clip_layout_(layout, max_norm, norm_type, error_if_nonfinite, foreach)
    dtypes = {g.dtype for g in layout.grads}
    if dtypes:
        return norm.to(reduce(torch.promote_types, dtypes))
    default = torch.get_default_dtype()
    if group is not None and _is_fsdp1(module):
        from distclip.integrations.fsdp import warn_no_gradients

        warn_no_gradients(group, default, stacklevel=3)  # past the no_grad decorator, to the caller
    return norm.to(default)


def _is_fsdp1(module: torch.nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and bool(fsdp.FullyShardedDataParallel.fsdp_modules(module))


def _layout_of(module: torch.nn.Module) -> tuple[list[Any], Any]:
    """``(parameters, group)`` of ``module``'s gradients as ``clip_grad_norm_`` takes them (``group`` None: local)."""
    if _is_fsdp1(module):
        from distclip.integrations.fsdp import parameter_groups

        return parameter_groups(module)
    return list(module.parameters()), None
