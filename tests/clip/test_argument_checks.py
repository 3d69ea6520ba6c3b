"""Bad input is refused where it is given, with an error that names the argument, its value and what to pass:
at the call for the functional API, at construction for ``GradClipper``, the policies and DeepSpeed's
``attach``, all from the one argument-check module; and what the docs say of the policies' edge cases holds.

Multi-process cases run in real processes: a 2-rank gloo world (the ``worlds`` harness) and fresh interpreters
for the launch environment.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import distclip

INF, NAN = math.inf, math.nan
REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 120


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model(torch.randn(5, 4)).square().sum().backward()
    return model


# ---- group.WORLD before init_process_group ------------------------------------------------------------------

_BEFORE_INIT = """
import torch, torch.distributed as dist, distclip
p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.full((3,), 2.0)
calls = {
    "clip_grad_norm_": lambda: distclip.clip_grad_norm_([p], 1.0, group=dist.group.WORLD),
    "get_total_norm": lambda: distclip.get_total_norm([p.grad], group=dist.group.WORLD),
    "GradClipper": lambda: distclip.GradClipper([p], 1.0, group=dist.group.WORLD),
    "default": lambda: distclip.clip_grad_norm_([p], 100.0),
}
for name, call in calls.items():
    try:
        call()
        print(name, "ok")
    except RuntimeError as err:
        print(name, "RuntimeError", err)
