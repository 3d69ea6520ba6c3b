"""Reduction: the one collective of a sharded clip. This is the only module of the clip that calls
``torch.distributed``.

The partials stage packs everything a rank contributes into one float64 vector; one ``all_reduce`` over the
group combines it (``SUM`` for the p-th powers of finite p, ``MAX`` for inf and, negated, for -inf), and every
rank decodes the same reduced vector into the same total norm.
"""

from typing import Any

import torch
import torch.distributed as dist


def membership(group: Any) -> tuple[int, int]:
    """``(rank in group, group size)``; raises a clear error if this process cannot use ``group``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distclip: group= was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group() first (torchrun sets up the environment for it), "
            "or pass group=None to clip the gradients of this process alone"
        )
    if not isinstance(group, dist.ProcessGroup):
        if group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(_not_a_member())
        raise TypeError(
            "distclip: group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD "
            f"or one made by torch.distributed.new_group), got {type(group).__name__}"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(_not_a_member())
    return rank, dist.get_world_size(group)


def world() -> tuple[Any, int]:
    """The default (world) process group and its size."""
    membership(dist.group.WORLD)
    return dist.group.WORLD, dist.get_world_size()


def _not_a_member() -> str:
    return (
        f"distclip: this process (global rank {dist.get_rank()}) is not a member of the group passed as "
        "group=: only the ranks of a group may clip over it; on the other ranks pass the group they belong to"
    )


def wire_device(group: Any) -> torch.device:
    """The device the reduced vector lives on: the current CUDA device for NCCL groups, else the CPU.

    It depends on the group alone, never on local gradients, so every rank agrees on it.
    """
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(wire: torch.Tensor, op: str, group: Any) -> torch.Tensor:
    """Reduce ``wire`` in place over ``group`` with ``op`` (``"sum"`` or ``"max"``): the one collective."""
    dist.all_reduce(wire, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return wire
