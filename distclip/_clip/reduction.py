"""Reduction: the one collective of a sharded clip. This is the only module of the clip that calls
``torch.distributed``.

Every rank puts its row (its local norm, whether it has elements, and the call's arguments) into its own slot
of a ``world_size x width`` float64 matrix of zeros, and one ``all_reduce(SUM)`` over the group fills in every
slot: an exact all-gather (each element is one rank's value plus zeros). Every rank then holds the same rows,
so it computes the same total bit for bit, sees a NaN wherever one occurred (a MAX reduction can drop one), and
sees every other rank's arguments. The shape and the op never depend on the arguments, so ranks that disagree
still meet in the same collective and can all raise together. Cost: one all_reduce of
``8 * width * world_size`` bytes (40 bytes a rank).
"""

from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    """Whether this process has joined a torch.distributed world (``init_process_group()``)."""
    return dist.is_available() and dist.is_initialized()


def membership(group: Any) -> tuple[int, int]:
    """``(rank in group, group size)``; raises a clear error if this process cannot use ``group``."""
    if not initialized():
        raise RuntimeError(
            "distclip: group= was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group() first (torchrun sets up the environment for it), "
            "or leave group= out to clip the gradients of this process alone"
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
    """The device of the reduced rows: the current CUDA device for NCCL groups (each rank must have set its
    own, ``torch.cuda.set_device(local_rank)``, as NCCL requires), else the CPU.

    It depends on the group alone, never on local gradients, so every rank agrees on it.
    """
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(row: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's ``row``, stacked by group rank, on every rank: one ``all_reduce`` over ``group``."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    rows = row.new_zeros(world_size, row.numel())
    rows[rank] = row
    return _all_reduce_sum_(rows, group, "the clip's all_reduce")


def all_reduce_sum_(values: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``values`` in place over ``group`` (one ``all_reduce(SUM)``) and return it.

    Not part of a clip's norm: the GradClipper's AGC sums the squared unit norms of tensors sharded across
    their rows with it, once per group (see ``distclip/_service/agc.py``).
    """
    return _all_reduce_sum_(values, group, "AGC's all_reduce of unit norms")


def _all_reduce_sum_(values: torch.Tensor, group: Any, what: str) -> torch.Tensor:
    """``all_reduce(SUM)`` of ``values`` over ``group``, in place. A rank that died, or never made the call,
    fails it after the group's timeout: that becomes a ``RuntimeError`` that says so, instead of the backend's
    bare message."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    try:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as err:  # the backends' errors (DistBackendError, timeouts) derive from it
        raise RuntimeError(
            f"distclip: {what} over a group of {world_size} ranks failed on rank {rank} of it "
            f"(global rank {dist.get_rank()}): another rank of the group died, or did not make the same call "
            "within the group's timeout (the timeout= of init_process_group / new_group). Every rank of the "
            f"group must call. The backend said: {err}"
        ) from err
    return values
