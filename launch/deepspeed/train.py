"""distclip with DeepSpeed: a small model trained by a DeepSpeed engine that clips through distclip.

Started by the DeepSpeed launcher (``launch/deepspeed/run.sh``: 2 CPU processes on this machine). The training
loop is DeepSpeed's own; ``attach`` is the one line distclip adds. To show the norm is right, every rank also
takes the float64 norm of the full averaged gradient (``deepspeed.utils.safe_get_full_grad``) before each
optimizer step, and rank 0 prints it beside distclip's ``handle.last_norm``, which ``get_global_grad_norm()``
must report too. Exits 1 if any step disagrees.
"""

import argparse
import json
import math
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_grad

from distclip.integrations.deepspeed import attach
from distclip.shutdown import exit_cleanly

REL_TOL = 1e-5


def main() -> int:
    args = _parse_args()
    backend = "gloo" if get_accelerator().device_name() == "cpu" else "nccl"
    deepspeed.init_distributed(dist_backend=backend)
    config = json.loads(args.deepspeed_config.read_text())
    if args.stage is not None:
        config["zero_optimization"]["stage"] = args.stage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    handle = attach(engine, max_norm=args.max_norm, norm_type=args.norm_type)

    data = torch.Generator().manual_seed(dist.get_rank())
    dtype = next(engine.module.parameters()).dtype
    failures = 0
    for step in range(1, args.steps + 1):
        for _ in range(engine.gradient_accumulation_steps()):
            x = torch.randn(engine.train_micro_batch_size_per_gpu(), 16, generator=data)
            loss = engine(x.to(engine.device, dtype)).float().pow(2).mean() * 100
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                reference = _reference_norm(engine, handle.norm_type)
            engine.step()
        norm = float(handle.last_norm)
        reported = float(engine.get_global_grad_norm())
        ok = math.isclose(norm, reference, rel_tol=REL_TOL) and reported == norm
        failures += not ok
        if dist.get_rank() == 0:
            print(
                f"step {step}/{args.steps}  norm {norm:.6g}  ref {reference:.6g}  "
                f"rel.err {abs(norm - reference) / reference:.1e}  "
                f"{'OK' if ok else 'MISMATCH'}",
                flush=True,
            )
    if dist.get_rank() == 0:
        stage = config["zero_optimization"]["stage"]
        settings = f"{dist.get_world_size()} ranks, ZeRO stage {stage}, {backend}, norm_type={handle.norm_type}"
        print(f"distclip deepspeed example: {args.steps - failures}/{args.steps} steps OK ({settings})", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


def _reference_norm(engine, norm_type: float) -> float:
    """The float64 norm of the full gradient, averaged over the ranks and unscaled. Every rank must call it."""
    grads = torch.cat([safe_get_full_grad(p).double().flatten() for p in engine.module.parameters()])
    if engine.fp16_enabled():  # ZeRO's gradients carry the loss scale until step()
        grads /= engine.optimizer.loss_scale
    return torch.linalg.vector_norm(grads, norm_type).item()


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepspeed_config", type=Path, default=Path(__file__).with_name("ds_config.json"))
    parser.add_argument("--stage", type=int, choices=[0, 1, 2, 3], help="ZeRO stage (default: the config's)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-norm", type=float, default=0.5)
    parser.add_argument("--norm-type", type=float, default=2.0, help="p > 0, or inf")
    parser.add_argument("--local_rank", type=int, help="set by the DeepSpeed launcher")
    return parser.parse_args()


if __name__ == "__main__":
    exit_cleanly(main())  # not through Python's shutdown, where torch 2.13's gloo threads can abort a rank
