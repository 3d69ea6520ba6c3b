"""Layouts: the true global norm under FSDP1, FSDP2/DTensor, DDP, and tensor/pipeline/expert parallelism.

Each test trains one step of a small seeded model (``_layout_models``) on real gloo ranks (``worlds``
fixture), in the layout under test, and clips the gradients the ranks hold, with distclip and, where the
framework has one, with the framework's own clipping on the same gradients (restored in between, so both
clip bitwise the same gradients). The reference is computed in the test process: the float64 gradient of the
unwrapped model on every rank's batch, so it does not depend on how the ranks hold it (FSDP1, pipeline,
MoE); where the ranks can hand back the full gradients (FSDP2 via ``full_tensor()``, DDP and plain modules
hold them whole) the reference is the float64 norm of those, after checking them against the float64
model's, since the smallest element (the -inf norm) of a float32 gradient is not within 1e-5 of the float64
model's; the DTensor cases distribute seeded full tensors, their own reference. Checked: the norm (rel 1e-5
against the reference and against the framework), the gradients after the clip (the ones before times the
reference coefficient, and the framework's), the returned type, and the number of collectives of each clip,
counted with ``CommDebugMode`` on real gloo (nothing is mocked).

Collectives per clip (distclip / the framework's own), as asserted below:

==============================================  ========  ===========================================
layout                                          distclip  framework
==============================================  ========  ===========================================
FSDP1 FULL_SHARD, SHARD_GRAD_OP, hybrid         1         1 (``FSDP.clip_grad_norm_``)
FSDP1 NO_SHARD                                  0         0
FSDP2 per-layer + root, 1-D mesh or HSDP        1         1 (``torch.nn.utils.clip_grad_norm_``)
FSDP2, an empty local shard, inf / -inf         1         raises on that rank (the others would hang)
DTensors on a 2x2 ("dp", "tp") mesh             1         2 (one all_reduce per sharded mesh dim)
DTensors on the 1-D "tp" sub-mesh               1         1
DTensors on two meshes                          1         raises
DTensors + plain tensors, group=None            1         -- (torch cannot mix them)
declared replicas (pipeline tie, MoE, TP+DP)    1         --
DDP, plain module                               0         0 (``torch.nn.utils.clip_grad_norm_``)
==============================================  ========  ===========================================

Rank-side functions are at module level (the harness pickles them by reference); many cases go to the
world in one ``world.run`` to keep the round trips few.
"""

import math
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import distclip
from _layout_models import (
    EXPERTS,
    TOKENS,
    WIDTH,
    moe,
    moe_batch,
    moe_loss,
    moe_reference_grads,
    tied_batch,
    tied_lm,
    tied_reference_grads,
    tiny_batch,
    tiny_loss,
    tiny_net,
    tiny_reference_grads,
)
from _tester import (
    REL_TOL,
    assert_bitwise,
    assert_grads_close,
    attempt,
    average_grads,
    cached_mesh,
    cached_subgroup,
    check_clip,
    check_matches_framework,
    check_same_on_every_rank,
    clip_once,
    clips_for,
    per_rank,
    reference_norm,
    snapshot,
)

INF = math.inf
# The float32 gradients of a job against the float64 model's: float32 rounding of values around 1.
MODEL_ATOL = 1e-6
HSDP_MESH_DIMS = ("replicate", "shard")
TP_MESH_DIMS = ("dp", "tp")


# --------------------------------------------------------------------------------------------------------
# Rank side: runs inside the gloo workers.
# --------------------------------------------------------------------------------------------------------

def _rank_fsdp1(cases):
    return [_fsdp1_case(**case) for case in cases]


