"""State: each policy's ``state_dict`` restores the same decisions and refuses another configuration;
GradClipper's (policies and counters) resumes a run that then reproduces the uninterrupted steps bit for bit,
and refuses another set of policies."""

import io

import pytest
import torch

import distclip

from _service_helpers import POLICIES, _backward, _grads, _model, _norm_sequence, _policy_decisions, _policy_norms


@pytest.mark.parametrize(
    "make",
    [
        lambda: distclip.AutoClip(percentile=30),
        lambda: distclip.ZClip(warmup_steps=6),
        lambda: distclip.SpikeSkip(window=12, min_history=4, sigma=2.0),
    ],
    ids=["AutoClip", "ZClip", "SpikeSkip"],
)
def test_state_dict_restores_the_same_decisions(make):
    norms = _policy_norms(60)
    first, resumed = make(), make()
    _policy_decisions(first, norms[:40])
    state = first.state_dict()
    resumed.load_state_dict({k: v.clone() for k, v in state.items()})
    for g in norms[40:]:
        g = torch.tensor(g, dtype=torch.float64)
        assert torch.equal(first.decide(g), resumed.decide(g))
    for (k, a), b in zip(first.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_state_dict_rejects_another_configuration():
    state = distclip.SpikeSkip(window=8, min_history=4).state_dict()
    with pytest.raises(ValueError, match="shape"):
        distclip.SpikeSkip(window=16).load_state_dict(state)
    with pytest.raises(ValueError, match="keys"):
        distclip.ZClip().load_state_dict(state)


# ------------------------------------------------------------------------------------------------ the clipper


def _run_steps(clipper, model, scales, first_seed):
    reports = []
    for t, scale in enumerate(scales):
        model.zero_grad()
        _backward(model, first_seed + t, scale)
        report = clipper.clip_()
        reports.append((report.as_dict(host=True), _grads(model)))
    return reports


@pytest.mark.parametrize("policy", ["autoclip", "zclip", "spikeskip", "all"])
def test_resume_from_state_dict_reproduces_the_next_5_steps(policy):
    scales = _norm_sequence(16)
    model = _model()
    clipper = distclip.GradClipper(model, 10.0, policy=POLICIES[policy](), nonfinite="skip")
    _run_steps(clipper, model, scales[:8], 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "clipper": clipper.state_dict()}, buffer)
    uninterrupted = _run_steps(clipper, model, scales[8:13], 8)

    checkpoint = torch.load(io.BytesIO(buffer.getvalue()))
    resumed_model = _model(seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = distclip.GradClipper(resumed_model, 10.0, policy=POLICIES[policy](), nonfinite="skip")
    resumed.load_state_dict(checkpoint["clipper"])
    replayed = _run_steps(resumed, resumed_model, scales[8:13], 8)
    for (logged, grads), (want_logged, want_grads) in zip(replayed, uninterrupted, strict=True):
        assert logged == want_logged
        assert all(torch.equal(g, w) for g, w in zip(grads, want_grads))


def test_load_state_dict_rejects_other_policies():
    state = distclip.GradClipper(_model(), 1.0, policy=distclip.ZClip()).state_dict()
    with pytest.raises(ValueError, match="policies"):
        distclip.GradClipper(_model(), 1.0, policy=distclip.AutoClip()).load_state_dict(state)
