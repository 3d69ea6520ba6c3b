"""Local partials: the norms of the gradient tensors this rank holds, with torch's foreach kernels.

Single-process mode takes the per-tensor norms exactly as ``torch.nn.utils`` does (same kernels, same order,
the gradients' own dtype). Sharded mode needs the rank's local norm accurate over the whole float32 range: on
accelerators from float64 kernels; on the CPU, where those read ~10x slower, from float32 kernels with the
pieces that overflowed or underflowed normed again in float64. The local norm goes, with the call's
arguments, into this rank's row of the reduction (`distclip._clip.row`).
"""

import math
from itertools import accumulate

import torch
from torch import Tensor

from distclip._clip import compiled, threads
from distclip._clip.foreach import Grouped, Sizes, kernel_groups, runs, sizes_of

# For p up to this, |x| ** p of every float32 value (2**-149 .. 2**128) is a normal float64 number, so the
# float64 norm kernels neither overflow nor underflow; above it each tensor is first scaled by its max |x|.
_PLAIN_FLOAT64_MAX_P = 6.0


def tensor_norms(grouped: Grouped, p: float, foreach: bool | None) -> list[Tensor]:
    """The p-norm of each tensor as ``torch.nn.utils`` computes it: one foreach kernel per device/dtype
    group (per-tensor ``vector_norm`` where foreach is unavailable), in the gradients' dtype and in its order.
    """
    norms: list[Tensor] = []
    for _, _, group, use_foreach in kernel_groups(grouped, foreach):
        norms.extend(_norms(group, p, use_foreach))
    return norms


def part_norms(parts: list[list[Tensor]], p: float, use_foreach: bool) -> Tensor:
    """`tensor_norms` of one device/dtype group split into ``parts`` (`threads.split`), as one vector in
    order: the same kernel per tensor, the parts on threads at once."""
    return torch.cat(threads.map_parts(lambda part: torch.stack(_norms(part, p, use_foreach)), parts))


def _norms(group: list[Tensor], p: float, use_foreach: bool, dtype: torch.dtype | None = None) -> list[Tensor]:
    if use_foreach:
        return list(torch._foreach_norm(group, p, dtype=dtype))
    return [torch.linalg.vector_norm(g, p, dtype=dtype) for g in group]


def local_norm(grouped: Grouped, p: float, foreach: bool | None, device: torch.device,
               numels: Sizes | None = None) -> Tensor | None:
    """This rank's local norm as a float64 0-d tensor on ``device``, or ``None`` if it holds no element.

    The local norm is ``||(||g_1||_p, ..., ||g_k||_p)||_p`` over the non-empty local tensors of ``grouped``
    (``numels``: their sizes, if known), every norm in float64 (max |x| for inf, min |x| for -inf); empty tensors
    (an empty FSDP shard) hold no element and are left out, as torch's inf norm of one raises.
    """
    numels = sizes_of(grouped) if numels is None else numels
    if any(0 in sizes for sizes in numels.values()):
        grouped = {key: [g for g, n in zip(group, numels[key]) if n] for key, group in grouped.items()}
        grouped = {key: group for key, group in grouped.items() if group}
        numels = {key: [n for n in numels[key] if n] for key in grouped}
    if not grouped:
        return None
    return combine_float64(torch.cat([n.to(device) for n in _float64_norms(grouped, numels, p, foreach)]), p)


def combine_float64(norms: Tensor, p: float) -> Tensor:
    """``||norms||_p`` of a float64 vector of norms of float32-range data, without overflow or underflow for
    any p: above ``_PLAIN_FLOAT64_MAX_P`` as ``m * ||norms / m||_p`` with ``m = max(norms)`` (a NaN, inf or
    zero ``m`` is the result itself). inf: the max; -inf: the min."""
    if p == math.inf:
        return norms.amax()
    if p == -math.inf:
        return norms.amin()
    if p <= _PLAIN_FLOAT64_MAX_P:
        return torch.linalg.vector_norm(norms, p)
    return _max_scaled(norms, norms.amax(), p)


