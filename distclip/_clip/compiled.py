r"""A compiled kernel for the CPU norm of bfloat16 and float16 gradients: their squares summed in float32, by rows.

torch's eager CPU kernels cannot read a bfloat16 tensor and add float32 squares in one pass: ``vector_norm`` rounds
its result to bfloat16, and with ``dtype=torch.float32`` it reads ~0.3 GB/s. The eager path of the local partials
copies each chunk into a float32 buffer first (~6-9 GB/s of bfloat16 a core on the CPUs measured). One inductor
kernel (``torch.compile``) reads blocks of rows of ``ROW`` elements, sums each row's squares in float32 and adds
the rows' sums in float64 (~20 GB/s a core there): every square of a bfloat16/float16 value is exact in float32,
and a row's sum of ``ROW`` of them is within a few units of float32's roundoff, so the float64 sum of the rows
keeps the 1e-5 accuracy of the eager path. Non-finite or underflowed blocks are the caller's to norm again in
float64, as on the eager path.

The kernel is compiled on first use in each process, once per dtype (the numbers of rows are dynamic): seconds
(about 25 s with an empty inductor cache on a 2-core CPU, about 5 s with a warm one), kept in
`compile_seconds`. It is not used when ``DISTCLIP_COMPILE=0`` is set, while torch is itself compiling (the caller
is being traced), or after compiling or running it failed once in the process (a ``RuntimeWarning`` says why):
`square_sums` then returns ``None`` and the caller takes the eager path.
"""

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

ROW = 1 << 10
# Blocks one call reads: each call costs ~20 us of host time (dynamo's and inductor's wrappers), so the blocks of
# a model's medium tensors go eight at a time; slots left over take zero blocks.
BLOCKS = 8
DTYPES = (torch.bfloat16, torch.float16)
ENVIRONMENT_SWITCH = "DISTCLIP_COMPILE"


def _square_sums(*blocks: Tensor) -> list[Tensor]:
    return [block.float().square().sum(dim=1).double().sum() for block in blocks]


@dataclass
class _Kernel:
    """The process's compiled kernel: made on first use, dropped for good on the first failure."""

    function: Callable[..., list[Tensor]] | None = None
    failed: bool = False
    seconds: dict[torch.dtype, float] = field(default_factory=dict)
    padding: dict[torch.dtype, list[Tensor]] = field(default_factory=dict)


_KERNEL = _Kernel()


def enabled(dtype: torch.dtype) -> bool:
    """Whether `square_sums` will be tried for ``dtype`` (it may still fail once and return None)."""
    return (
        dtype in DTYPES
        and not _KERNEL.failed
        and os.environ.get(ENVIRONMENT_SWITCH, "1") != "0"
        and not torch.compiler.is_compiling()
    )


def square_sums(blocks: list[Tensor]) -> list[Tensor] | None:
    """The sum of squares of each block, as a float64 0-d tensor: each row's float32 squares summed in float32,
    the rows' sums in float64. ``blocks``: contiguous CPU tensors of shape ``(R, ROW)``, ``R >= 2``, all of one
    dtype of ``DTYPES``. ``None`` when the kernel is not `enabled` or failed (now or before)."""
    dtype = blocks[0].dtype
    if not enabled(dtype):
        return None
    try:
        with torch.no_grad():
            if dtype not in _KERNEL.seconds:
                _compile(dtype)
            padding = _KERNEL.padding[dtype]
            sums = []
            for i in range(0, len(blocks), BLOCKS):
                some = blocks[i:i + BLOCKS]
                sums += _KERNEL.function(*some, *padding[len(some):])[:len(some)]
    except Exception as error:  # compiling needs a C++ compiler and a supported Python; any failure falls back
        _KERNEL.failed = True
        warnings.warn(
            f"distclip: the compiled {dtype} norm kernel failed ({type(error).__name__}: {error}); norms of "
            f"bfloat16/float16 CPU gradients take the eager path from now on (the same accuracy, slower). Set "
            f"{ENVIRONMENT_SWITCH}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return sums


def _compile(dtype: torch.dtype) -> None:
    """Compile the kernel for ``dtype`` on blocks of distinct row counts: torch assumes that sizes equal when it
    compiles stay equal (and would compile again when they differ), so the first call must not be the caller's."""
    start = time.perf_counter()
    if _KERNEL.function is None:
        _KERNEL.function = torch.compile(_square_sums, dynamic=True, fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compiling warns about torch's own internals, which are not the caller's
        _KERNEL.function(*(torch.zeros(2 + i, ROW, dtype=dtype) for i in range(BLOCKS)))
    _KERNEL.padding[dtype] = [torch.zeros(2, ROW, dtype=dtype) for _ in range(BLOCKS)]
    _KERNEL.seconds[dtype] = time.perf_counter() - start


def compile_seconds() -> dict[torch.dtype, float]:
    """Seconds the kernel's compile took in this process, by dtype: the dtypes it ran for."""
    return dict(_KERNEL.seconds)