def _fsdp1_case(strategy, use_orig_params, ignore_head, clips):
    """TinyNet under FSDP1 (each Linear a unit, and the root), one step on this rank's batch; ``head``
    optionally left outside FSDP, its gradients averaged over the world by hand (FSDP does not reduce them).
    Then for each (norm_type, max_norm): distclip's ``clip_module_grad_norm_`` and ``FSDP.clip_grad_norm_``
    on the same gradients."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = tiny_net()
    fsdp = FullyShardedDataParallel(
        model,
        sharding_strategy=ShardingStrategy[strategy],
        use_orig_params=use_orig_params,
        device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        ignored_modules=[model.head] if ignore_head else None,
        device_mesh=cached_mesh((2, 2), HSDP_MESH_DIMS) if "HYBRID" in strategy else None,
    )
    tiny_loss(fsdp, tiny_batch(dist.get_rank())).backward()
    if ignore_head:
        average_grads(model.head.parameters())
    params = list(fsdp.parameters())
    saved = snapshot(params)
    clipped = []
    for norm_type, max_norm in clips:
        clipped.append(dict(
            distclip=clip_once(
                params, saved, lambda: distclip.clip_module_grad_norm_(fsdp, max_norm, norm_type)),
            framework=clip_once(params, saved, lambda: fsdp.clip_grad_norm_(max_norm, norm_type)),
        ))
    return dict(before=saved, clips=clipped)


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


def _rank_fsdp2(cases):
    return [_fsdp2_case(**case) for case in cases]


def _fsdp2_case(mesh_shape, clips):
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


_PLACEMENTS = {"R": Replicate(), "S0": Shard(0), "S1": Shard(1)}
_TENSOR_MESHES = {
    "1d": lambda: cached_mesh((dist.get_world_size(),)),
    "2d": lambda: cached_mesh((2, 2), TP_MESH_DIMS),
    "tp": lambda: cached_mesh((2, 2), TP_MESH_DIMS)["tp"],
}


def seeded_tensor(shape, seed):
    """The full float32 gradient of one item of a DTensor case (the same on every rank and in the test)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _item_param(item):
    """A parameter with the gradient ``item`` describes: ``(shape, seed, mesh, placements)`` a DTensor
    parameter whose grad is the full seeded tensor distributed with those placements (no communication:
    every rank has the full tensor), or ``(shape, seed)`` a plain parameter with the full tensor as grad."""
    shape, seed, *where = item
    full = seeded_tensor(shape, seed)
    if not where:
        param = nn.Parameter(torch.zeros(shape))
        param.grad = full
        return param
    mesh_key, placements = where
    mesh, placements = _TENSOR_MESHES[mesh_key](), [_PLACEMENTS[p] for p in placements]
    param = nn.Parameter(distribute_tensor(torch.zeros(shape), mesh, placements, src_data_rank=None))
    param.grad = distribute_tensor(full, mesh, placements, src_data_rank=None)
    return param


def _rank_dtensor_cases(cases):
    return [_dtensor_case(**case) for case in cases]


def _declare_tp_over_dp(items, tensors):
    """``tensors`` (one per item) as a clip argument in which those on the "tp" sub-mesh are declared
    replicated over the "dp" group of the 2x2 mesh (their placements do not say it)."""
    dp_group = cached_mesh((2, 2), TP_MESH_DIMS)["dp"].get_group()
    on_tp = [item[2:3] == ("tp",) for item in items]
    return [t for t, tp in zip(tensors, on_tp) if not tp] + [
        {"params": [t for t, tp in zip(tensors, on_tp) if tp], "replicated_over": dp_group}]


def _dtensor_case(items, clips, with_torch, declare_tp_over_dp):
    """For each (norm_type, max_norm): ``distclip.clip_grad_norm_`` of the items' parameters,
    ``distclip.get_total_norm`` of their gradients, and (``with_torch``) torch's clip of the same. With
    ``declare_tp_over_dp`` the "tp" sub-mesh items are declared replicated over dp, reduced over the world."""
    params = [_item_param(item) for item in items]
    grads = [p.grad for p in params]
    group, clipped, total = None, params, grads
    if declare_tp_over_dp:
        group = dist.group.WORLD
        clipped, total = _declare_tp_over_dp(items, params), _declare_tp_over_dp(items, grads)
    saved = snapshot(params)
    entries = []
    for norm_type, max_norm in clips:
        entry = dict(
            distclip=clip_once(
                params, saved, lambda: distclip.clip_grad_norm_(clipped, max_norm, norm_type, group=group)),
            total=clip_once(params, saved, lambda: distclip.get_total_norm(total, norm_type, group=group)),
        )
        if with_torch:
            entry["framework"] = clip_once(
                params, saved, lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type))
        entries.append(entry)
    return dict(before=saved, clips=entries)


