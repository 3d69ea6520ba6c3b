"""GPU check, part 2: ``GradClipper.clip_()`` in sharded mode makes no host synchronisation.

On one GPU: a one-rank NCCL group (the wire device is then the GPU, as in a real NCCL job), sharded
gradients in float32 and bf16, and ``GradClipper(params, max_norm, group=group)``. The first ``clip_()``
reads the gathered arguments once (the documented check that every rank built its clipper alike); every
later one runs under ``torch.cuda.set_sync_debug_mode("error")``, where any host synchronisation raises.
Each step's norm is then checked against a float64 reference, with a policy (``ZClip``) and without.

``--device cpu`` (the dry run of ``gpu_check.sh``): the same steps on a one-rank gloo group with CPU tensors,
where there is no device to synchronise with: it checks this script's logic, not the property.

Prints one line ``gpu_sync_check: OK (...)`` and exits 0, or raises.
"""

import argparse
import contextlib
import math
from datetime import timedelta

import torch
import torch.distributed as dist

import distclip
from distclip._tools.ports import free_port

STEPS = 5
SHAPES = ((1024, 768), (768,), (3072, 768), (50, 7), (0,))  # on the GPU; the dry run divides dims by 16
DRY_RUN_SHAPES = tuple(tuple(max(1, d // 16) if d else 0 for d in s) for s in SHAPES)


@contextlib.contextmanager
def no_sync_allowed(device: torch.device):
    """Any host synchronisation inside raises (CUDA); nothing to check on the CPU."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _gradients(dtype: torch.dtype, device: torch.device, step: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1000 * step + 7)
    params = []
    for shape in SHAPES if device.type == "cuda" else DRY_RUN_SHAPES:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        p.grad = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.01).to(device, dtype)
        params.append(p)
    return params


def check(device: torch.device, dtype: torch.dtype, policy: str) -> int:
    """``STEPS`` clips with one clipper; returns how many ran under the sync check."""
    params = _gradients(dtype, device, 0)
    policies = [distclip.ZClip()] if policy == "zclip" else None
    clipper = distclip.GradClipper(params, max_norm=1.0, group=dist.group.WORLD, policy=policies)
    checked = 0
    for step in range(STEPS):
        fresh = _gradients(dtype, device, step)
        with torch.no_grad():
            for p, f in zip(params, fresh):
                p.grad.copy_(f.grad)
        reference = math.sqrt(sum(float(f.grad.double().square().sum()) for f in fresh))
        if step == 0:
            report = clipper.clip_()  # reads the ranks' arguments once (documented)
        else:
            with no_sync_allowed(device):
                report = clipper.clip_()
            checked += 1
        norm = float(report.norm)  # read after the checked region
        assert math.isclose(norm, reference, rel_tol=1e-5), (str(dtype), policy, step, norm, reference)
        assert report.norm.device.type == device.type and report.norm.dtype == torch.float64, report.norm
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    try:
        checked = sum(check(device, dtype, policy) for dtype in (torch.float32, torch.bfloat16)
                      for policy in ("none", "zclip"))
    finally:
        dist.destroy_process_group()
    mode = "set_sync_debug_mode('error')" if device.type == "cuda" else "dry run on the CPU, nothing to synchronise"
    print(f"gpu_sync_check: OK ({checked} sharded clip_() calls on {device.type}, {backend}, {mode})")


if __name__ == "__main__":
    main()
