"""distclip.fast_clip_grad_norm_: torch's clip with the CPU kernels spread over threads, bitwise torch's result.

Parity is checked as in the parity tests (``_tester.compare``: twin parameters, values, gradients, warnings and
errors compared byte for byte with torch.nn.utils.clip_grad_norm_), on lists that mix tensors above and below
torch's 32K-element grain size, so that both intra-op parallel kernels and single-core kernels run on worker
threads.
"""

import functools
import math
import multiprocessing
import random

import pytest
import torch
import torch.nn.utils as tnu

import distclip
from _tester import DTYPES, TORCH_NORM_TYPES, Spec, compare
from distclip._clip import threads as _threads

# A few tensors above the grain size (read by several cores inside one kernel) among many small ones.
MIXED_SHAPES = [(40_000,), (7,), (3, 5), (300, 200), (1,), (0,), (64, 64), (9,), (50_001,), (2, 2, 2)]


def mixed(dtypes=(torch.float32,), scale=1.0, inject=None, seed=0) -> Spec:
    tensors = [(shape, dtypes[i % len(dtypes)], i != 5, scale) for i, shape in enumerate(MIXED_SHAPES)]
    return Spec(tensors, inject=inject or {}, seed=seed)


def fast(threads):
    # A partial adds no Python frame: warnings must point at the line that called the function.
    return functools.partial(distclip.fast_clip_grad_norm_, threads=threads)


@pytest.mark.parametrize("threads", [1, 2, 3, 16])
@pytest.mark.parametrize("norm_type", TORCH_NORM_TYPES)
def test_bitwise_torch_mixed_dtypes(threads, norm_type):
    compare(mixed(DTYPES), "clip_grad_norm_", ours=fast(threads), max_norm=0.5, norm_type=norm_type)


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e9, 0.0, math.inf, math.nan, -1.0])
def test_bitwise_torch_max_norms(threads, max_norm):
    compare(mixed(), "clip_grad_norm_", ours=fast(threads), max_norm=max_norm)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("error_if_nonfinite", [False, True])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
def test_nonfinite_like_torch(bad, error_if_nonfinite, norm_type):
    spec = mixed((torch.float32, torch.bfloat16), inject={8: bad})
    compare(spec, "clip_grad_norm_", ours=fast(2), max_norm=1.0, norm_type=norm_type,
            error_if_nonfinite=error_if_nonfinite)


@pytest.mark.parametrize("form", ["list", "tuple", "generator", "tensor"])
def test_argument_forms_and_warnings(form):
    compare(mixed(), "clip_grad_norm_", form, ours=fast(None), max_norm=0.1)
    compare(Spec(), "clip_grad_norm_", "generator", ours=fast(2), max_norm=1.0)  # warns at the caller's line
    compare(Spec([((3,), torch.float32, False, 1.0)]), "clip_grad_norm_", form, ours=fast(2), max_norm=1.0)


def test_random_sweep_many_tensors():
    rng = random.Random(7)
    for case in range(25):
        tensors = [((rng.choice([1, 17, 1000, 33_000, 70_000]),), rng.choice(DTYPES), rng.random() > 0.1,
                    10.0 ** rng.randint(-3, 3)) for _ in range(rng.randint(1, 60))]
        norm_type = rng.choice([0.5, 1.0, 2.0, 3.0, math.inf, -math.inf, 0.0])
        compare(Spec(tensors, seed=case), "clip_grad_norm_", ours=fast(rng.randint(1, 5)),
                max_norm=rng.choice([1e-2, 1.0, 100.0]), norm_type=norm_type)


def test_default_threads_is_torchs_setting():
    assert _threads.worker_count(None) == torch.get_num_threads()


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_threads_is_a_value_error(bad):
    params = mixed().build()
    with pytest.raises(ValueError, match="threads must be a positive int"):
        distclip.fast_clip_grad_norm_(params, 1.0, threads=bad)
    with pytest.raises(ValueError, match="threads must be a positive int"):  # also with nothing to clip
        distclip.fast_clip_grad_norm_([], 1.0, threads=bad)


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 50])
def test_split_is_contiguous_balanced_and_complete(workers):
    sizes = [38_000_000, 10, 2_000_000, 5, 5, 5, 2_000_000, 1] + [8_000] * 30
    tensors = [torch.empty(n) for n in sizes]
    parts = _threads.split(tensors, workers)
    assert [t for part in parts for t in part] == tensors  # in order, each once
    assert len(parts) == min(workers, len(tensors)) and all(parts)
    if workers == 2:  # the 38M-element tensor alone is more than half of the elements
        assert parts[0] == tensors[:1]


# Tensors under the grain size only: torch's own OpenMP kernels can hang in a child forked after the parent ran
# a parallel region (seen with torch.nn.utils.clip_grad_norm_ alone); this test is about distclip's threads.
SMALL = Spec([((100,), torch.float32, True, 1.0)] * 20)


def _clip_in_child(queue):
    queue.put(float(distclip.fast_clip_grad_norm_(SMALL.build(), 1.0, threads=2)))


def test_a_forked_child_gets_working_threads():
    distclip.fast_clip_grad_norm_(SMALL.build(), 1.0, threads=2)  # the parent's pool exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_clip_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("fast_clip_grad_norm_ hung in a forked child: it used the parent's thread pool")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == float(tnu.clip_grad_norm_(SMALL.build(), 1.0))