def _rank_torch_clip(items):
    """Only torch's clip of the items' parameters (expected to fail on every rank alike)."""
    params = [_item_param(item) for item in items]
    try:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    except Exception as err:  # the outcome the test expects
        return type(err), str(err)
    return None


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


def _pipeline_step(model, stage, replica):
    """One step of the two-stage pipeline: stage 0 sends its activations to its peer (the other stage of
    the same replica), stage 1 computes the loss and sends back the activations' gradient."""
    peer = dist.get_rank() ^ 1
    tokens, targets = tied_batch(replica)
    if stage == 0:
        hidden = model.stage0(tokens)
        dist.send(hidden.detach(), peer)
        hidden_grad = torch.empty_like(hidden)
        dist.recv(hidden_grad, peer)
        hidden.backward(hidden_grad)
    else:
        hidden = torch.empty(TOKENS, WIDTH)
        dist.recv(hidden, peer)
        hidden.requires_grad_()
        model.stage1_loss(hidden, targets).backward()
        dist.send(hidden.grad, peer)


def _rank_pipeline(clips):
    """Ranks (2r, 2r+1) are the two stages of data-parallel replica r; each stage holds its own layers and
    a copy of the tied embedding. After the step: gradients averaged over the replicas (4 ranks), the
    embedding's two gradients summed over the tie group (= the pipeline group), as Megatron does. The clip
    declares the embedding replicated over the tie group (and everything replicated over data parallel)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    stage, replica = rank % 2, rank // 2
    pp_group = cached_subgroup(tuple((2 * r, 2 * r + 1) for r in range(world_size // 2)))
    model = tied_lm()
    _pipeline_step(model, stage, replica)
    embedding, layers = model.embedding.weight, model.stage_parameters(stage)
    if world_size == 4:
        dp_group = cached_subgroup(((0, 2), (1, 3)))
        average_grads([*layers, embedding], dp_group)
    dist.all_reduce(embedding.grad, group=pp_group)
    if world_size == 2:
        declared = [*layers, {"params": [embedding], "replicated_over": pp_group}]
        group = pp_group
    else:
        declared = [{"params": layers, "replicated_over": dp_group},
                    {"params": [embedding], "replicated_over": [pp_group, dp_group]}]
        group = dist.group.WORLD
    params = [*layers, embedding]
    saved = snapshot(params)
    return dict(before=saved, clips=[
        clip_once(params, saved, lambda: distclip.clip_grad_norm_(declared, max_norm, norm_type, group=group))
        for norm_type, max_norm in clips
    ])


def moe_experts_of(rank):
    """The experts rank ``rank`` holds: expert-parallel groups (0, 1) and (2, 3) split the 4 experts, 2 per
    rank; ranks 0 and 2 (1 and 3) hold the same experts: the expert-data-parallel groups (0, 2), (1, 3)."""
    per_rank = EXPERTS // 2
    return list(range(per_rank * (rank % 2), per_rank * (rank % 2 + 1)))


def _rank_moe(clips):
    """One step of the MoE on this rank's tokens; the gradients averaged over the world (the shared
    parameters by data parallelism; each expert's too, which is what the all-to-all that brings it every
    rank's tokens plus the expert-data-parallel all-reduce amount to). Each rank then holds the shared
    parameters and its experts, and declares them replicated over the world and over its EDP group."""
    rank = dist.get_rank()
    edp_group = cached_subgroup(((0, 2), (1, 3)))
    model = moe()
    moe_loss(model, moe_batch(rank)).backward()
    average_grads(model.parameters())
    shared, experts = model.non_expert_parameters(), model.expert_parameters(moe_experts_of(rank))
    declared = [{"params": shared, "replicated_over": dist.group.WORLD},
                {"params": experts, "replicated_over": edp_group}]
    params = [*shared, *experts]
    saved = snapshot(params)
    return dict(before=saved, clips=[
        clip_once(params, saved,
                   lambda: distclip.clip_grad_norm_(declared, max_norm, norm_type, group=dist.group.WORLD))
        for norm_type, max_norm in clips
    ])


def _rank_invalid_layouts():
    """Calls that must raise ValueError on every rank before any collective: a DTensor gradient with a
    Partial placement (clip, total norm, module clip), and declared replicas without group=."""
    mesh, rank = cached_mesh((dist.get_world_size(),)), dist.get_rank()
    partial = nn.Parameter(DTensor.from_local(torch.zeros(3), mesh, [Replicate()]))
    partial.grad = DTensor.from_local(torch.full((3,), rank + 1.0), mesh, [Partial()])
    sharded = nn.Parameter(DTensor.from_local(torch.zeros(2), mesh, [Shard(0)]))
    sharded.grad = DTensor.from_local(torch.full((2,), rank + 1.0), mesh, [Shard(0)])
    plain = nn.Parameter(torch.zeros(4))
    plain.grad = torch.ones(4)
    declared = [{"params": [plain], "replicated_over": mesh.get_group()}]
    params = [partial, sharded, plain]
    return dict(
        partial_clip=attempt(lambda: distclip.clip_grad_norm_([sharded, partial], 1.0), params),
        partial_total=attempt(lambda: distclip.get_total_norm([sharded.grad, partial.grad], INF), params),
        partial_module=attempt(
            lambda: distclip.clip_module_grad_norm_(_ModuleOf([sharded, partial]), 1.0), params),
        declared_clip=attempt(lambda: distclip.clip_grad_norm_(declared, 1.0), params),
        declared_total=attempt(
            lambda: distclip.get_total_norm([{"params": [plain.grad], "replicated_over": mesh.get_group()}]),
            params),
        fast_dtensor=attempt(lambda: distclip.fast_clip_grad_norm_([plain, sharded], 1.0), params),
    )


class _ModuleOf(nn.Module):
    """A plain module holding the given parameters (for ``clip_module_grad_norm_``)."""

    def __init__(self, params):
        super().__init__()
        self.held = nn.ParameterList(params)


# --------------------------------------------------------------------------------------------------------
# Test side: reference and checks.
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# 1. FSDP1.
# --------------------------------------------------------------------------------------------------------

FSDP1_STRATEGIES = {2: ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"],
                    4: ["FULL_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"]}


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp1_every_strategy_matches_fsdp_clip_and_float64(worlds, world_size):
    """FSDP1 per sharding strategy (hybrid ones on a 2x2 device mesh), ``use_orig_params`` both ways, with
    and without a module outside FSDP (``ignored_modules``, gradients made identical across ranks), norm
    types 2, inf and 1: ``clip_module_grad_norm_`` gives the float64 norm, bitwise the same on every rank, a
    plain tensor, equal to ``FSDP.clip_grad_norm_`` on the same gradients, with the same clipped gradients;
    1 collective (0 under NO_SHARD), as FSDP's own clip."""
    ref_grads = tiny_reference_grads(range(world_size))
    clips = clips_for(ref_grads, [2.0, INF, 1.0])
    cases = [dict(strategy=s, use_orig_params=o, ignore_head=i, clips=clips)
             for s in FSDP1_STRATEGIES[world_size] for o in (False, True) for i in (False, True)]
    results = worlds(world_size).run(_rank_fsdp1, cases)
    for i, case in enumerate(cases):
        comms = 0 if case["strategy"] == "NO_SHARD" else 1
        ranks = per_rank(results, i)
        for j, (norm_type, max_norm) in enumerate(clips):
            ref = reference_norm(ref_grads, norm_type)
            what = (f"FSDP1 {case['strategy']} use_orig_params={case['use_orig_params']} "
                    f"ignored_head={case['ignore_head']} p={norm_type}")
            for r, res in enumerate(ranks):
                ours, theirs = res["clips"][j]["distclip"], res["clips"][j]["framework"]
                check_clip(ours, res["before"], ref, max_norm, comms, f"{what} rank {r}")
                check_clip(theirs, res["before"], ref, max_norm, comms, f"{what} rank {r} FSDP.clip_grad_norm_")
                check_matches_framework(ours, theirs, f"{what} rank {r}")
            check_same_on_every_rank([res["clips"][j]["distclip"] for res in ranks], what)


