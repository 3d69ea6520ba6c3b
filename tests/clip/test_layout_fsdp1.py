"""FSDP1, every sharding strategy: ``clip_module_grad_norm_`` against ``FSDP.clip_grad_norm_`` and float64.

TinyNet (``_layout_models``) trains one step under FSDP1 on real gloo ranks; distclip's clip and FSDP's own
then clip the same gradients (restored in between, ``_tester.clip_once``), and each is checked against the
float64 gradient of the unwrapped model on every rank's batch (``_tester.check_clip``: the norm within 1e-5,
the gradients times the reference coefficient, the collectives counted with ``CommDebugMode``): 1 collective
for FULL_SHARD, SHARD_GRAD_OP and the hybrid strategies, 0 for NO_SHARD, as FSDP's own clip.
"""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distclip
from _layout_models import HSDP_MESH_DIMS, tiny_batch, tiny_loss, tiny_net, tiny_reference_grads
from _tester import (
    average_grads,
    cached_mesh,
    check_clip,
    check_matches_framework,
    check_same_on_every_rank,
    clip_once,
    clips_for,
    reference_norm,
    run_cases,
    snapshot,
)

INF = math.inf
FSDP1_STRATEGIES = {2: ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"],
                    4: ["FULL_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"]}


@dataclass(frozen=True)
class Fsdp1Case:
    strategy: str  # a ShardingStrategy name
    use_orig_params: bool
    ignore_head: bool  # ``head`` left outside FSDP (``ignored_modules``)
    clips: list  # (norm_type, max_norm) pairs

    @property
    def what(self):
        return f"FSDP1 {self.strategy} use_orig_params={self.use_orig_params} ignored_head={self.ignore_head}"


def _rank_fsdp1(case):
    """TinyNet under FSDP1 (each Linear a unit, and the root), one step on this rank's batch; ``head``
    optionally left outside FSDP, its gradients averaged over the world by hand (FSDP does not reduce them).
    Then for each (norm_type, max_norm): distclip's ``clip_module_grad_norm_`` and ``FSDP.clip_grad_norm_``
    on the same gradients."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = tiny_net()
    fsdp = FullyShardedDataParallel(
        model,
        sharding_strategy=ShardingStrategy[case.strategy],
        use_orig_params=case.use_orig_params,
        device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        ignored_modules=[model.head] if case.ignore_head else None,
        device_mesh=cached_mesh((2, 2), HSDP_MESH_DIMS) if "HYBRID" in case.strategy else None,
    )
    tiny_loss(fsdp, tiny_batch(dist.get_rank())).backward()
    if case.ignore_head:
        average_grads(model.head.parameters())
    params = list(fsdp.parameters())
    saved = snapshot(params)
    clipped = []
    for norm_type, max_norm in case.clips:
        clipped.append(dict(
            distclip=clip_once(
                params, saved, lambda: distclip.clip_module_grad_norm_(fsdp, max_norm, norm_type)),
            framework=clip_once(params, saved, lambda: fsdp.clip_grad_norm_(max_norm, norm_type)),
        ))
    return dict(before=saved, clips=clipped)


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp1_every_strategy_matches_fsdp_clip_and_float64(worlds, world_size):
    """FSDP1 per sharding strategy (hybrid ones on a 2x2 device mesh), ``use_orig_params`` both ways, with
    and without a module outside FSDP (``ignored_modules``, gradients made identical across ranks), norm
    types 2, inf and 1: ``clip_module_grad_norm_`` gives the float64 norm, bitwise the same on every rank, a
    plain tensor, equal to ``FSDP.clip_grad_norm_`` on the same gradients, with the same clipped gradients;
    1 collective (0 under NO_SHARD), as FSDP's own clip."""
    ref_grads = tiny_reference_grads(range(world_size))
    clips = clips_for(ref_grads, [2.0, INF, 1.0])
    cases = [Fsdp1Case(s, o, i, clips)
             for s in FSDP1_STRATEGIES[world_size] for o in (False, True) for i in (False, True)]
    for case, ranks in zip(cases, run_cases(worlds(world_size), _rank_fsdp1, cases)):
        comms = 0 if case.strategy == "NO_SHARD" else 1
        for j, (norm_type, max_norm) in enumerate(clips):
            ref = reference_norm(ref_grads, norm_type)
            what = f"{case.what} p={norm_type}"
            for r, res in enumerate(ranks):
                ours, theirs = res["clips"][j]["distclip"], res["clips"][j]["framework"]
                check_clip(ours, res["before"], ref, max_norm, comms, f"{what} rank {r}")
                check_clip(theirs, res["before"], ref, max_norm, comms, f"{what} rank {r} FSDP.clip_grad_norm_")
                check_matches_framework(ours, theirs, f"{what} rank {r}")
            check_same_on_every_rank([res["clips"][j]["distclip"] for res in ranks], what)
