"""Total norm: the norm of the whole gradient vector, from per-tensor norms or from the reduced vector."""

import math

import torch
from torch import Tensor

from distclip._layout import Layout
from distclip._partials import WireFormat


def combine(norms: list[Tensor], p: float, device: torch.device) -> Tensor:
    """``||(n_1, ..., n_k)||_p`` of the per-tensor norms on ``device``: torch's formula and kernels."""
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), p)


def decode(reduced: Tensor, wire: WireFormat) -> Tensor:
    """The total norm (float64, 0-d, on the reduced vector's device) from the reduced vector.

    Finite p: ``2**e_j * S_j ** (1/p)`` for the smallest scale j whose sum ``S_j`` is finite; inf: the max;
    -inf: the min. NaN if any rank had a NaN norm; 0 if no rank had gradients. No host synchronisation.
    """
    values, any_nan, any_grads = reduced[:-2], reduced[-2], reduced[-1]
    if wire.op == "sum":
        j = torch.argmax(values.isfinite().to(torch.uint8))  # 0 if none is finite: that sum is inf or NaN
        total = values[j].pow(1.0 / wire.p) / wire.scales(reduced.device)[j]
    else:
        total = values[0] if wire.p > 0 else -values[0]
    total = torch.where(any_nan > 0, math.nan, total)
    return torch.where(any_grads > 0, total, 0.0)


def returned(total: Tensor, layout: Layout) -> Tensor:
    """``total`` as the call returns it: for DTensors all on one mesh, torch's type there (a replicated DTensor
    of their dtype), so that code calling ``.full_tensor()`` keeps working; else ``total`` itself."""
    if layout.mesh is None:
        return total
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(
        total.to(layout.dtype), layout.mesh, [Replicate()] * layout.mesh.ndim, run_check=False
    )


def check_finite(total: Tensor, p: float, error_if_nonfinite: bool, layout: Layout) -> None:
    """Raise ``RuntimeError`` (torch's message) if asked to and ``total`` is NaN or inf.

    In sharded mode ``total`` is the same on every rank, so every rank raises together.
    """
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        where = (
            f" (the norm over all {layout.world_size} ranks of the group; every rank raises, no gradient was changed)"
            if layout.sharded
            else ""
        )
        raise RuntimeError(
            f"The total norm of order {p} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            f"set `error_if_nonfinite=False`{where}"
        )
