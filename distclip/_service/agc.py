r"""Adaptive gradient clipping, unit-wise (Brock et al., 2021, "High-Performance Large-Scale Image Recognition
Without Normalization", section 4.1).

Every unit `i` of a parameter `W` and its gradient `G` is scaled by

.. math:: \min\left(1, \frac{\lambda \max(\|W_i\|_2, \epsilon)}{\max(\|G_i\|_2, 10^{-6})}\right)

A unit is a row (index along dim 0, the output unit of a linear or convolution weight) of a tensor with two or
more dimensions, and the whole tensor for a 1-D or 0-D one (biases, gains).

In a distributed job the unit norms must be those of the whole rows:

- plain tensors are taken to hold whole rows (the process's own parameters, replicas, pipeline stages,
  column-parallel pieces); no collective;
- a DTensor's rows are local on its ``Shard(0)`` mesh dimensions (FSDP2's ``fully_shard``), so those need no
  collective; on a mesh dimension where it is sharded along another dimension (row-parallel tensor
  parallelism), or where a 1-D tensor is sharded at all, the squared unit norms are summed over that mesh
  dimension's group. Cost: one ``all_reduce`` per such group, whatever the number of tensors (FSDP2: one,
  for the 1-D parameters), of two float64 values per reduced unit;
- FSDP1 is refused by the clipper: its shards are cut from flat parameters at arbitrary offsets, so no rank
  holds whole rows.
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distclip._clip import reduction
from distclip._clip.arguments import require
from distclip._clip.layout import dtensor_class, local_tensor

_MIN_GRAD_NORM = 1e-6  # the paper's floor on ||G_i||, so that a zero gradient gives a finite factor


@dataclass(frozen=True)
class AGC:
    r"""Unit-wise adaptive gradient clipping: scale each unit by
    `\min(1, \lambda \max(\|W_i\|, \epsilon) / \|G_i\|)` with `\lambda` = ``clipping``.

    Given to `distclip.GradClipper` as a policy; the clipper's ``max_norm`` still bounds the global
    norm (every unit is scaled by the smaller of its AGC factor and the global coefficient).
    """

    clipping: float = 0.01
    eps: float = 1e-3

    def __post_init__(self) -> None:
        require(self.clipping > 0, "AGC", "clipping", self.clipping, "a positive number (lambda)")
        require(self.eps >= 0, "AGC", "eps", self.eps, "a non-negative number")


@dataclass(frozen=True)
class _Unit:
    """One parameter as AGC sees it: its local weight and gradient, whether its units are rows, and the
    groups over which its squared unit norms are summed."""

    weight: Tensor
    grad: Tensor
    rows: bool
    groups: tuple[Any, ...]


def unit_factors(agc: AGC, parameters: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``(local gradient, factors)`` for every parameter with a gradient; ``factors`` (float64) broadcasts
    over the local gradient: one per local row, or a 0-d tensor. No host synchronisation."""
    units = [_unit(p) for p in parameters if p.grad is not None]
    squares = [torch.stack([_squared_norms(u.weight, u.rows), _squared_norms(u.grad, u.rows)]) for u in units]
    _sum_over_groups(units, squares)
    result = []
    for unit, sq in zip(units, squares):
        weight_norm, grad_norm = sq.sqrt()
        bound = agc.clipping * torch.clamp(weight_norm, min=agc.eps)
        factors = torch.clamp(bound / torch.clamp(grad_norm, min=_MIN_GRAD_NORM), max=1.0)
        shape = (-1,) + (1,) * (unit.grad.ndim - 1) if unit.rows else ()
        result.append((unit.grad, factors.reshape(shape)))
    return result


def _unit(parameter: Tensor) -> _Unit:
    grad = parameter.grad
    dtensor = dtensor_class()
    if dtensor is None or not isinstance(grad, dtensor):
        return _Unit(parameter.detach(), grad, grad.ndim >= 2, ())
    if (
        not isinstance(parameter, dtensor)
        or parameter.device_mesh != grad.device_mesh
        or parameter.placements != grad.placements
    ):
        raise ValueError(
            "distclip: AGC needs a DTensor gradient laid out like its parameter (same mesh and placements), got "
            f"{getattr(parameter, 'placements', 'a plain tensor')} and {grad.placements}"
        )
    rows = grad.ndim >= 2
    groups = []
    for dim, placement in enumerate(grad.placements):
        if placement.is_partial():
            raise ValueError(f"distclip: AGC cannot take unit norms of a Partial ({placement}) DTensor gradient")
        if placement.is_shard() and not (rows and placement.dim == 0):
            groups.append(grad.device_mesh.get_group(dim))
    return _Unit(local_tensor(parameter.detach()), local_tensor(grad), rows, tuple(groups))


def _squared_norms(t: Tensor, rows: bool) -> Tensor:
    """Squared 2-norms of the units of local tensor ``t`` in float64 (the norms in at least float32)."""
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if rows:
        norms = torch.linalg.vector_norm(t, 2, dim=tuple(range(1, t.ndim)), dtype=dtype)
    else:
        norms = torch.linalg.vector_norm(t, 2, dtype=dtype).reshape(1)
    return norms.to(torch.float64).square()


def _sum_over_groups(units: list[_Unit], squares: list[Tensor]) -> None:
    """Sum each parameter's squared unit norms over its groups, in place: one collective per distinct group,
    in the order the groups first appear (the same on every rank, which holds the same parameters)."""
    groups: dict[int, Any] = {}
    for unit in units:
        for group in unit.groups:
            groups.setdefault(id(group), group)
    for key, group in groups.items():
        members = [i for i, unit in enumerate(units) if any(id(g) == key for g in unit.groups)]
        device = reduction.wire_device(group)
        values = torch.cat([squares[i].flatten().to(device) for i in members])
        reduction.all_reduce_sum_(values, group)
        for i, part in zip(members, values.split([squares[i].numel() for i in members])):
            squares[i] = part.reshape(squares[i].shape).to(squares[i].device)
