"""DDP and plain modules: ``clip_module_grad_norm_`` is torch's local clip, bitwise, with no collective.

TinyNet (``_layout_models``) trains one step on real gloo ranks, under DDP (gradients averaged, the same on
every rank) or plain (each rank its own batch and gradients); distclip's clip and torch's
``clip_grad_norm_`` then clip the same gradients (restored in between, ``_tester.clip_once``).
"""

import math

import pytest
import torch
import torch.distributed as dist

import distclip
from _layout_models import MODEL_ATOL, tiny_batch, tiny_loss, tiny_net, tiny_reference_grads
from _tester import (
    REL_TOL,
    assert_bitwise,
    assert_grads_close,
    check_clip,
    check_same_on_every_rank,
    clip_once,
    clips_for,
    reference_norm,
    snapshot,
)

INF = math.inf


def _rank_replicated_module(wrap, clips):
    """TinyNet plain (each rank its own batch and its own gradients) or under DDP (gradients averaged), one
    step; for each (norm_type, max_norm): ``clip_module_grad_norm_`` and torch's local clip."""
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_net()
    module = DistributedDataParallel(model) if wrap == "ddp" else model
    tiny_loss(module, tiny_batch(dist.get_rank())).backward()
    params = list(module.parameters())
    saved = snapshot(params)
    return dict(before=saved, clips=[dict(
        distclip=clip_once(params, saved, lambda: distclip.clip_module_grad_norm_(module, max_norm, norm_type)),
        framework=clip_once(
            params, saved, lambda: torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm, norm_type)),
    ) for norm_type, max_norm in clips])


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("wrap", ["ddp", "plain"])
def test_replicated_modules_clip_locally_bitwise_like_torch(worlds, world_size, wrap):
    """``clip_module_grad_norm_`` on a DDP model (gradients averaged, the same on every rank) or on a plain
    module (each rank its own gradients) is torch's local ``clip_grad_norm_``: bitwise the same norm and
    gradients, 0 collectives; the value is the float64 norm of the averaged (DDP) or the rank's own (plain)
    gradient."""
    norm_types = [2.0, INF, 1.0, -INF]
    model_grads = ([tiny_reference_grads(range(world_size))] * world_size if wrap == "ddp"
                   else [tiny_reference_grads([r]) for r in range(world_size)])
    # one max_norm for every rank (0.3 of rank 0's norm), so that the clips scale
    clips = clips_for(model_grads[0], norm_types, fraction=0.3)
    results = worlds(world_size).run(_rank_replicated_module, wrap, clips)
    for r, res in enumerate(results):
        assert_grads_close(res["before"], model_grads[r], f"{wrap} rank {r}: gradients vs the float64 model",
                           rtol=REL_TOL, atol=MODEL_ATOL)
    for j, (norm_type, max_norm) in enumerate(clips):
        what = f"{wrap} p={norm_type}"
        for r, res in enumerate(results):
            ours, theirs = res["clips"][j]["distclip"], res["clips"][j]["framework"]
            ref = reference_norm(res["before"], norm_type)  # each rank holds the full gradient
            check_clip(ours, res["before"], ref, max_norm, 0, f"{what} rank {r}")
            assert theirs["comms"] == 0, f"{what} rank {r}: torch made {theirs['comms']} collectives"
            assert_bitwise(ours["norm"]["value"], theirs["norm"]["value"], f"{what} rank {r} norm vs torch")
            for k, (a, b) in enumerate(zip(ours["grads"], theirs["grads"])):
                assert_bitwise(a, b, f"{what} rank {r} grad {k} vs torch")
        if wrap == "ddp":
            check_same_on_every_rank([res["clips"][j]["distclip"] for res in results], what)