def _float64_norms(grouped: Grouped, numels: Sizes, p: float, foreach: bool | None) -> list[Tensor]:
    """Vectors of float64 norms of pieces of the non-empty tensors of ``grouped`` (``numels``: their sizes, by
    group; tensors, or chunks of them) whose p-combination is their norm."""
    norms: list[Tensor] = []
    for device, dtype, group, use_foreach in kernel_groups(grouped, foreach):
        if math.isinf(p):
            norms.append(torch.stack(_extreme_abs(group, numels[device, dtype], p, use_foreach)).to(torch.float64))
        elif device.type == "cpu" and dtype != torch.float64:
            norms.extend(_fast_then_exact(group, numels[device, dtype], p, dtype))
        else:
            norms.append(torch.stack(_exact_norms(group, p, use_foreach)))
    return norms


def _extreme_abs(group: list[Tensor], numels: list[int], p: float, use_foreach: bool) -> list[Tensor]:
    """max |x| (inf) or min |x| (-inf) of pieces of ``group``: exact in any dtype. On the CPU the inf norm is
    read with aminmax over batched pieces, since torch's inf-norm kernels read ~6x slower and cost a kernel per
    tensor; -inf keeps the norm kernel, as |x| of a piece would be a temporary its size."""
    if group[0].device.type != "cpu":
        return _norms(group, p, use_foreach)
    return [
        torch.stack(torch.aminmax(piece)).abs().amax() if p > 0 else torch.linalg.vector_norm(piece, p)
        for piece in (
            batch[0] if len(batch) == 1 else _joined(batch)
            for batch, _ in _batches(group, numels, _DIRECT_CHUNK)
        )
    ]


def _exact_norms(group: list[Tensor], p: float, use_foreach: bool) -> list[Tensor]:
    """Float64 norms from float64 kernels: no host synchronisation (the path for accelerators)."""
    if p <= _PLAIN_FLOAT64_MAX_P:
        return _norms(group, p, use_foreach, torch.float64)
    maxabs = _norms(group, math.inf, use_foreach, torch.float64)
    return [_max_scaled(g.to(torch.float64), m, p) for g, m in zip(group, maxabs)]


# Elements of the float32 buffer (1 MiB) through which a CPU norm reads most pieces: small tensors side by side,
# chunks of large ones, slices of strided ones.
_CHUNK = 1 << 18
# Elements of a block of a contiguous tensor whose 2-norm one call reads in place (float32: 16 MiB, 16 KiB of row
# norms; bfloat16/float16, through the compiled kernel: 8 MiB).
_DIRECT_CHUNK = 1 << 22
# Elements in a row of such a block. torch's float32 2-norm kernel adds a row in a few running sums, so over a
# whole tensor it is off by 1e-5 at 16K equal elements (the worst case of running sums) and by 3e-3 on a
# 38M-element tensor; over rows of 1024 it stays under 2e-6, and the rows' norms are combined in float64 (the
# compiled kernel's rows are of the same length).
_ROW_LENGTH = compiled.ROW
# A float32 p-th power sum at or above this is as accurate as float32 sums are: each term lost to underflow was
# below 2**-149, so 2**40 of them stay under 2**-109, a 2**-49 fraction of the sum. Below it (a tiny or all-zero
# piece) the piece is normed again in float64.
_LOWEST_ACCURATE_POWER_SUM = 2.0**-60


