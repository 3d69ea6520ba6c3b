"""Megatron-core: drop-ins for ``megatron.core.optimizer.clip_grads`` (megatron-core 0.16).

Megatron's optimizer clips in two calls (``MegatronOptimizer.clip_grad_norm``):

- ``get_grad_norm_fp32(grads_for_norm, norm_type, grad_stats_parallel_group)``: the norm of gradients that
  the optimizer has already filtered so that each element counts once (``get_main_grads_for_grad_norm``:
  no ``shared`` parameter, such as the pipeline's second copy of a tied embedding, and a parameter that is not
  ``tensor_model_parallel`` only on tensor-parallel rank 0). Each rank's list is its disjoint piece of the
  vector over ``grad_stats_parallel_group`` (the model-parallel group, or the world for the distributed
  optimizer; ``None``: the world). Megatron sums ``norm**p`` in float32 with one ``all_reduce`` (max for
  inf) and returns a Python float.
- ``clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad)``: scales every
  ``.grad`` (or ``.decoupled_grad``) by ``max_norm / (total_norm + 1e-6)`` if that is below 1, and leaves them
  unchanged otherwise (also when the norm is NaN).

Both are translated here into distclip's terms: the filtered gradients are this rank's pieces over the group
(``distclip.get_total_norm(..., group=)``, one ``all_reduce``), and the scaling is
``distclip.clip_grads_with_norm_``. Expert parameters have their own optimizer and group in Megatron (the
expert-model-parallel one) and ``ChainedOptimizer`` combines the norms as ``sqrt(sum of squares)``: call
``get_grad_norm_fp32`` once per group as Megatron does, or clip everything in one collective with
``distclip.clip_grad_norm_`` and declared replicas (docs/migration.md, "From Megatron-core").

Differences, by design (docs/migration.md):

- the norm is computed and reduced in float64 and is overflow-safe (Megatron's float32 ``norm**2`` overflows
  for gradients around 1e19); a NaN anywhere gives NaN on every rank, also for inf (a MAX ``all_reduce`` can
  drop it);
- it runs on any device, the CPU included (Megatron's allocates its buffers on ``'cuda'``), for any dtype
  (Megatron's clip asserts float32 ``.grad``), and with no gradients on a rank for every p;
- ``norm_type`` must be positive or inf, and every rank must pass the same one (checked in the same
  collective: a mismatch raises on every rank);
- DTensor gradients count each element once: their ``Replicate`` mesh dimensions are copies, and with the
  world as the group they are reduced over the world alone (Megatron sums over their mesh and then again over
  the world).
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

import distclip


@dataclass
class _Grad:
    """A gradient that is not a parameter's ``.grad`` (Megatron's ``decoupled_grad``)."""

    grad: Tensor


@torch.no_grad()
def get_grad_norm_fp32(
    grads_for_norm: list[Tensor] | Tensor,
    norm_type: int | float = 2,
    grad_stats_parallel_group: Any = None,
) -> float:
    """The norm of the gradients ``grads_for_norm`` over ``grad_stats_parallel_group``, as a float.

    Megatron-core's signature and result: each rank passes its own gradients, already filtered so that each
    element of the model's gradient is in exactly one rank's list, and gets back the norm of all of them, the
    same on every rank. ``grad_stats_parallel_group=None`` is the world. DTensor gradients (Megatron-FSDP)
    are reduced over their mesh too, as Megatron does; their mesh times the group must then be the world.
    """
    grads = [grads_for_norm] if isinstance(grads_for_norm, Tensor) else list(grads_for_norm)
    group = _group(grads, grad_stats_parallel_group)
    return distclip.get_total_norm(grads, float(norm_type), group=group).item()


@torch.no_grad()
def clip_grad_by_total_norm_fp32(
    parameters: list[Tensor] | Tensor,
    max_norm: int | float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Scale the gradients of ``parameters`` in place by ``max_norm / (total_norm + 1e-6)`` if it is below 1.

    Megatron-core's signature and semantics: ``total_norm`` is the float ``get_grad_norm_fp32`` returned;
    with ``use_decoupled_grad`` the gradients are the parameters' ``decoupled_grad`` (those without one are
    skipped), else their ``.grad``. A coefficient of 1 or more, or NaN, leaves every gradient unchanged. Local
    only: no collective.
    """
    parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    if use_decoupled_grad:
        parameters = [_Grad(g) for g in (getattr(p, "decoupled_grad", None) for p in parameters) if g is not None]
    max_norm = float(max_norm)
    total_norm = float(total_norm)
    if not max_norm / (total_norm + 1.0e-6) < 1.0:
        return
    distclip.clip_grads_with_norm_(parameters, max_norm, torch.tensor(total_norm, dtype=torch.float64))


def _group(grads: list[Tensor], group: Any) -> Any:
    """The group the pieces are reduced over: ``group`` (the world for ``None``), or the world when some
    gradients are DTensors, which Megatron reduces over their mesh's group and then over ``group``."""
    from torch.distributed.tensor import DTensor

    meshes = [g.device_mesh for g in grads if isinstance(g, DTensor)]
    if group is None or group is dist.group.WORLD:
        return dist.group.WORLD
    if not meshes:
        return group
    world_size = dist.get_world_size()
    mesh_size = meshes[0].size()
    if any(m.size() != mesh_size for m in meshes) or mesh_size * dist.get_world_size(group) != world_size:
        raise ValueError(
            f"distclip: DTensor gradients on a mesh of {mesh_size} ranks reduced also over a group of "
            f"{dist.get_world_size(group)} ranks do not make up the world ({world_size} ranks): pass "
            "grad_stats_parallel_group=None (the world), or plain local tensors"
        )
    return dist.group.WORLD

