"""Local partials: the norms of the gradient tensors this rank holds, with torch's foreach kernels.

Single-process mode takes the per-tensor norms exactly as ``torch.nn.utils`` does (same kernels, same order,
the gradients' own dtype). Sharded mode takes them in float64 and packs this rank's contribution into the
float64 vector that the reduction stage reduces (:class:`WireFormat`).
"""

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distclip._checks import as_float
from distclip._foreach import kernel_groups

# The norms that sharded mode carries exactly span the float32 range: log2 of its smallest subnormal (-149)
# to past log2 of its largest value (128).
_LOG2_LOW, _LOG2_HIGH = -150.0, 129.0
# A scaled p-th power on the wire is kept within 2**-960 .. 2**960: normal, and room to sum 2**60 of them.
_LOG2_POWER_BOUND = 960.0
# Above this p the wire would need thousands of scales; the inf norm is the limit there.
_MAX_SHARDED_P = 1e4


def norm_order(norm_type: float | str, sharded: bool) -> float:
    """``norm_type`` as a float p; in sharded mode, only the p that have a sharded meaning."""
    p = as_float(norm_type, "norm_type")
    if sharded and not (math.isinf(p) or 0 < p <= _MAX_SHARDED_P):
        raise ValueError(
            f"distclip: norm_type={norm_type!r} has no sharded meaning: with group= the norm is "
            f"(sum over ranks of local_norm**p)**(1/p), defined for p in (0, {_MAX_SHARDED_P:g}], inf and "
            "-inf. Use one of those, or clip on a single process with group=None for torch's own semantics"
        )
    return p


def tensor_norms(tensors: list[Tensor], p: float, foreach: bool | None) -> list[Tensor]:
    """The p-norm of each tensor as ``torch.nn.utils`` computes it: one foreach kernel per device/dtype
    group (per-tensor ``vector_norm`` where foreach is unavailable), in the gradients' dtype and in its order.
    """
    norms: list[Tensor] = []
    for _, _, group, use_foreach in kernel_groups(tensors, foreach):
        norms.extend(_norms(group, p, use_foreach))
    return norms


def _norms(group: list[Tensor], p: float, use_foreach: bool, dtype: torch.dtype | None = None) -> list[Tensor]:
    if use_foreach:
        return list(torch._foreach_norm(group, p, dtype=dtype))
    return [torch.linalg.vector_norm(g, p, dtype=dtype) for g in group]


@dataclass(frozen=True)
class WireFormat:
    """How one rank's contribution is laid out in the float64 vector that the reduction combines.

    For finite p the vector holds, for each scale exponent e_j, the sum over local tensors of
    ``(norm * 2**-e_j) ** p``, reduced with SUM; for p <= 6.4 there is one scale, e = 0, and these are plain
    float64 p-th powers (``|x|**p`` of every float32 value is a normal float64 there). For larger p one
    float64 cannot hold the p-th powers of the whole float32 range, so several scales are sent and the total
    is decoded from the smallest one whose sum did not overflow. For inf it holds the max norm and for -inf
    the negated min norm, both reduced with MAX. Two flags follow, reduced with the same op: "a norm is NaN"
    (a MAX reduction may drop a NaN) and "this rank has gradients".
    """

    p: float
    exponents: tuple[float, ...]

    @staticmethod
    def for_order(p: float) -> "WireFormat":
        return WireFormat(p, _scale_exponents(p) if math.isfinite(p) else ())

    @property
    def op(self) -> str:
        return "sum" if self.exponents else "max"

    def scales(self, device: torch.device) -> Tensor:
        return torch.exp2(-torch.tensor(self.exponents, dtype=torch.float64, device=device))


@functools.lru_cache(maxsize=None)
def _scale_exponents(p: float) -> tuple[float, ...]:
    half = _LOG2_POWER_BOUND / p  # log2 of the norms one scale holds on either side of its exponent
    if half >= max(-_LOG2_LOW, _LOG2_HIGH):
        return (0.0,)
    count = math.ceil((_LOG2_HIGH - _LOG2_LOW) / half) - 1
    return tuple(_LOG2_LOW + half * (j + 1) for j in range(count))


def sharded_partial(
    grads: list[Tensor], wire: WireFormat, foreach: bool | None, device: torch.device
) -> Tensor:
    """This rank's contribution to the reduction, as a float64 vector on ``device`` (see :class:`WireFormat`).

    Empty tensors (an empty FSDP shard) hold no element and are left out: torch's -inf norm of one raises.
    """
    grads = [g for g in grads if g.numel()]
    norms = torch.stack([n.to(device) for n in _float64_norms(grads, wire, foreach)]) if grads else (
        torch.zeros(0, dtype=torch.float64, device=device)
    )
    if wire.op == "sum":
        values = (norms[:, None] * wire.scales(device)).pow(wire.p).sum(0)
    elif wire.p > 0:
        values = torch.cat([norms, norms.new_zeros(1)]).amax().reshape(1)
    else:
        values = torch.cat([norms, norms.new_full((1,), math.inf)]).amin().neg().reshape(1)
    flags = torch.stack([norms.isnan().any(), norms.new_tensor(bool(grads), dtype=torch.bool)])
    return torch.cat([values, flags.to(torch.float64)])


def _float64_norms(grads: list[Tensor], wire: WireFormat, foreach: bool | None) -> list[Tensor]:
    norms: list[Tensor] = []
    for _, _, group, use_foreach in kernel_groups(grads, foreach):
        if len(wire.exponents) <= 1:
            norms.extend(_norms(group, wire.p, use_foreach, torch.float64))
        else:
            maxabs = _norms(group, math.inf, use_foreach, torch.float64)
            norms.extend(_max_scaled_norm(g, m, wire.p) for g, m in zip(group, maxabs))
    return norms


def _max_scaled_norm(grad: Tensor, maxabs: Tensor, p: float) -> Tensor:
    # ||g||_p = m * ||g / m||_p with m = max|g|: inside the kernel every |x / m| ** p is then at most 1, where
    # a large p would overflow float64 on |x| ** p. A zero, inf or NaN m is the norm itself.
    usable = torch.isfinite(maxabs) & (maxabs > 0)
    m = torch.where(usable, maxabs, 1.0)
    return torch.where(usable, m * torch.linalg.vector_norm(grad.to(torch.float64) / m, p), maxabs)
