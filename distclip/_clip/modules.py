"""Modules: the layout of a model's gradients, read from its wrapper.

A plain module and ``DistributedDataParallel`` (whose gradients are replicated) hold their gradients in their
parameters: the layout is theirs, local. FSDP2 (``fully_shard``) parameters are DTensors, laid out by `layout`
from their placements. FSDP1 (``FullyShardedDataParallel``) is the one wrapper whose gradients are not its
parameters' own; this module translates it.

Each FSDP unit keeps one flat parameter per rank. Under a sharding strategy the flat parameter's gradient is
this rank's shard over the unit's process group (for the hybrid strategies the intra-node group; the shards are
replicated across nodes, and each node's group reduces on its own, as FSDP does). Under ``NO_SHARD`` it is the
whole, already reduced gradient: a replica on every rank of the group. Parameters outside every unit (ignored
modules) are taken as replicated and counted once, as ``FullyShardedDataParallel.clip_grad_norm_`` does.
What that clip refuses is refused here too: a nested (non-root) unit, or a part of the model holding only
nested units, whose gradients are a part of the model's.

The flat parameters are FSDP internals (tested with torch 2.13); they are read in this module alone. Its
public name is ``distclip.integrations.fsdp.parameter_groups``.
"""

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class _Piece:
    """A gradient that is not a parameter's own ``.grad`` (a flat shard without its padding)."""

    grad: Tensor


def parameters_of(module: torch.nn.Module) -> tuple[list[Any], Any]:
    """``(parameters, group)`` of ``module``'s gradients as ``clip_grad_norm_`` takes them (``group`` None: local)."""
    if is_fsdp1(module):
        return fsdp1_parameter_groups(module)
    return parameter_list(module), None


def parameter_list(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """``list(module.parameters())``: every module's ``_parameters`` in ``module.modules()`` order, each parameter
    once, as torch's ``Module.parameters`` lists them, without its per-parameter Python (a generator, and a memo
    set that hashes each tensor in Python): ~0.1 us a parameter against ~0.4. A module class that overrides how
    its parameters are listed is asked itself."""
    cls, base = type(module), torch.nn.Module
    if (cls.parameters is not base.parameters or cls.named_parameters is not base.named_parameters
            or cls._named_members is not base._named_members):
        return list(module.parameters())
    first = {id(p): p for m in module.modules() for p in m._parameters.values() if p is not None}
    return list(first.values())


def is_fsdp1(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds FSDP1 units (``FullyShardedDataParallel``); no import if FSDP was never imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # FSDP2 imports it too: its models take the isinstance pass
    if fsdp is None or not any(isinstance(m, fsdp.FullyShardedDataParallel) for m in module.modules()):
        return False  # an isinstance pass costs ~0.1 ms on 400 modules; FSDP's own traversal ~4 ms, every clip
    return bool(fsdp.FullyShardedDataParallel.fsdp_modules(module))


def fsdp1_parameter_groups(module: torch.nn.Module) -> tuple[list[Any], Any]:
    """``(parameters, group)`` for ``distclip.clip_grad_norm_`` that clip ``module`` as FSDP1 lays it out.

    ``group`` is ``None`` when no gradient is sharded (every unit ``NO_SHARD``): then each rank holds the
    whole gradient and the clip is local.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = FullyShardedDataParallel.fsdp_modules(module)
    _check_root(units)
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
    any_sharded = False  # as FSDP decides it: by the units' strategies, whichever gradients this rank holds
    for unit in units:
        handle = _handle(unit)
        if handle is None:
            continue
        flat = handle.flat_param
        own = list(flat._params) if handle._use_orig_params else [flat]
        managed.update(id(p) for p in own)
        any_sharded = any_sharded or handle.uses_sharded_strategy
        if not handle.uses_sharded_strategy:
            replicated.extend(own)
        elif handle._use_orig_params:
            sharded.extend(own)  # their .grad are views of this rank's shard, padding excluded
        elif flat.grad is not None:
            sharded.append(_Piece(flat.grad[: flat.grad.numel() - flat._shard_numel_padded]))
    replicated.extend(p for p in parameter_list(module) if id(p) not in managed)
    if not any_sharded:
        return replicated, None
    return sharded + [{"params": replicated, "replicated_over": group}], group


def _check_root(units: list[Any]) -> None:
    """Raise FSDP's ``RuntimeError`` if ``units`` (the FSDP units inside the module to clip) are nested units
    of a root outside the module: their norm would be that of a part of the model's gradient. Before the first
    forward FSDP has not decided which unit is the root (``_is_root`` is None): nothing to refuse yet."""
    if any(unit._is_root is False for unit in units) and not any(unit._is_root for unit in units):
        raise RuntimeError(
            "distclip: `clip_grad_norm_()` should only be called on the root FSDP instance (as "
            "FullyShardedDataParallel.clip_grad_norm_ says): this module holds nested FSDP units only, whose "
            "gradients are a part of the model's. Clip the root (the outermost FullyShardedDataParallel), or this "
            "part alone on purpose with distclip.clip_grad_norm_(part.parameters(), ..., group=...)"
        )


def warn_no_gradients(group: Any, dtype: torch.dtype, stacklevel: int) -> None:
    """FSDP's ``UserWarning`` for a clip on a rank that holds no gradient (text and rank as FSDP words them)."""
    warnings.warn(
        f"Called FSDP.clip_grad_norm_() on rank {torch.distributed.get_rank(group)} with no gradients -- "
        f"returning the total norm in the default dtype {dtype}",
        stacklevel=stacklevel + 1,
    )


def _handle(unit: Any) -> Any:
    handle = unit._handle
    if handle is not None and not all(
        hasattr(handle, name) for name in ("flat_param", "uses_sharded_strategy", "_use_orig_params")
    ):
        raise RuntimeError(
            f"distclip: this torch ({torch.__version__}) lays out FSDP1's flat parameters differently from the "
            "versions distclip was tested with (2.13); clip with FullyShardedDataParallel.clip_grad_norm_"
        )
    return handle
