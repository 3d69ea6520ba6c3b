"""GradClipper reads nothing on the host: ``clip_()`` and ``as_dict()`` under every policy and non-finite
mode with the host-synchronisation trap on (``Tensor.item``/``tolist``/``cpu``/``numpy``/``bool()``/
``float()``/``int()`` raise), the trap itself, and on a GPU torch's own synchronisation detector."""

import pytest
import torch

import distclip

from _service_helpers import POLICIES, _backward, _model, _no_host_sync, _norm_sequence


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_clip_performs_no_host_synchronisation(policy, nonfinite):
    model = _model()
    clipper = distclip.GradClipper(model, 0.5, policy=POLICIES[policy](), nonfinite=nonfinite, norms="module")
    for t, scale in enumerate(_norm_sequence(12)):
        model.zero_grad()
        _backward(model, t, scale)
        with _no_host_sync():
            report = clipper.clip_()
            report.as_dict("grad/")
    assert int(report.steps) == 12


def test_the_trap_catches_a_host_read():
    with pytest.raises(AssertionError, match="host synchronisation"), _no_host_sync():
        bool(torch.ones(()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_clip_performs_no_cuda_synchronisation():
    """On a GPU, torch's own detector: any synchronising call inside clip_() and the fused step raises."""
    model = _model().cuda()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    fused = distclip.GradClipper(model, 0.5, policy=POLICIES["all"](), nonfinite="skip", norms="parameter",
                                 optimizer=opt, fused=True)
    agc = distclip.GradClipper(model, 0.5, policy=[distclip.AGC(), distclip.ZClip(warmup_steps=2)], nonfinite="skip")
    for t in range(5):
        opt.zero_grad()
        model(torch.randn(8, 6, device="cuda")).square().sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fused.step(fused.clip_())
            agc.clip_()
        finally:
            torch.cuda.set_sync_debug_mode("default")
