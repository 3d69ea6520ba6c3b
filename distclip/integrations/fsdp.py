"""FSDP1 (``FullyShardedDataParallel``): its gradient layout in distclip's terms.

Each FSDP unit keeps one flat parameter per rank. Under a sharding strategy the flat parameter's gradient is
this rank's shard over the unit's process group (for the hybrid strategies the intra-node group; the shards are
replicated across nodes, and each node's group reduces on its own, as FSDP does). Under ``NO_SHARD`` it is the
whole, already reduced gradient: a replica on every rank of the group. Parameters outside every unit (ignored
modules) are taken as replicated and counted once, as ``FullyShardedDataParallel.clip_grad_norm_`` does.

The flat parameters are FSDP internals (tested with torch 2.13); they are read in this module alone.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel


@dataclass
class _Piece:
    """A gradient that is not a parameter's own ``.grad`` (a flat shard without its padding)."""

    grad: Tensor


def parameter_groups(module: torch.nn.Module) -> tuple[list[Any], Any]:
    """``(parameters, group)`` for ``distclip.clip_grad_norm_`` that clip ``module`` as FSDP1 lays it out.

    ``group`` is ``None`` when no gradient is sharded (every unit ``NO_SHARD``): then each rank holds the
    whole gradient and the clip is local.
    """
    units = FullyShardedDataParallel.fsdp_modules(module)
    groups = {id(u.process_group): u.process_group for u in units}
    if len(groups) != 1:
        raise ValueError(
            "distclip: the FSDP units of this model use different process groups; clip each group's "
            "parameters with distclip.clip_grad_norm_(..., group=...) instead"
        )
    (group,) = groups.values()
    sharded: list[Any] = []
    replicated: list[Any] = []
    managed: set[int] = set()
    for unit in units:
        handle = _handle(unit)
        if handle is None:
            continue
        flat = handle.flat_param
        own = list(flat._params) if handle._use_orig_params else [flat]
        managed.update(id(p) for p in own)
        if not handle.uses_sharded_strategy:
            replicated.extend(own)
        elif handle._use_orig_params:
            sharded.extend(own)  # their .grad are views of this rank's shard, padding excluded
        elif flat.grad is not None:
            sharded.append(_Piece(flat.grad[: flat.grad.numel() - flat._shard_numel_padded]))
    replicated.extend(p for p in module.parameters() if id(p) not in managed)
    if not sharded:
        return replicated, None
    return sharded + [{"params": replicated, "replicated_over": group}], group


def _handle(unit: FullyShardedDataParallel) -> Any:
    handle = unit._handle
    if handle is not None and not all(
        hasattr(handle, name) for name in ("flat_param", "uses_sharded_strategy", "_use_orig_params")
    ):
        raise RuntimeError(
            f"distclip: this torch ({torch.__version__}) lays out FSDP1's flat parameters differently from the "
            "versions distclip was tested with (2.13); clip with FullyShardedDataParallel.clip_grad_norm_"
        )
    return handle
