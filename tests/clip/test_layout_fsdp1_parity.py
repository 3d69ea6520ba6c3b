"""``clip_module_grad_norm_`` on FSDP1 behaves as ``FullyShardedDataParallel.clip_grad_norm_`` in everything a
caller sees: the value, the returned dtype (the gradients' dtype, also under ``MixedPrecision``), the warning
and dtype on a rank with no gradients, and the ``RuntimeError`` on a nested (non-root) unit, where a clip of
that unit alone would return a part of the norm.

Real FSDP1 on 2 gloo ranks (the ``worlds`` harness: a hang fails after its timeout), ``use_orig_params``
both ways; on every case FSDP's own clip runs on the same gradients, and the test compares the two.
"""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import distclip
from _layout_models import tiny_batch, tiny_loss, tiny_net


def _fsdp(model, use_orig_params, mixed_precision=None, **options):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(
        model, use_orig_params=use_orig_params, device_id=torch.device("cpu"), mixed_precision=mixed_precision,
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), **options,
    )


def _outcome(clip):
    """What a caller observes of ``clip()``: the returned norm (value and dtype) or the exception, and the
    warnings it raised (category, text, the file it points at)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            norm = clip()
            result = dict(value=float(norm), dtype=norm.dtype, type=type(norm).__name__)
        except Exception as err:  # the test compares distclip's refusal with FSDP's
            result = dict(error=type(err).__name__, message=str(err))
    result["warnings"] = [(w.category.__name__, str(w.message), w.filename) for w in caught]
    return result


def _both(fsdp, clip_ours, clip_theirs):
    """distclip's and FSDP's outcome on the same gradients, and whether each left the gradients unchanged."""
    params = list(fsdp.parameters())
    saved = [None if p.grad is None else p.grad.clone() for p in params]

    def run(clip):
        for p, g in zip(params, saved):
            if g is not None:
                p.grad.copy_(g)
        outcome = _outcome(clip)
        outcome["unchanged"] = all(g is None or torch.equal(p.grad, g) for p, g in zip(params, saved))
        return outcome

    return dict(distclip=run(clip_ours), fsdp=run(clip_theirs))


def _rank_nested(use_orig_params):
    """TinyNet with every Linear a unit inside the root; a clip of a nested unit, and of a plain submodule that
    holds nested units only."""
    fsdp = _fsdp(tiny_net(), use_orig_params)
    tiny_loss(fsdp, tiny_batch(dist.get_rank())).backward()
    unit = fsdp.module.body[0]
    return dict(
        unit=_both(fsdp, lambda: distclip.clip_module_grad_norm_(unit, 0.1), lambda: unit.clip_grad_norm_(0.1)),
        part=_outcome(lambda: distclip.clip_module_grad_norm_(fsdp.module.body, 0.1)),
        root=_both(fsdp, lambda: distclip.clip_module_grad_norm_(fsdp, 0.1), lambda: fsdp.clip_grad_norm_(0.1)),
    )


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_a_nested_unit_is_refused_as_fsdp_refuses_it(worlds, use_orig_params):
    for r, res in enumerate(worlds(2).run(_rank_nested, use_orig_params)):
        ours, theirs = res["unit"]["distclip"], res["unit"]["fsdp"]
        assert theirs.get("error") == "RuntimeError", f"rank {r}: FSDP's clip of a nested unit: {theirs}"
        assert ours.get("error") == "RuntimeError", f"rank {r}: distclip clipped a nested unit alone: {ours}"
        assert "should only be called on the root FSDP instance" in ours["message"], ours
        assert ours["unchanged"], f"rank {r}: the refused clip changed gradients"
        part = res["part"]
        assert part.get("error") == "RuntimeError" and "root FSDP instance" in part["message"], (
            f"rank {r}: a submodule holding nested units only: {part}")
        root_ours, root_theirs = res["root"]["distclip"], res["root"]["fsdp"]
        assert "error" not in root_ours and root_ours["value"] == pytest.approx(root_theirs["value"], rel=1e-5)


def _rank_mixed_precision(use_orig_params, keep_low_precision_grads):
    from torch.distributed.fsdp import MixedPrecision

    precision = MixedPrecision(param_dtype=torch.float16, reduce_dtype=torch.float16,
                               keep_low_precision_grads=keep_low_precision_grads)
    fsdp = _fsdp(tiny_net(), use_orig_params, precision)
    tiny_loss(fsdp, tiny_batch(dist.get_rank())).backward()
    grad_dtypes = sorted({str(p.grad.dtype) for p in fsdp.parameters() if p.grad is not None})
    return dict(grad_dtypes=grad_dtypes, **_both(
        fsdp, lambda: distclip.clip_module_grad_norm_(fsdp, 0.1), lambda: fsdp.clip_grad_norm_(0.1)))


@pytest.mark.parametrize("use_orig_params", [False, True])
@pytest.mark.parametrize("keep_low_precision_grads", [False, True])
def test_mixed_precision_norm_has_fsdps_dtype(worlds, use_orig_params, keep_low_precision_grads):
    results = worlds(2).run(_rank_mixed_precision, use_orig_params, keep_low_precision_grads)
    for r, res in enumerate(results):
        ours, theirs = res["distclip"], res["fsdp"]
        assert "error" not in ours and "error" not in theirs, res
        assert ours["dtype"] == theirs["dtype"], (
            f"rank {r} (gradients {res['grad_dtypes']}): distclip returned {ours['dtype']}, FSDP {theirs['dtype']}")
        assert ours["type"] == theirs["type"] == "Tensor"
        rel = 1e-3 if theirs["dtype"] == torch.float16 else 1e-5
        assert ours["value"] == pytest.approx(theirs["value"], rel=rel), (ours, theirs)
        assert ours["warnings"] == theirs["warnings"] == []
    assert results[0]["distclip"]["value"] == results[1]["distclip"]["value"]


class _One(nn.Module):
    """One parameter of one element: on 2 ranks FSDP gives rank 0 the element and rank 1 only padding."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.full((1,), 3.0))

    def forward(self, x):
        return x * self.w