# --------------------------------------------------------------------------------------------------------
# 2 and 9. FSDP2 (fully_shard), HSDP, and empty local shards.
# --------------------------------------------------------------------------------------------------------

FSDP2_LAYOUTS = {
    # (world_size, mesh shape): ranks with an empty local shard (Linear(7, 3) and Linear(3, 2) on 4 ranks)
    (2, (2,)): False,
    (4, (4,)): True,
    (4, (2, 2)): False,
}


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
    (results,) = zip(*worlds(world_size).run(_rank_fsdp2, [dict(mesh_shape=mesh_shape, clips=clips)]))
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


# --------------------------------------------------------------------------------------------------------
# 3, 4, 5. DTensor gradients: tensor parallel on a 2x2 mesh, two meshes, DTensors beside plain tensors.
# --------------------------------------------------------------------------------------------------------

# (shape, seed, mesh, placements): shapes chosen so that most shards are uneven.
TP_ITEMS = [
    ((5, 3), 1, "2d", ("R", "S0")),   # column/row-parallel weight, replicated over dp
    ((4, 5), 2, "2d", ("R", "S1")),
    ((3,), 3, "2d", ("R", "R")),      # a replicated bias / norm weight
    ((6, 5), 4, "2d", ("S0", "S1")),  # sharded over both mesh dims (FSDP + TP)
    ((3, 2), 5, "2d", ("S0", "R")),
    ((7,), 6, "2d", ("S0", "S0")),
]
TWO_MESH_ITEMS = [
    ((6, 5), 7, "1d", ("S0",)),
    ((5,), 8, "1d", ("R",)),
    ((5, 3), 9, "2d", ("R", "S0")),
    ((4, 6), 10, "2d", ("S0", "S1")),
]
PLAIN_ITEMS = [((4, 3), 11), ((2,), 12)]  # plain tensors, the same on every rank
TP_SUBMESH_ITEMS = [  # tensor parallel on the "tp" sub-mesh, data parallel (DDP-style replicas) over "dp"
    ((5, 3), 13, "tp", ("S0",)),
    ((4, 5), 14, "tp", ("S1",)),
    ((3,), 15, "tp", ("R",)),
]
DTENSOR_NORM_TYPES = [2.0, 1.0, 3.0, INF, -INF]