def _fast_then_exact(group: list[Tensor], numels: list[int], p: float, dtype: torch.dtype) -> list[Tensor]:
    r"""Float64 norms of pieces of a float32/bfloat16/float16 CPU ``group`` (``numels``: its tensors' sizes, none
    0), where float64 kernels read ~10x slower than float32 ones (and upcast a copy of what they read).

    For p = 2, the large contiguous tensors are read in place as blocks of rows of ``_ROW_LENGTH`` elements: a
    float32 block by torch's float32 norm kernel, row by row; a bfloat16/float16 block by the compiled kernel
    (`distclip._clip.compiled`), which sums each row's float32 squares; the rows' results are added in float64.
    Every other piece (small tensors side by side, the short ends of large ones, slices of strided ones, every
    piece for p != 2, whose norm kernel reads ~10x slower, and bfloat16/float16 blocks when the compiled kernel
    is off) goes through a float32 buffer: `|x|^p` elementwise (each term rounded once), then ``sum``, whose
    cascade summation keeps the relative error near float32's unit roundoff for any length. A piece whose power
    sum overflowed, underflowed or is NaN is normed again in float64, ``_CHUNK`` elements at a time.
    """
    rows = p == 2 and (dtype == torch.float32 or compiled.enabled(dtype))
    buffer = _Buffer(min(_CHUNK, sum(numels)))
    pieces, sums, blocks = [], [], {}  # blocks: the compiled kernel's, by their index in sums
    for batch, size in _batches(group, numels, _DIRECT_CHUNK if rows else _CHUNK, _ROW_LENGTH if rows else 1):
        pieces.append(batch)
        block = batch[0]
        if rows and len(batch) == 1 and block.is_contiguous() and size % _ROW_LENGTH == 0:
            block = block.view(-1, _ROW_LENGTH)
            if dtype == torch.float32:
                row_norms = torch.linalg.vector_norm(block, dim=1).to(torch.float64)
                sums.append(torch.dot(row_norms, row_norms))
                continue
            if block.size(0) >= 2:  # one row would be a second compile (torch specialises sizes 0 and 1)
                blocks[len(sums)] = block
                sums.append(None)
                continue
        sums.append(buffer.power_sum(batch, size, p))
    if blocks:
        kernel_sums = compiled.square_sums(list(blocks.values()))
        for (i, block), s in zip(blocks.items(), kernel_sums or [None] * len(blocks)):
            if s is None:
                s = torch.stack([buffer.power_sum([c], c.numel(), p) for c in block.view(-1).split(_CHUNK)]).sum(
                    dtype=torch.float64)
            sums[i] = s
    power_sums = torch.stack([s.to(torch.float64) for s in sums])
    norms = power_sums.pow(1.0 / p)
    # the test on the host: one read of the sums (a CPU tensor) costs less than five kernels of a few us each
    redo = [i for i, s in enumerate(power_sums.tolist()) if not _LOWEST_ACCURATE_POWER_SUM <= s < math.inf]
    for i in redo:
        slices = [s for t in pieces[i] for s in _slices(t, _CHUNK)]
        norms[i] = combine_float64(torch.stack(_exact_norms(slices, p, use_foreach=False)), p)
    return [norms]


class _Buffer:
    """The float32 buffer through which pieces are read, allocated on first use: large float32 tensors are read in
    place for p = 2, and a group of them never needs it. Small bfloat16/float16 tensors are joined in a buffer of
    their own dtype first and converted in one copy: ``cat`` converting as it joins costs ~1.4 us a tensor on the
    CPU, against ~0.1 us for a same-dtype ``cat``."""

    def __init__(self, size: int):
        self.size, self.tensor, self.joined = size, None, None

    def power_sum(self, batch: list[Tensor], size: int, p: float) -> Tensor:
        """The float32 sum of ``|x|^p`` over the elements of ``batch`` (``size`` of them, at most the buffer's)."""
        if self.tensor is None:
            self.tensor = torch.empty(self.size, dtype=torch.float32)
        powers = self.tensor[:size]
        first = batch[0]
        in_place = len(batch) == 1 and first.dtype == torch.float32 and first.is_contiguous()
        if len(batch) > 1 and first.dtype != torch.float32:
            if self.joined is None:
                self.joined = torch.empty(self.size, dtype=first.dtype)
            powers.copy_(_joined(batch, out=self.joined[:size]))
        elif len(batch) > 1:
            _joined(batch, out=powers)
        elif not in_place:
            powers.view(first.shape).copy_(first)
        source = first.reshape(-1) if in_place else powers
        if p == 2:
            torch.square(source, out=powers)
        else:
            torch.abs(source, out=powers).pow_(p)
        return powers.sum()


