"""GradClipper with ``fused=True``: the coefficient folded into torch's fused Adam, AdamW and SGD equals
clipping then stepping (a non-finite step skipped on the device), and the fused step reads nothing on the
host."""

import pytest
import torch

import distclip

from _service_helpers import NAN, POLICIES, _backward, _model, _no_host_sync


FUSED = {
    "Adam": lambda params, fused: torch.optim.Adam(params, lr=0.01, fused=fused),
    "AdamW": lambda params, fused: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=fused),
    "SGD": lambda params, fused: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=fused),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_folding_equals_clip_then_step(name):
    folded, reference = _model(), _model()
    opt = FUSED[name](folded.parameters(), True)
    ref_opt = FUSED[name](reference.parameters(), True)
    clipper = distclip.GradClipper(folded, 0.3, fused=True, optimizer=opt, nonfinite="skip")
    for t in range(5):
        for m, o in ((folded, opt), (reference, ref_opt)):
            o.zero_grad()
            _backward(m, t)
        if t == 2:  # a non-finite step: skipped on the device by found_inf, as if never taken
            for m in (folded, reference):
                next(m.parameters()).grad[0, 0] = NAN
        report = clipper.clip_()
        clipper.step(report)
        if t != 2:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.3)
            ref_opt.step()
        assert bool(report.skip) == (t == 2)
        for p, q in zip(folded.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


def test_fused_step_reads_nothing_on_the_host():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    clipper = distclip.GradClipper(model, 0.3, fused=True, optimizer=opt, policy=POLICIES["all"](), nonfinite="skip")
    for t in range(4):
        opt.zero_grad()
        _backward(model, t)
        with _no_host_sync():
            clipper.step(clipper.clip_())
