"""Worker threads for `fast_clip_grad_norm_`: torch's per-tensor CPU kernels on several cores at once.

On the CPU a foreach kernel is a C++ loop of per-tensor kernels, and a tensor below torch's grain size
(32K elements) is read by one core, so a list of small gradients keeps one core busy. Splitting the list into
contiguous parts of about equal size and handing each part's foreach call to its own thread (the call releases
the GIL) runs the same kernels on the same tensors, in parallel. Each tensor still gets exactly the kernel
torch would call, with torch's intra-op thread count (a new thread takes the process-wide setting), so every
value is the one torch computes.
"""

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor

_R = TypeVar("_R")

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def worker_count(threads: int | None) -> int:
    """The number of parts a tensor list is split into: ``threads``, or torch's intra-op thread count."""
    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"distclip: threads must be a positive int or None, got {threads!r}")
    return threads


def split(tensors: list[Tensor], workers: int) -> list[list[Tensor]]:
    """``tensors`` as up to ``workers`` contiguous parts, in order, of about equal element counts."""
    workers = min(workers, len(tensors))
    if workers <= 1:
        return [tensors]
    sizes = [t.numel() for t in tensors]
    total = sum(sizes)
    parts, start, running = [], 0, 0
    for i, n in enumerate(sizes):
        running += n
        # Close a part once it holds its share of the elements, leaving a tensor for every part still to come.
        if running * workers >= total * (len(parts) + 1) and len(tensors) - i - 1 >= workers - len(parts) - 1:
            parts.append(tensors[start : i + 1])
            start = i + 1
            if len(parts) == workers - 1:
                break
    if start < len(tensors):
        parts.append(tensors[start:])
    return parts


def map_parts(fn: Callable[[list[Tensor]], _R], parts: list[list[Tensor]]) -> list[_R]:
    """``[fn(part) for part in parts]``, the first part in the calling thread and the others at the same time
    on worker threads (under ``torch.no_grad``, as the public functions)."""
    if len(parts) == 1:
        return [fn(parts[0])]
    futures = [_executor(len(parts) - 1).submit(_no_grad, fn, part) for part in parts[1:]]
    first = fn(parts[0])
    return [first, *(f.result() for f in futures)]


def _no_grad(fn: Callable[[list[Tensor]], _R], part: list[Tensor]) -> _R:
    # Grad mode is per thread.
    with torch.no_grad():
        return fn(part)


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="distclip")
            _pool_size = size
        return _pool


def _forget_pool() -> None:
    # A forked child inherits the pool object but none of its threads: tasks submitted to it would never run.
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)
