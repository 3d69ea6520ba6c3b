"""Total norm: the norm of the whole gradient vector, from per-tensor norms or from every rank's row."""

import math

import torch
from torch import Tensor

from distclip._clip import row
from distclip._clip.layout import Layout
from distclip._clip.partials import combine_float64


def combine(norms: list[Tensor], p: float, device: torch.device) -> Tensor:
    """``||(n_1, ..., n_k)||_p`` of the per-tensor norms on ``device``: torch's formula and kernels."""
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), p)


def combine_vectors(vectors: list[Tensor], p: float, device: torch.device) -> Tensor:
    """`combine` of per-tensor norms given as vectors (`partials.part_norms`): the same input, the same bits."""
    return torch.linalg.vector_norm(torch.cat([v.to(device) for v in vectors]), p)


def from_rows(rows: Tensor, p: float) -> Tensor:
    r"""The total norm (float64, 0-d, beside ``rows``) from every rank's row.

    `(\sum_r n_r^p)^{1/p}` over the local norms of the ranks that hold elements, computed as
    ``m * ||n / m||_p`` so that no p overflows; the max for inf, the min for -inf; NaN if any rank's norm is
    NaN; 0 if no rank holds an element. Every rank holds the same rows, so every rank gets the same bits.
    """
    local_norms, has = row.norms(rows)
    identity = math.inf if p == -math.inf else 0.0
    total = combine_float64(torch.where(has, local_norms, identity), p)
    return torch.where(has.any(), total, 0.0)


def for_caller(total: Tensor, layout: Layout) -> Tensor:
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