def _batches(group: list[Tensor], numels: list[int], chunk: int, row: int = 1):
    """``(pieces, elements)`` for ``group``'s non-empty tensors (``numels``: their sizes), the pieces views or
    the tensors themselves: tensors under ``_CHUNK`` elements side by side, at most ``_CHUNK`` elements a list;
    a larger tensor, if it is dense, as its first ``n - n % row`` elements in chunks of at most ``chunk`` (1-D
    for ``row`` 1; else blocks of rows of ``row``, split evenly, so no block has fewer rows than it needs to), one
    a list, and its last ``n % row`` batched as a small tensor; if it is not, as
    its `_slices` of at most ``_CHUNK`` elements, one a list (flattening it, or handing it whole to a
    reduction, would copy it whole). When all are small, the lists are found by bisecting the running sizes,
    with no per-tensor Python; else in one pass, with no per-tensor work beyond the size test for small ones."""
    if 0 < min(numels, default=1) and max(numels, default=0) < _CHUNK:
        yield from ((group[start:stop], size) for start, stop, size in runs(list(accumulate(numels)), _CHUNK))
        return
    batch, size = [], 0
    for g, n in zip(group, numels):
        if n >= _CHUNK:
            flat = _dense_view(g)
            if flat is None:
                yield from (([s], s.numel()) for s in _slices(g, _CHUNK))
                continue
            whole = n - n % row
            if row == 1:
                blocks = flat.split(chunk)
            else:
                blocks = flat[:whole].view(-1, row).tensor_split(-(-whole // chunk))
            yield from (([b], b.numel()) for b in blocks)
            g, n = flat[whole:], n - whole
        if n == 0:
            continue
        if size + n > _CHUNK:
            yield batch, size
            batch, size = [], 0
        batch.append(g)
        size += n
    if batch:
        yield batch, size


def _joined(batch: list[Tensor], out: Tensor | None = None) -> Tensor:
    """The elements of the small tensors of ``batch`` side by side in one 1-D tensor (``out``). 1-D tensors go in
    as they are: a view of each would cost more host time (~2.5 us) than the copy of a small one."""
    if set(map(Tensor.dim, batch)) != {1}:
        batch = [t if t.dim() == 1 else t.reshape(-1) for t in batch]
    return torch.cat(batch, out=out)


def _dense_view(t: Tensor) -> Tensor | None:
    """``t``'s elements as a 1-D view in memory order if they fill their memory without gaps or overlaps: a
    contiguous tensor, or a permutation of one's dimensions (a transpose, channels_last); else None."""
    if t.is_contiguous():
        return t.view(-1)
    dense = t.permute(_outer_first(t))
    return dense.view(-1) if dense.is_contiguous() else None


def _slices(t: Tensor, limit: int):
    """``t``'s elements as views of at most ``limit`` elements, slicing the dimensions of largest stride first,
    so that each slice spans as little memory as it can."""
    if t.numel() <= limit:
        yield t
        return
    t = t.permute(_outer_first(t))
    if t.dim() == 1:
        yield from t.split(limit)
    elif t[0].numel() <= limit:
        yield from t.split(limit // t[0].numel())
    else:
        for s in t.unbind(0):
            yield from _slices(s, limit)


def _outer_first(t: Tensor) -> list[int]:
    return sorted(range(t.dim()), key=t.stride, reverse=True)


def _max_scaled(values: Tensor, maxabs: Tensor, p: float) -> Tensor:
    # ||v||_p = m * ||v / m||_p with m = max |v|: every |v / m| ** p is then at most 1, where |v| ** p would
    # overflow (or all underflow) for a large p. A zero, inf or NaN m is the norm itself.
    usable = torch.isfinite(maxabs) & (maxabs > 0)
    m = torch.where(usable, maxabs, 1.0)
    return torch.where(usable, m * torch.linalg.vector_norm(values / m, p), maxabs)