class DTensorLayout(NamedTuple):
    label: str
    items: list
    kind: str  # what distclip returns: "DTensor" (every gradient a DTensor on one mesh) or "Tensor"
    torch_comms: int | None  # collectives of torch's clip; None: torch cannot clip this layout
    declare_tp_over_dp: bool = False  # the "tp" sub-mesh items declared replicated over dp, group=WORLD


def dtensor_layouts(world_size):
    """The DTensor layouts tested on a world of ``world_size`` ranks."""
    one_mesh = [item for item in TWO_MESH_ITEMS if item[2] == "1d"]
    layouts = [DTensorLayout("DTensors on a 1-D mesh + plain tensors", one_mesh + PLAIN_ITEMS, "Tensor", None)]
    if world_size == 4:
        layouts += [
            DTensorLayout("tensor parallel on a 2x2 (dp, tp) mesh", TP_ITEMS, "DTensor", 2),
            DTensorLayout("tensor parallel on the tp sub-mesh", TP_SUBMESH_ITEMS, "DTensor", 1),
            DTensorLayout("DTensors on two meshes", TWO_MESH_ITEMS, "Tensor", None),
            DTensorLayout("DTensors on two meshes + plain tensors",
                          PLAIN_ITEMS[:1] + TWO_MESH_ITEMS + PLAIN_ITEMS[1:], "Tensor", None),
            DTensorLayout("2x2-mesh DTensors + tp sub-mesh DTensors declared replicated over dp, group=WORLD",
                          TP_ITEMS[3:5] + TP_SUBMESH_ITEMS, "Tensor", None, declare_tp_over_dp=True),
        ]
    return layouts


def items_reference(items):
    """The full tensors of ``items``, each once."""
    return [seeded_tensor(item[0], item[1]) for item in items]