def _rank_no_gradients(use_orig_params, backward):
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp = FullyShardedDataParallel(_One(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    if backward:
        fsdp(torch.full((1,), 2.0)).sum().backward()
    has_grads = any(p.grad is not None for p in fsdp.parameters())
    return dict(has_grads=has_grads, **_both(
        fsdp, lambda: distclip.clip_module_grad_norm_(fsdp, 1.0), lambda: fsdp.clip_grad_norm_(1.0)))


@pytest.mark.parametrize("use_orig_params, backward", [(False, False), (True, False), (True, True)])
def test_a_rank_without_gradients_warns_and_returns_the_default_dtype_as_fsdp(worlds, use_orig_params, backward):
    """No backward: no rank has gradients. One element under ``use_orig_params=True``: rank 1 holds none of it,
    so its parameter has no gradient there, while rank 0's has. On every rank the outcome (value, dtype,
    warning text and category) is FSDP's, and distclip's warning points at the caller's line."""
    results = worlds(2).run(_rank_no_gradients, use_orig_params, backward)
    if backward:
        assert [res["has_grads"] for res in results] == [True, False], "the layout this test needs changed"
    for r, res in enumerate(results):
        ours, theirs = res["distclip"], res["fsdp"]
        assert "error" not in ours, ours
        assert (ours["dtype"], ours["type"]) == (theirs["dtype"], theirs["type"]), (r, ours, theirs)
        assert ours["value"] == pytest.approx(theirs["value"], rel=1e-6), (r, ours, theirs)
        # FSDP's warning points into torch's no_grad decorator; distclip's at the caller's line.
        assert [w[:2] for w in ours["warnings"]] == [w[:2] for w in theirs["warnings"]], (
            f"rank {r}: distclip {ours['warnings']}, FSDP {theirs['warnings']}")
        if not res["has_grads"]:
            (category, text, filename), = ours["warnings"]
            assert category == "UserWarning" and f"on rank {r} with no gradients" in text
            assert filename == __file__, f"the warning points at {filename}, not at the caller"
