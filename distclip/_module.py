"""``clip_module_grad_norm_``: clip a model's gradients however it is wrapped, reading the layout from the wrapper."""

import sys
from functools import reduce
from typing import Any

import torch
from torch import Tensor

from distclip._clip_grad import clip_grad_norm_
from distclip._layout import local_tensor


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
    the dtype torch and FSDP return it in whatever the layout: the promoted dtype of the model's parameters.
    """
    parameters, group = _layout_of(module)
    norm = clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach, group=group)
    dtypes = {p.dtype for p in module.parameters()}
    return local_tensor(norm).to(reduce(torch.promote_types, dtypes)) if dtypes else local_tensor(norm)


def _layout_of(module: torch.nn.Module) -> tuple[list[Any], Any]:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and fsdp.FullyShardedDataParallel.fsdp_modules(module):
        from distclip.integrations.fsdp import parameter_groups

        return parameter_groups(module)
    return list(module.parameters()), None
