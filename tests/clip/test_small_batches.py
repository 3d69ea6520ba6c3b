"""Small gradients are read through the CPU norm's buffer in batches (`partials._batches`): every element once,
each batch as full as the buffer allows; whether all tensors are small (batches found by bisection)
or large ones are among them (one pass), and whatever the small tensors' shapes."""

import math

import pytest
import torch

from distclip._clip import partials
from distclip._clip.foreach import by_device_and_dtype


def _small_tensors(count, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 20000, (count,), generator=gen).tolist()
    tensors = [torch.randn(n, generator=gen) for n in sizes]
    # 2-D, transposed and 0-d tensors among the 1-D ones
    tensors[3] = torch.randn(30, 70, generator=gen)
    tensors[5] = torch.randn(40, 50, generator=gen).t()
    tensors[8] = torch.tensor(2.5)
    return tensors


@pytest.mark.parametrize("with_large", [False, True])
def test_batches_cover_every_element_once_and_fill_the_buffer(with_large):
    tensors = _small_tensors(120, seed=1)
    if with_large:
        tensors[60:60] = [torch.randn(partials._CHUNK * 3 + 17)]
    numels = [t.numel() for t in tensors]
    batches = list(partials._batches(tensors, numels, partials._CHUNK))
    assert sum(len(b) for b, _ in batches) >= len(tensors) and len(batches) > 3
    joined = torch.cat([partials._joined(batch) for batch, _ in batches])
    # the same elements (a large tensor's blocks come as they are reached, the small batch around it goes on)
    assert torch.equal(joined.sort().values, torch.cat([t.reshape(-1) for t in tensors]).sort().values)
    assert all(size == sum(t.numel() for t in batch) <= partials._CHUNK for batch, size in batches)
    small_ids = {id(t) for t in tensors if t.numel() < partials._CHUNK}
    small = [(batch, size) for batch, size in batches if id(batch[0]) in small_ids]  # not a large one's blocks
    for (_, size), (following, _) in zip(small, small[1:]):
        assert size + following[0].numel() > partials._CHUNK


@pytest.mark.parametrize("p", [2.0, 3.0, 1.0, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_norm_of_many_small_tensors(p, dtype):
    tensors = [t.to(dtype) for t in _small_tensors(200, seed=2)]
    reference = torch.linalg.vector_norm(torch.cat([t.double().reshape(-1) for t in tensors]), p).item()
    norm = partials.local_norm(by_device_and_dtype(tensors), p, None, torch.device("cpu")).item()
    assert abs(norm - reference) <= 1e-6 * reference, (p, norm, reference)
