"""A clip groups its tensors by device and dtype as torch does (one CPU dtype recognised without torch's pybind11
grouping), and sharded mode scales the small tensors of a CPU bfloat16/float16 group side by side through a buffer
(`scaling._scale_joined_`): every gradient ends with the bits ``mul_`` by the float32 factor gives it, in
place (same storage, shape and strides, one version bump), over several runs of the buffer, with the tensors
it cannot view flat (strided, large, 0-d) scaled as before, and a tensor that comes twice scaled twice."""

import pytest
import torch

from distclip._clip import scaling
from distclip._clip.foreach import by_device_and_dtype, sizes_of


def _mixed_tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, scaling._JOINED_MAX, (700,), generator=gen).tolist()  # ~700K elements: several runs
    tensors = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    tensors[4] = torch.randn(30, 40, generator=gen).to(dtype)  # contiguous 2-D: viewed flat
    tensors[9] = torch.randn(40, 30, generator=gen).to(dtype).t()  # transposed: scaled by itself
    tensors[17] = torch.randn(2 * scaling._JOINED_MAX - 2, generator=gen).to(dtype)[::2]  # strided 1-D: joined
    tensors[25] = torch.randn(scaling._JOINED_MAX + 5, generator=gen).to(dtype)  # large
    tensors[31] = torch.tensor(1.5, dtype=dtype)  # 0-d: float64 math
    tensors[40][:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    return tensors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("coefficient", [0.1234567890123, 1.0, 3e-9])
def test_joined_scaling_gives_mul_bits_in_place(dtype, coefficient):
    tensors = _mixed_tensors(dtype)
    assert sum(t.numel() for t in tensors if t.numel() < scaling._JOINED_MAX) > 2 * scaling._JOINED_BUFFER
    expected = [t.clone() for t in tensors]
    factor = torch.tensor(coefficient, dtype=torch.float64)
    for t in expected:
        t.mul_(factor if t.dim() == 0 else factor.to(torch.float32))
    before = [(t.data_ptr(), t.shape, t.stride(), t._version) for t in tensors]

    grouped = by_device_and_dtype(tensors)
    scaling.scale_(grouped, factor, None, sizes_of(grouped))

    for i, (t, e, (ptr, shape, stride, version)) in enumerate(zip(tensors, expected, before)):
        assert (t.data_ptr(), t.shape, t.stride(), t._version) == (ptr, shape, stride, version + 1), i
        assert t.dtype == dtype
        assert torch.equal(t.isnan(), e.isnan()), i
        assert torch.equal(t.nan_to_num(0.0), e.nan_to_num(0.0)), i


def test_a_tensor_that_comes_twice_is_scaled_twice():
    tensors = [torch.full((8,), 3.0, dtype=torch.bfloat16) for _ in range(4)]
    listed = tensors + [tensors[1]]
    grouped = by_device_and_dtype(listed)
    scaling.scale_(grouped, torch.tensor(0.5, dtype=torch.float64), None, sizes_of(grouped))
    assert torch.equal(tensors[1], torch.full((8,), 0.75, dtype=torch.bfloat16))
    assert all(torch.equal(t, torch.full((8,), 1.5, dtype=torch.bfloat16)) for t in tensors[::2] + tensors[3:])


@pytest.mark.parametrize("joined", [False, True])
def test_joined_takes_the_buffer_and_the_default_takes_foreach_mul(joined):
    # Which NaN a bfloat16 NaN becomes tells the loops apart: torch's scalar loop (a 1-element tensor by itself)
    # makes 0x7FC0, its vectorised loop (40 of them side by side in the buffer) another one. The default (the
    # single-process path) must keep torch's kernels; joined=True must take the buffer.
    tensors = [torch.tensor([float("nan")], dtype=torch.bfloat16) for _ in range(40)]
    expected = [t.clone() for t in tensors]
    torch._foreach_mul_(expected, torch.tensor(0.5))
    grouped = by_device_and_dtype(tensors)
    scaling.scale_(grouped, torch.tensor(0.5, dtype=torch.float64), None, sizes_of(grouped) if joined else None)
    bits = [t.view(torch.int16).item() for t in tensors]
    assert all(t.isnan().item() for t in tensors)
    assert (bits != [e.view(torch.int16).item() for e in expected]) is joined


@pytest.mark.parametrize("kind", ["one_cpu_dtype", "two_dtypes", "meta_among_cpu"])
def test_grouping_is_torchs(kind):
    # by_device_and_dtype recognises one CPU dtype by itself and hands every other list to torch's grouping:
    # the same keys, order and tensor objects either way.
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

    tensors = [torch.randn(3) for _ in range(5)]
    if kind == "two_dtypes":
        tensors[2:4] = [t.to(torch.bfloat16) for t in tensors[2:4]]
    elif kind == "meta_among_cpu":
        tensors[1] = torch.empty(3, device="meta")
    ours = by_device_and_dtype(tensors)
    theirs = {key: group for key, ([group], _) in _group_tensors_by_device_and_dtype([tensors]).items()}
    assert list(ours) == list(theirs)
    assert all([id(t) for t in ours[key]] == [id(t) for t in theirs[key]] for key in ours)
    with pytest.raises(RuntimeError):
        by_device_and_dtype([])