"""


@pytest.mark.parametrize("world_size", ["2", None])
def test_group_world_before_init_process_group(world_size):
    """``group.WORLD`` reads ``None`` before ``init_process_group()``: in a process launched as one of
    several ranks that must raise, not clip this rank's shard by its local norm; a single process (no
    ``WORLD_SIZE``) holds the whole vector, so it clips; leaving ``group=`` out is torch's local clip always."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if world_size:
        env.update(WORLD_SIZE=world_size, RANK="0", LOCAL_RANK="0")
    result = subprocess.run([sys.executable, "-c", _BEFORE_INIT], capture_output=True, text=True, env=env,
                            timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["default"] == "ok"
    for name in ("clip_grad_norm_", "get_total_norm", "GradClipper"):
        if world_size:
            assert lines[name].startswith("RuntimeError distclip: group=None in a process launched as one of "
                                          "WORLD_SIZE=2 ranks"), (name, lines[name])
            assert "init_process_group()" in lines[name]
        else:
            assert lines[name] == "ok", (name, lines[name])


# ---- GradClipper and the policies: checked at construction ---------------------------------------------------


def test_gradclipper_inputs_are_checked_at_construction():
    model = _model()
    params = list(model.parameters())
    cases = [
        (lambda: distclip.GradClipper(model, 1.0, scaler="yes"), TypeError, "scaler must be a torch.amp.GradScaler"),
        (lambda: distclip.GradClipper(model, 1.0, optimizer=42), TypeError, "optimizer must be a torch.optim.Optimizer"),
        (lambda: distclip.GradClipper("model", 1.0), TypeError, "target must be a torch.nn.Module"),
        (lambda: distclip.GradClipper([params[0], "w"], 1.0), TypeError, "its element 1 is 'w' of type str"),
        (lambda: distclip.GradClipper(model, 1.0, norm_type=0), ValueError, "norm_type=0 has no sharded meaning"),
        (lambda: distclip.GradClipper(params, 1.0, norm_type=-2.0), ValueError, "norm_type=-2.0"),
        (lambda: distclip.GradClipper(params, 1.0, group="world"), RuntimeError, "not initialized"),
        (lambda: distclip.GradClipper(model, 1.0, norms="layer"), ValueError, "GradClipper norms must be one of"),
        (lambda: distclip.GradClipper(model, 1.0, nonfinite="ignore"), ValueError, "nonfinite must be one of"),
    ]
    for make, error, text in cases:
        with pytest.raises(error, match="distclip") as caught:
            make()
        assert text in str(caught.value), (text, str(caught.value))
    # What a torch optimizer is, duck-typed: anything with step() and param_groups passes.
    distclip.GradClipper(model, 1.0, optimizer=torch.optim.SGD(params, lr=0.1))


def test_load_state_dict_names_what_it_needs():
    clipper = distclip.GradClipper(_model(), 1.0, policy=distclip.ZClip())
    for bad in ({}, {"counters": {}}, [1, 2]):
        with pytest.raises(ValueError, match=r"GradClipper.state_dict\(\) returned.*'counters', 'policies'"):
            clipper.load_state_dict(bad)
    clipper.load_state_dict(clipper.state_dict())


@pytest.mark.parametrize("make, name, value", [
    (lambda: distclip.ZClip(alpha=5), "alpha", "5"),
    (lambda: distclip.ZClip(z_threshold=0), "z_threshold", "0"),
    (lambda: distclip.ZClip(warmup_steps=0), "warmup_steps", "0"),
    (lambda: distclip.AutoClip(percentile=0), "percentile", "0"),
    (lambda: distclip.AutoClip(min_exponent=3, max_exponent=3), "max_exponent", "3"),
    (lambda: distclip.SpikeSkip(window=4, min_history=5), "min_history", "5"),
    (lambda: distclip.SpikeSkip(sigma=-1), "sigma", "-1"),
    (lambda: distclip.AGC(clipping=0), "clipping", "0"),
    (lambda: distclip.AGC(eps=-1), "eps", "-1"),
])
def test_a_policy_error_names_the_argument_and_its_value(make, name, value):
    with pytest.raises(ValueError) as caught:
        make()
    assert f"{name}={value}" in str(caught.value), str(caught.value)
    assert f" {name} must be " in str(caught.value), str(caught.value)


def _rank_entry_point_errors(bad):
    """The message each entry point gives for the same bad arguments: the functional API in sharded mode,
    GradClipper on this rank's parameters over the world, and DeepSpeed's attach (before it reads the engine)."""
    from distclip.integrations import deepspeed

    p = nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    calls = {
        "clip_grad_norm_": lambda: distclip.clip_grad_norm_([p], group=dist.group.WORLD, **bad),
        "GradClipper": lambda: distclip.GradClipper([p], group=dist.group.WORLD, **bad),
        "attach": lambda: deepspeed.attach(object(), **bad),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    return messages


@pytest.mark.parametrize("bad", [dict(max_norm=-1.0), dict(max_norm=NAN), dict(max_norm=1.0, norm_type=0),
                                 dict(max_norm=1.0, norm_type=-1.0)])
def test_every_entry_point_refuses_the_same_arguments_with_the_same_words(worlds, bad):
    pytest.importorskip("deepspeed")
    for messages in worlds(2).run(_rank_entry_point_errors, bad):
        assert messages["clip_grad_norm_"] == messages["GradClipper"] is not None, messages
        assert messages["attach"] is not None, messages
        if "norm_type" not in bad:
            assert messages["attach"] == messages["clip_grad_norm_"], messages


# ---- GradClipper's non-finite "propagate", as the docs state it --------------------------------------------


@pytest.mark.parametrize("max_norm", [1.0, INF])
@pytest.mark.parametrize("policy", [None, "zclip"])
def test_propagate_with_an_inf_norm_is_torchs_and_the_docs_say_so(max_norm, policy):
    """One inf element: torch's clip makes every finite element 0 under a finite max_norm and every element NaN
    under max_norm=inf (inf / inf). The clipper does the same, with or without a policy deciding alone, and
    both the docstring and docs/clipper.md say it."""
    model, reference = _model(), _model()
    for m in (model, reference):
        with torch.no_grad():
            m[0].weight.grad[0, 0] = INF
    torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    policies = [distclip.ZClip(warmup_steps=1)] if policy else None
    report = distclip.GradClipper(model, max_norm, policy=policies).clip_()
    assert math.isinf(float(report.norm))
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours.grad.isnan(), theirs.grad.isnan()), (max_norm, ours.grad, theirs.grad)
        finite = ~theirs.grad.isnan()
        assert torch.equal(ours.grad[finite], theirs.grad[finite])
    if max_norm == INF:
        assert all(p.grad.isnan().all() for p in model.parameters())
    else:
        assert all((p.grad.isnan() | (p.grad == 0)).all() for p in model.parameters())
    text = " ".join((REPO / "docs" / "clipper.md").read_text().split())
    assert "every gradient NaN when it is infinite: with `max_norm=inf`" in text
    assert "and every gradient NaN under an infinite one (``max_norm=inf``" in " ".join(
        distclip.GradClipper.__doc__.split())


# ---- AGC's norm_type ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [1.0, 3.0, INF, -INF])
def test_agc_refuses_a_norm_type_its_unit_norms_do_not_have(norm_type):
    with pytest.raises(ValueError, match=rf"AGC's unit norms are 2-norms.*norm_type={norm_type!r}"):
        distclip.GradClipper(_model(), 1.0, norm_type, policy=distclip.AGC())
    distclip.GradClipper(_model(), 1.0, 2, policy=distclip.AGC())
    assert "takes `norm_type=2` only" in " ".join((REPO / "docs" / "clipper.md").read_text().split())


# ---- AutoClip against the paper's numpy.percentile ---------------------------------------------------------


@pytest.mark.parametrize("q", [10.0, 50.0, 90.0])
def test_autoclip_is_within_the_stated_distance_of_numpy_percentile(q):
    """The bound docs/clipper.md states: with P = numpy.percentile(history, q) between the order statistics
    x_(j+1) and x_(j+2), j = floor((n - 1) q / 100), the threshold T has
    x_(j+1) / x_(j+2) <= T / P < 2^(1/bins) x_(j+2) / x_(j+1). Checked on short and long histories."""
    rng = np.random.default_rng(int(q))
    for n in [1, 2, 3, 5, 8, 13, 40, 300]:
        history = np.exp(rng.normal(0.0, 1.0, size=n))
        policy = distclip.AutoClip(percentile=q)
        for g in history:
            threshold = float(policy.decide(torch.tensor(g, dtype=torch.float64)))
        ordered = np.sort(history)
        j = math.floor((n - 1) * q / 100)
        low, high = ordered[j], ordered[min(j + 1, n - 1)]
        ratio = threshold / np.percentile(history, q)
        assert low / high * (1 - 1e-12) <= ratio < 2 ** (1 / policy.bins_per_octave) * high / low * (1 + 1e-12), (
            n, ratio, low, high)
    text = " ".join((REPO / "docs" / "clipper.md").read_text().split())
    assert "`x_(j+1) / x_(j+2) <= T / P < 2^(1/bins_per_octave) * x_(j+2) / x_(j+1)`" in text
