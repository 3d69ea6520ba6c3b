"""The compiled kernel of the CPU bfloat16/float16 2-norm (distclip/_clip/compiled.py): the local norm it gives
meets the accuracy contract (relative error under 1e-5 against float64, overflow-safe, NaN stays NaN), it is
really used on large dense pieces, and the eager path takes over, with the same accuracy, when it is switched off,
fails, or torch is itself compiling. The kernel is compiled once in this process (seconds; tens of seconds with an
empty inductor cache)."""

import warnings

import pytest
import torch

from distclip._clip import compiled
from distclip._clip.foreach import by_device_and_dtype
from distclip._clip.partials import local_norm

CPU = torch.device("cpu")
DTYPES = [torch.bfloat16, torch.float16]


def _norm(grads):
    return local_norm(by_device_and_dtype(grads), 2.0, None, CPU).item()


def _reference(grads):
    return torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads])).item()


def _gradients(dtype):
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(3_000_001, generator=gen).to(dtype)
    return [
        torch.full((1 << 20,), 0.1).to(dtype),  # equal elements: the worst case of running float32 sums
        base[1:300_001],  # at an odd offset, with a tail of 992 elements past the last row
        base[400_000:400_000 + 700 * 1024].view(700, 1024).t(),  # a dense permutation, read as it lies
        torch.full((5_000_000,), 0.2698335647583008).to(dtype),  # two blocks of rows, split evenly
        *(torch.randn(100, generator=gen).to(dtype) for _ in range(3)),  # small tensors, through the buffer
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_norms_meet_the_accuracy_contract(dtype):
    grads = _gradients(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # compiling, the first call in the process, warns the caller of nothing
        _norm(grads)
    assert abs(_norm(grads) - _reference(grads)) / _reference(grads) < 1e-6
    for g in grads:
        assert abs(_norm([g]) - _reference([g])) / _reference([g]) < 1e-5, (g.shape, g.stride())
    assert compiled.enabled(dtype) and dtype in compiled.compile_seconds(), (
        f"the compiled {dtype} kernel was not used: this project's machines have a C++ compiler for inductor")


def test_compiled_norms_are_overflow_safe_and_keep_non_finite_values():
    big = torch.full((1 << 19,), 1e30, dtype=torch.bfloat16)  # squares overflow float32: normed again in float64
    assert abs(_norm([big]) - _reference([big])) / _reference([big]) < 1e-5
    tiny = torch.full((1 << 19,), 1e-30, dtype=torch.bfloat16)  # squares underflow float32
    assert abs(_norm([tiny]) - _reference([tiny])) / _reference([tiny]) < 1e-5
    for value, check in [(float("nan"), torch.isnan), (float("inf"), torch.isinf)]:
        grad = torch.ones(1 << 19, dtype=torch.bfloat16)
        grad[12345] = value
        assert check(torch.tensor(_norm([grad]))), value


def test_the_switch_turns_the_kernel_off_for_the_same_accuracy(monkeypatch):
    grads = _gradients(torch.bfloat16)
    with_kernel = _norm(grads)
    monkeypatch.setenv(compiled.ENVIRONMENT_SWITCH, "0")
    assert not compiled.enabled(torch.bfloat16)
    assert compiled.square_sums([torch.ones(4, compiled.ROW, dtype=torch.bfloat16)]) is None
    eager = _norm(grads)
    reference = _reference(grads)
    assert abs(eager - reference) / reference < 1e-6 and abs(with_kernel - reference) / reference < 1e-6


def test_a_failing_kernel_warns_once_and_the_eager_path_takes_over(monkeypatch):
    def failing(*blocks):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "_KERNEL", compiled._Kernel(function=failing))
    grads = _gradients(torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*eager path.*DISTCLIP_COMPILE=0"):
        first = _norm(grads)
    assert not compiled.enabled(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _norm(grads)
    reference = _reference(grads)
    assert abs(first - reference) / reference < 1e-6 and abs(second - reference) / reference < 1e-6


def test_the_kernel_is_not_used_while_torch_compiles():
    seen = []

    def traced(x):
        seen.append(compiled.enabled(torch.bfloat16))
        return x + 1

    torch.compile(traced, backend="eager")(torch.ones(3))
    assert seen == [False]
    assert compiled.enabled(torch.bfloat16)
