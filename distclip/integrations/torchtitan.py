"""torchtitan: a drop-in for ``torchtitan.distributed.utils.clip_grad_norm_`` (torchtitan 0.3.0).

torchtitan's clip takes the model's parameters on one pipeline stage, DTensors on the stage's mesh (FSDP2,
HSDP, tensor and context parallelism) or plain tensors (pipeline parallelism alone, DDP), and:

- computes ``torch.nn.utils.get_total_norm`` of the gradients, a DTensor reduced with ``full_tensor()`` (one
  collective per sharded mesh dimension);
- with ``ep_enabled=True`` does so separately for the parameters on a mesh with an ``"ep"`` dimension (the
  experts) and for the others, and combines the two norms (``(a**p + b**p) ** (1/p)``, max for inf);
- with ``pp_mesh`` reduces the stage norms over the pipeline group (``norm**p`` summed, max for inf);
- scales the gradients with ``torch.nn.utils.clip_grads_with_norm_`` and returns the norm as a plain tensor
  of the gradients' dtype.

Here the same layout is handed to distclip whole: the DTensors' placements say what is a piece and what a
copy, the pipeline stages are disjoint pieces, the experts and the dense parameters are summed, so every
element is counted once and the norm comes from one ``all_reduce``. The result is returned as torchtitan
returns it: a plain (not DTensor) tensor of the dtype torchtitan's would have.

Differences, by design (docs/migration.md, "From torchtitan"):

- the norm is computed in float64 and is overflow-safe (torchtitan's float32 ``norm**p`` over the pipeline
  overflows for gradients around 1e19 and ``p = 2``), then cast to torchtitan's dtype, so it can differ
  from torchtitan's float32 result in the last bits;
- a NaN anywhere gives NaN on every rank, ``error_if_nonfinite`` raises on every rank together (torchtitan
  checks each stage's norm before the pipeline reduction, so one stage can raise while the others wait);
- ``norm_type=-inf`` is the minimum over stages and experts (torchtitan takes the maximum there);
- with ``pp_mesh`` or DTensors, ``norm_type`` must be positive, inf or -inf, ``max_norm`` non-negative, and
  every rank must pass the same arguments (distclip's sharded-mode checks, on every rank together).

Without ``pp_mesh`` and with plain tensors the call is ``distclip.clip_grad_norm_`` with ``group=None``:
bitwise torch's, as torchtitan's is.
"""

from collections.abc import Iterable
from functools import reduce
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

import distclip


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    pp_mesh: Any = None,
    ep_enabled: bool = False,
) -> Tensor:
    """Clip the gradients of ``parameters`` in place by their total norm over the whole model; return it.

    The signature and the result of ``torchtitan.distributed.utils.clip_grad_norm_``: ``parameters`` are this
    rank's parameters (a tensor or an iterable), ``pp_mesh`` the 1-D pipeline mesh (``None`` without pipeline
    parallelism), ``ep_enabled`` whether expert parameters live on a mesh with an ``"ep"`` dimension. Returns
    the norm of the whole model's gradient before clipping, the same on every rank, as a plain 0-d tensor of
    the gradients' dtype (promoted over them; float32 where there are none).
    """
    parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if ep_enabled:
        _check_ep(parameters)
    group = None if pp_mesh is None else _group(parameters, pp_mesh)
    total_norm = distclip.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach, group=group)
    local = total_norm.to_local() if isinstance(total_norm, DTensor) else total_norm
    return local.to(_dtype(grads, ep_enabled))


def _group(parameters: list[Tensor], pp_mesh: Any) -> Any:
    """The group over which this rank's pieces make up the whole model, given the pipeline mesh.

    Plain parameters: each stage holds its own, whole (pipeline parallelism, DDP replicas inside a stage
    reduce alone): the pipeline group. DTensor parameters: the stage's mesh times the pipeline, which in
    torchtitan is the world; decided from the parameters, not their gradients, so a rank without gradients
    takes the same group as its peers.
    """
    meshes = {id(m): m for m in (_mesh_of(p) for p in parameters) if m is not None}.values()
    if not meshes:
        return pp_mesh.get_group()
    world_size = dist.get_world_size()
    for mesh in meshes:
        if mesh.size() * pp_mesh.size() != world_size:
            raise ValueError(
                f"distclip: a DTensor parameter's mesh ({mesh.size()} ranks, dims {mesh.mesh_dim_names}) times "
                f"the pipeline mesh ({pp_mesh.size()} ranks) is not the world ({world_size} ranks): the parameters' "
                "meshes must cover every non-pipeline dimension of torchtitan's world mesh, or a copy on a "
                "dimension they leave out would count twice"
            )
    return dist.group.WORLD


def _mesh_of(parameter: Tensor) -> Any:
    return parameter.device_mesh if isinstance(parameter, DTensor) else None


def _check_ep(parameters: list[Tensor]) -> None:
    """What torchtitan asserts with ``ep_enabled``: every parameter with a gradient is a DTensor on a mesh
    with named dimensions (``"ep"`` among them for the experts)."""
    for i, p in enumerate(parameters):
        if p.grad is None:
            continue
        if _mesh_of(p) is None or _mesh_of(p.grad) is None or p.device_mesh.mesh_dim_names is None:
            raise ValueError(
                f"distclip: with ep_enabled=True every parameter with a gradient must be a DTensor on a mesh "
                f"with named dimensions (torchtitan's expert layout); parameters[{i}] is not"
            )


def _dtype(grads: list[Tensor], ep_enabled: bool) -> torch.dtype:
    """The dtype of torchtitan's result: torch's ``get_total_norm`` promotes over the gradients' dtypes and
    gives the default dtype for none; with experts, the expert and the dense norms are promoted together."""
    if not ep_enabled:
        return _promoted(grads)
    experts = [g for g in grads if "ep" in g.device_mesh.mesh_dim_names]
    dense = [g for g in grads if "ep" not in g.device_mesh.mesh_dim_names]
    return torch.promote_types(_promoted(experts), _promoted(dense))


def _promoted(grads: list[Tensor]) -> torch.dtype:
    if not grads:
        return torch.get_default_dtype()
    return reduce(torch.promote_types, (g.dtype for g in grads))
