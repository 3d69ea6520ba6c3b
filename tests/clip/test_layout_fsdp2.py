"""FSDP2 (``fully_shard``), HSDP, and empty local shards: distclip against torch's clip and float64.

TinyNet (``_layout_models``) with ``fully_shard`` on every Linear and on the root trains one step on real gloo
ranks; distclip's clips and torch's ``clip_grad_norm_`` then clip the same gradients (restored in between,
``_tester.clip_once``). The reference is the float64 norm of the full gradients the ranks gather, after
checking those against the float64 model's (the smallest element, the -inf norm, of a float32 gradient is not
within 1e-5 of the float64 model's). Collectives per clip: 1 for distclip and for torch; on a rank with an
empty local shard torch's inf norm raises (the others would hang), distclip's does not.
"""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import Replicate, Shard

import distclip
from _layout_models import HSDP_MESH_DIMS, MODEL_ATOL, tiny_batch, tiny_loss, tiny_net, tiny_reference_grads
from _tester import (
    REL_TOL,
    assert_grads_close,
    attempt,
    cached_mesh,
    check_clip,
    check_matches_framework,
    check_same_on_every_rank,
    clip_once,
    clips_for,
    reference_norm,
    snapshot,
)

INF = math.inf
FSDP2_LAYOUTS = {
    # (world_size, mesh shape): ranks with an empty local shard (Linear(7, 3) and Linear(3, 2) on 4 ranks)
    (2, (2,)): False,
    (4, (4,)): True,
    (4, (2, 2)): False,
}