@pytest.mark.parametrize("world_size", [2, 4])
def test_dtensor_gradients_give_norm_of_full_tensors(worlds, world_size):
    """DTensor gradients from ``distribute_tensor`` of seeded full tensors, with group=None: tensor-parallel
    placements on a 2x2 ("dp", "tp") mesh (Replicate/Shard mixes, Shard on both dims) and on its 1-D "tp"
    sub-mesh (replicas over "dp" not in the placements), DTensors on two meshes in one call (a 1-D mesh and a
    2-D mesh over the same ranks), and plain tensors beside them (the same on every rank: counted once); and,
    with group=WORLD, 2-D-mesh DTensors beside tp-sub-mesh ones declared ``replicated_over`` the dp group.
    ``clip_grad_norm_`` and ``get_total_norm`` give the float64 norm of the full tensors, bitwise the same on
    every rank, from 1 collective; a replicated float32 DTensor when every gradient is a DTensor on one mesh,
    else a float64 tensor. On one mesh it equals torch's clip, which makes one all_reduce per sharded mesh
    dimension (2 on the 2x2 mesh)."""
    layouts = dtensor_layouts(world_size)
    clips = [clips_for(items_reference(layout.items), DTENSOR_NORM_TYPES) for layout in layouts]
    cases = [dict(items=layout.items, clips=layout_clips, with_torch=layout.torch_comms is not None,
                  declare_tp_over_dp=layout.declare_tp_over_dp) for layout, layout_clips in zip(layouts, clips)]
    results = worlds(world_size).run(_rank_dtensor_cases, cases)
    for i, layout in enumerate(layouts):
        ranks = per_rank(results, i)
        ref_tensors = items_reference(layout.items)
        for j, (norm_type, max_norm) in enumerate(clips[i]):
            ref = reference_norm(ref_tensors, norm_type)
            what = f"{layout.label} p={norm_type}"
            for r, res in enumerate(ranks):
                entry = res["clips"][j]
                for api, cap in (("distclip", max_norm), ("total", INF)):
                    check_clip(entry[api], res["before"], ref, cap, 1, f"{what} rank {r} {api}", kind=layout.kind)
                    norm = entry[api]["norm"]
                    if layout.kind == "DTensor":
                        assert all(p.is_replicate() for p in norm["placements"]), f"{what} rank {r}: {norm}"
                        assert norm["dtype"] == torch.float32, f"{what} rank {r}: {norm}"
                    else:
                        assert norm["dtype"] == torch.float64, f"{what} rank {r}: {norm}"
                if layout.torch_comms is not None:
                    check_clip(entry["framework"], res["before"], ref, max_norm, layout.torch_comms,
                               f"{what} rank {r} torch", kind="DTensor")
                    check_matches_framework(entry["distclip"], entry["framework"], f"{what} rank {r}")
            for api in ("distclip", "total"):
                check_same_on_every_rank([res["clips"][j][api] for res in ranks], f"{what} {api}")


def test_torch_clip_fails_on_two_meshes(worlds):
    """What distclip adds in the test above: torch's clip of DTensors on two meshes raises (on every rank
    alike, before any collective), in its own world call."""
    outcomes = worlds(4).run(_rank_torch_clip, TWO_MESH_ITEMS)
    for r, outcome in enumerate(outcomes):
        assert outcome is not None, f"rank {r}: torch's clip returned"
        assert outcome[0] is RuntimeError and "same mesh" in outcome[1], f"rank {r}: {outcome}"


# --------------------------------------------------------------------------------------------------------
# 6. DDP and plain modules: local clips, no collective.
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# 7. Pipeline parallel with a tied embedding.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
def test_pipeline_with_tied_embedding_counts_it_once(worlds, world_size):
    """Two pipeline stages (ranks 2r, 2r+1) sharing the embedding, on 2 ranks (group = the pipeline group)
    and on 4 ranks (2 stages x 2 data-parallel replicas, everything declared replicated over data parallel,
    reduced over the world): the float64 norm of the whole tied model's gradient with the embedding counted
    once, from 1 collective. The embedding counted twice would give a different norm (checked), and the
    stages' gradients are the reference's (checked), so the test tells the layouts apart."""
    replicas = world_size // 2
    ref_grads = tied_reference_grads(replicas)
    embedding, first, second = ref_grads[0], ref_grads[1:3], ref_grads[3:5]
    clips = clips_for(ref_grads, [2.0, INF, 1.0])
    results = worlds(world_size).run(_rank_pipeline, clips)
    for r, res in enumerate(results):
        layers = first if r % 2 == 0 else second
        assert_grads_close(res["before"], [*layers, embedding], f"pipeline rank {r}: gradients vs reference",
                           rtol=REL_TOL, atol=MODEL_ATOL)
    for j, (norm_type, max_norm) in enumerate(clips):
        ref = reference_norm(ref_grads, norm_type)
        if norm_type == 2.0:
            twice = reference_norm([*ref_grads, embedding], norm_type)
            assert abs(twice - ref) > 1e-3 * ref, "the tied embedding counted twice must change the norm"
        records = [res["clips"][j] for res in results]
        for r, (res, record) in enumerate(zip(results, records)):
            what = f"pipeline on {world_size} ranks p={norm_type} rank {r}"
            check_clip(record, res["before"], ref, max_norm, 1, what)
        check_same_on_every_rank(records, f"pipeline p={norm_type}")


