"""Per-tensor host costs before and after a large model was built and freed in the same process.

A gloo group of one rank; 1000 separate tiny gradients (16 elements). Each cost is timed (best of 30 samples of
10 calls, per tensor) fresh, then after an FSDP2 model of 2000 parameters (1K-16K elements) was built, clipped by
torch and freed, on tensors allocated afterwards:

- ``group``: torch's grouping by device and dtype (``_group_tensors_by_device_and_dtype``, a pybind11 call);
- ``cat``: ``torch.cat`` of the tensors; ``mul``: ``torch._foreach_mul_`` by a float32 0-d tensor;
- ``clip``: ``distclip.clip_grad_norm_(..., group=WORLD)`` minus the same call with no tensors.

With the C library's malloc, ``group`` slows after the model (4x); with jemalloc preloaded it does not:
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python benchmarks/heap_history.py``. The clip groups a
list of CPU tensors of one dtype without torch's grouping (`distclip._clip.foreach.by_device_and_dtype`), so it
slows less (docs/benchmarks.md, "Tiny tensors").
Run: python benchmarks/heap_history.py [--dtype bf16]."""

import argparse
import gc
import time

import torch
import torch.distributed as dist
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

import distclip
from distclip._tools.bench.measure import allocator
from distclip._tools.ports import free_port

TENSORS = 1000


def _per_tensor(fn, samples: int = 30, calls: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best / TENSORS * 1e6


def _costs(dtype: torch.dtype) -> dict[str, float]:
    params = [torch.nn.Parameter(torch.empty(16, dtype=dtype)) for _ in range(TENSORS)]
    for p in params:
        p.grad = torch.randn(16).to(dtype)
    grads = [p.grad for p in params]
    factor = torch.tensor(1.0)
    world = dist.group.WORLD
    empty = _per_tensor(lambda: distclip.clip_grad_norm_([], 1e9, group=world))
    return {
        "group": _per_tensor(lambda: _group_tensors_by_device_and_dtype([grads])),
        "cat": _per_tensor(lambda: torch.cat(grads)),
        "mul": _per_tensor(lambda: torch._foreach_mul_(grads, factor)),
        "clip": _per_tensor(lambda: distclip.clip_grad_norm_(params, 1e9, group=world)) - empty,
    }


def _build_clip_and_free_a_model() -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    class Model(torch.nn.Module):
        def forward(self, x):
            return x

    model = Model()
    model.layers = torch.nn.ModuleList()
    sizes = torch.randint(1024, 16385, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    for start in range(0, len(sizes), 20):
        layer = torch.nn.Module()
        for i, n in enumerate(sizes[start:start + 20]):
            layer.register_parameter(f"p{i}", torch.nn.Parameter(torch.randn(n)))
        model.layers.append(layer)
        fully_shard(layer)
    fully_shard(model)
    for p in model.parameters():
        p.grad = DTensor.from_local(torch.randn(p.to_local().shape), p.device_mesh, p.placements)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    del model, layer, p
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[parser.parse_args().dtype]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        print(f"{allocator()}; {TENSORS} tiny {dtype} tensors; us a tensor")
        print("fresh:       " + "  ".join(f"{k} {v:.2f}" for k, v in _costs(dtype).items()))
        _build_clip_and_free_a_model()
        print("after model: " + "  ".join(f"{k} {v:.2f}" for k, v in _costs(dtype).items()))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
