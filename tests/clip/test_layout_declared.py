"""Declared replicas (``{"params": ..., "replicated_over": group}``): a pipeline with a tied embedding and an
expert-parallel MoE, each counted once over the world from 1 collective.

The models (``_layout_models``) train one step on real gloo ranks, each rank holding its stage or its experts;
the clip declares which of its gradients are copies of other ranks' and reduces over the world. The reference
is the float64 gradient of the whole unwrapped model on every rank's batch; the wrong countings (a copy counted
twice, experts averaged) are checked to give other norms, so the tests tell the layouts apart.
"""

import math

import pytest
import torch
import torch.distributed as dist

import distclip
from _layout_models import (
    EXPERTS,
    MODEL_ATOL,
    TOKENS,
    WIDTH,
    moe,
    moe_batch,
    moe_loss,
    moe_reference_grads,
    tied_batch,
    tied_lm,
    tied_reference_grads,
)
from _tester import (
    REL_TOL,
    assert_grads_close,
    average_grads,
    cached_subgroup,
    check_clip,
    check_same_on_every_rank,
    clip_once,
    clips_for,
    reference_norm,
    snapshot,
)

INF = math.inf


# --------------------------------------------------------------------------------------------------------
# Pipeline parallel with a tied embedding.
# --------------------------------------------------------------------------------------------------------


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
# Expert parallel.
# --------------------------------------------------------------------------------------------------------


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