# --------------------------------------------------------------------------------------------------------
# 8. Expert parallel.
# --------------------------------------------------------------------------------------------------------


def test_expert_parallel_moe_counts_each_expert_once(worlds):
    """A top-1 MoE on 4 ranks: shared parameters replicated over the world, 4 experts 2 per rank over the
    expert-parallel groups (0, 1), (2, 3), replicated over the expert-data-parallel groups (0, 2), (1, 3);
    declared so and reduced over the world: the float64 norm of the whole model (each expert once, the
    experts' contributions summed), 1 collective. Counting the experts on both replicas, or averaging them
    over the expert-parallel group, would give different norms (checked)."""
    by_name = moe_reference_grads(range(4))
    ref_grads = list(by_name.values())
    shared = [g for name, g in by_name.items() if not name.startswith("experts.")]
    experts = [[g for name, g in by_name.items() if name.startswith(f"experts.{e}.")] for e in range(EXPERTS)]
    assert all(g.abs().sum() > 0 for grads in experts for g in grads), "every expert must get tokens"
    all_experts = [g for grads in experts for g in grads]
    ref2 = reference_norm(ref_grads, 2.0)
    doubled = reference_norm([*shared, *all_experts, *all_experts], 2.0)
    averaged = reference_norm([*shared, *[g / 2 for g in all_experts]], 2.0)
    assert min(abs(doubled - ref2), abs(averaged - ref2)) > 1e-3 * ref2, "the wrong countings must differ"
    clips = clips_for(ref_grads, [2.0, 1.0, 3.0, INF])
    results = worlds(4).run(_rank_moe, clips)
    for r, res in enumerate(results):
        held = [*shared, *[g for e in moe_experts_of(r) for g in experts[e]]]
        assert_grads_close(res["before"], held, f"MoE rank {r}: gradients vs reference", rtol=REL_TOL,
                           atol=MODEL_ATOL)
    for j, (norm_type, max_norm) in enumerate(clips):
        ref = reference_norm(ref_grads, norm_type)
        records = [res["clips"][j] for res in results]
        for r, (res, record) in enumerate(zip(results, records)):
            check_clip(record, res["before"], ref, max_norm, 1, f"MoE p={norm_type} rank {r}")
        check_same_on_every_rank(records, f"MoE p={norm_type}")


# --------------------------------------------------------------------------------------------------------
# Invalid layouts.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 4])
def test_invalid_layouts_raise_value_error_on_every_rank(worlds, world_size):
    """A DTensor gradient with a Partial placement (``clip_grad_norm_``, ``get_total_norm``,
    ``clip_module_grad_norm_``) and declared replicas with group=None (``clip_grad_norm_``,
    ``get_total_norm``), and DTensor gradients given to ``fast_clip_grad_norm_`` (one process's plain
    gradients only): ValueError on every rank, naming the problem, before any collective (so no rank is
    left waiting in one), gradients unchanged."""
    expected = {"partial_clip": "Partial", "partial_total": "Partial", "partial_module": "Partial",
                "declared_clip": "group=", "declared_total": "group=",
                "fast_dtensor": "use distclip.clip_grad_norm_"}
    results = worlds(world_size).run(_rank_invalid_layouts)
    for r, res in enumerate(results):
        assert set(res) == set(expected)
        for call, words in expected.items():
            error, message, comms, unchanged = res[call]
            assert error is ValueError and words in message, f"{call} rank {r}: {error}: {message}"
            assert comms == 0, f"{call} rank {r}: {comms} collectives before raising"
            assert unchanged, f"{call} rank {r}: gradients changed"