def _fsdp2_model(mesh):
    """TinyNet with ``fully_shard`` on every Linear and on the root, one step on this rank's batch."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_net()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    tiny_loss(model, tiny_batch(dist.get_rank())).backward()
    return model


def _rank_fsdp2(mesh_shape, clips):
    """For each (norm_type, max_norm, with_torch): ``distclip.clip_grad_norm_(model.parameters())`` with
    group=None and with group=WORLD, ``distclip.clip_module_grad_norm_(model)`` and (``with_torch``)
    ``torch.nn.utils.clip_grad_norm_`` on the same gradients; and the full gradients, gathered before."""
    model = _fsdp2_model(cached_mesh(mesh_shape, HSDP_MESH_DIMS if len(mesh_shape) == 2 else None))
    params = list(model.parameters())
    saved = snapshot(params)
    full = [p.grad.full_tensor() for p in params]
    clipped = []
    for norm_type, max_norm, with_torch in clips:
        entry = dict(
            distclip=clip_once(
                params, saved, lambda: distclip.clip_grad_norm_(model.parameters(), max_norm, norm_type)),
            distclip_world=clip_once(params, saved, lambda: distclip.clip_grad_norm_(
                model.parameters(), max_norm, norm_type, group=dist.group.WORLD)),
            module=clip_once(
                params, saved, lambda: distclip.clip_module_grad_norm_(model, max_norm, norm_type)),
        )
        if with_torch:
            entry["framework"] = clip_once(
                params, saved, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type))
        clipped.append(entry)
    return dict(before=saved, full=full, placements=[tuple(p.grad.placements) for p in params], clips=clipped)


def _rank_torch_inf_norm_on_empty_shard():
    """torch's inf-norm clip of the 4-rank FSDP2 model, called only on the ranks that hold an empty local
    shard (the others would wait for them in the all_reduce: they do not call it)."""
    model = _fsdp2_model(cached_mesh((dist.get_world_size(),)))
    if all(p.grad.to_local().numel() for p in model.parameters()):
        return None
    params = list(model.parameters())
    return attempt(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, INF), params)


def full_gradients(results, model_grads, what):
    """The full gradients the ranks gathered (the same on every rank), checked against the float64 model's:
    the reference the norms are compared with (the float64 norm of the gradients the ranks hold, which for
    -inf, the smallest element, is not within 1e-5 of the float64 model's)."""
    full = results[0]["full"]
    for r, res in enumerate(results):
        assert_grads_close(res["full"], full, f"{what}: rank {r}'s full gradients vs rank 0's", rtol=0, atol=0)
    assert_grads_close(full, model_grads, f"{what}: full gradients vs the float64 model", rtol=REL_TOL,
                       atol=MODEL_ATOL)
    return full


@pytest.mark.parametrize("world_size,mesh_shape", list(FSDP2_LAYOUTS), ids=["2ranks", "4ranks", "hsdp_2x2"])
def test_fsdp2_matches_torch_clip_and_float64(worlds, world_size, mesh_shape):
    """FSDP2 (``fully_shard`` per layer and root; HSDP on a 2x2 mesh: Replicate on dim 0, Shard on dim 1):
    ``distclip.clip_grad_norm_(model.parameters())`` (group=None or WORLD) returns a replicated float32 DTensor
    whose ``full_tensor()`` is the float64 norm, ``clip_module_grad_norm_`` the same value as a plain tensor, each
    from 1 collective, equal to ``torch.nn.utils.clip_grad_norm_`` (1 collective) on the same job, with the
    same clipped gradients. On 4 ranks with a 1-D mesh some ranks hold an empty local shard: distclip gives
    the right norm there too for 2, inf and -inf (torch's inf norm fails there: see the next test)."""
    has_empty_shards = FSDP2_LAYOUTS[world_size, mesh_shape]
    ref_grads = tiny_reference_grads(range(world_size))
    norm_types = [2.0, INF, -INF, 1.0]
    clips = [(p, m, not (has_empty_shards and math.isinf(p))) for p, m in clips_for(ref_grads, norm_types)]
    results = worlds(world_size).run(_rank_fsdp2, mesh_shape, clips)
    expected_placements = (Replicate(), Shard(0)) if len(mesh_shape) == 2 else (Shard(0),)
    for r, res in enumerate(results):
        assert all(p == expected_placements for p in res["placements"]), res["placements"]
    empty = [r for r, res in enumerate(results) if any(g.numel() == 0 for g in res["before"])]
    assert bool(empty) == has_empty_shards, f"ranks with an empty local shard: {empty}"
    full = full_gradients(results, ref_grads, "FSDP2")
    replicated = (Replicate(),) * len(mesh_shape)
    for j, (norm_type, max_norm, with_torch) in enumerate(clips):
        ref = reference_norm(full, norm_type)
        what = f"FSDP2 mesh {mesh_shape} p={norm_type}"
        for r, res in enumerate(results):
            entry = res["clips"][j]
            ours, module = entry["distclip"], entry["module"]
            for api in ("distclip", "distclip_world"):
                check_clip(entry[api], res["before"], ref, max_norm, 1, f"{what} rank {r} {api}", kind="DTensor")
                norm = entry[api]["norm"]
                assert norm["placements"] == replicated, f"{what} rank {r} {api}: {norm}"
                assert norm["dtype"] == torch.float32, f"{what} rank {r} {api}: {norm}"
            check_clip(module, res["before"], ref, max_norm, 1, f"{what} rank {r} clip_module_grad_norm_")
            if with_torch:
                theirs = entry["framework"]
                check_clip(theirs, res["before"], ref, max_norm, 1, f"{what} rank {r} torch", kind="DTensor")
                check_matches_framework(ours, theirs, f"{what} rank {r}")
        for api in ("distclip", "distclip_world", "module"):
            check_same_on_every_rank([res["clips"][j][api] for res in results], f"{what} {api}")


def test_fsdp2_empty_local_shard_fails_torch_inf_norm(worlds):
    """What distclip fixes above: on a rank whose local shard is empty, torch's inf-norm clip of the FSDP2
    model raises (max has no identity) before communicating, so the other ranks would be left waiting in its
    all_reduce; here only the ranks with an empty shard call it (in its own world call), so no rank hangs."""
    outcomes = worlds(4).run(_rank_torch_inf_norm_on_empty_shard)
    assert [o is not None for o in outcomes] == [False, False, True, True], "ranks 2 and 3 hold empty shards"
    for r, outcome in enumerate(outcomes[2:], start=2):
        error, message, comms, unchanged = outcome
        assert error is RuntimeError and "empty tensor" in message, f"rank {r}: {error}: {message}"
        assert comms == 0 and unchanged, f"rank {r}: {comms} collectives, gradients unchanged: {unchanged}"
