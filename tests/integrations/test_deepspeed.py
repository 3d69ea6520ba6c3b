"""``distclip.integrations.deepspeed.attach`` on real DeepSpeed engines: 2 gloo ranks, DeepSpeed's CPU accelerator.

Each case trains a tiny engine for a few optimizer steps on every rank of one world of 2 processes, made for
this module (DeepSpeed keeps global state per process, so these ranks serve no other test module) and torn
down at its end. What the ranks saw comes back as numbers (``_deepspeed_ranks.Record``) and is compared here:
with a twin engine that clips by DeepSpeed's own ``gradient_clipping``, with float64 norms of the full averaged
gradient that ``deepspeed.utils.safe_get_full_grad`` returns, and between the ranks. Nothing is mocked.
"""

import importlib.util
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from _deepspeed_ranks import MAX_NORM, Job, attach_errors, setup, train
from _world import World, _free_port

REPO = Path(__file__).resolve().parents[2]
REL = 1e-5
# Parameters after a few AdamW steps: fp32 master copies agree to float32 rounding of the clip coefficient.
PARAM_ATOL = 1e-6
# Stage 0 bf16 keeps no fp32 master copy DeepSpeed exposes: the model's bf16 parameters, one bf16 step apart.
PARAM_ATOL_BF16 = 2**-7
STAGES = [0, 1, 2, 3]
# The ZeRO stage / precision combinations and the DeepSpeed optimizer wrapper each one runs through.
PRECISIONS = [
    pytest.param(0, "fp32", False, "AdamW", id="stage0-fp32"),
    pytest.param(0, "bf16", False, "FP16_UnfusedOptimizer", id="stage0-bf16"),
    *[
        pytest.param(s, d, False, "DeepSpeedZeroOptimizer", id=f"stage{s}-{d}")
        for s in (1, 2)
        for d in ("fp32", "bf16", "fp16")
    ],
    pytest.param(1, "bf16", True, "BF16_Optimizer", id="stage1-bf16-fp32accumulation"),
    *[pytest.param(3, d, False, "DeepSpeedZeroOptimizer_Stage3", id=f"stage3-{d}") for d in ("fp32", "bf16", "fp16")],
]
TIMEOUT_S = 120  # per world.run: engines here take well under a second; the first call imports DeepSpeed

requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason='DeepSpeed is not installed: pip install "distclip[deepspeed]"',
)


@dataclass
class Ranks:
    """A world of 2 gloo ranks with DeepSpeed initialised, and whether its CPU accelerator has fp16 here."""

    world: World
    fp16: bool

    def train(self, job: Job) -> list[dict]:
        """``job`` on both ranks; fp16 jobs skip where DeepSpeed's CPU accelerator has no fp16."""
        if job.dtype == "fp16" and not self.fp16:
            pytest.skip("DeepSpeed's CPU accelerator reports no fp16 on this CPU (it needs AVX512-FP16 or AMX)")
        return self.world.run(train, job, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def ranks():
    world = World(2)
    try:
        # The first call may build DeepSpeed's CPU communication op (a one-off C++ compile, cached afterwards).
        yield Ranks(world, fp16=world.run(setup, timeout=300)[0]["fp16"])
    finally:
        world.close()


def assert_close(actual: float, expected: float, what: str) -> None:
    assert math.isclose(actual, expected, rel_tol=REL), f"{what}: {actual!r} != {expected!r} (rel {REL})"


def assert_same_on_ranks(records: list[dict]) -> None:
    assert records[0]["last_norm"] == records[1]["last_norm"], "ranks report different norms"
    assert records[0]["params"] == records[1]["params"], "ranks hold different parameters"


def assert_params_close(got: list, want: list, atol: float) -> None:
    flat_got, flat_want = _flatten(got), _flatten(want)
    worst = max(abs(a - b) for a, b in zip(flat_got, flat_want, strict=True))
    assert worst <= atol, f"parameters differ by up to {worst:.3g} (> {atol:.3g})"


def _flatten(values) -> list[float]:
    if isinstance(values, list):
        return [x for v in values for x in _flatten(v)]
    return [values]


def assert_matches_twin(attached: list[dict], twin: list[dict], atol: float) -> None:
    """``attached`` (distclip, norm type 2) clipped as ``twin`` (DeepSpeed's ``gradient_clipping``) did."""
    assert_same_on_ranks(attached)
    mine, theirs = attached[0], twin[0]
    assert len(mine["last_norm"]) == len(theirs["reference"])
    for step, (norm, reported, ref, their_ref, their_norm) in enumerate(
        zip(mine["last_norm"], mine["engine_norm"], mine["reference"], theirs["reference"], theirs["engine_norm"])
    ):
        assert reported == norm, f"step {step}: get_global_grad_norm() {reported} != last_norm {norm}"
        assert_close(norm, ref["2.0"], f"step {step}: last_norm vs float64 norm of the averaged gradient")
        # DeepSpeed reports no norm for stage 0 fp32 (its clip discards it): compare with its gradient's norm.
        assert_close(norm, their_ref["2.0"] if their_norm is None else their_norm, f"step {step}: vs the twin")
    assert any(ref["2.0"] > MAX_NORM for ref in mine["reference"]), "no step clipped: the test proves nothing"
    assert_params_close(mine["params"], theirs["params"], atol)


@requires_deepspeed
@pytest.mark.parametrize("stage, dtype, fp32_accumulation, optimizer", PRECISIONS)
def test_attached_engine_clips_as_deepspeed_does(ranks, stage, dtype, fp32_accumulation, optimizer):
    # The attached engine's config clips at a different value: if DeepSpeed's clip also ran, the twins would part.
    common = dict(stage=stage, dtype=dtype, fp32_accumulation=fp32_accumulation)
    twin = ranks.train(Job(**common, config_clip=MAX_NORM))
    attached = ranks.train(Job(**common, config_clip=MAX_NORM / 10, attach=dict(max_norm=MAX_NORM)))
    assert attached[0]["optimizer"] == optimizer
    atol = PARAM_ATOL_BF16 if (stage, dtype) == (0, "bf16") else PARAM_ATOL
    assert_matches_twin(attached, twin, atol)


@requires_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_gradient_accumulation_clips_at_the_boundary_only(ranks, stage):
    twin = ranks.train(Job(stage=stage, gas=2, config_clip=MAX_NORM))
    attached = ranks.train(Job(stage=stage, gas=2, attach=dict(max_norm=MAX_NORM)))
    assert_matches_twin(attached, twin, PARAM_ATOL)
    assert all(r["unchanged_between_boundaries"] for r in attached), "a non-boundary step() changed last_norm"


@requires_deepspeed
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("norm_type", [math.inf, 3.0, 0.5])
def test_norm_types_deepspeed_lacks(ranks, stage, norm_type):
    """inf: the float64 max-abs of the full averaged gradient; any p > 0 likewise, on every stage."""
    job = Job(stage=stage, attach=dict(max_norm=MAX_NORM, norm_type=norm_type), reference_norm_types=(norm_type,))
    records = ranks.train(job)
    assert_same_on_ranks(records)
    for step, (norm, reported, ref) in enumerate(
        zip(records[0]["last_norm"], records[0]["engine_norm"], records[0]["reference"])
    ):
        assert reported == norm, f"step {step}: get_global_grad_norm() {reported} != last_norm {norm}"
        assert_close(norm, ref[str(norm_type)], f"step {step}: p={norm_type} norm vs float64 reference")


@requires_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_detach_gives_deepspeed_its_clipping_back(ranks, stage):
    # Both engines clip step 1 by distclip's inf norm at a small max_norm and detach. Then one runs on by itself,
    # the other attached with norm type 2 at the config's max_norm, which is DeepSpeed's own clipping: if detach
    # left anything of the first attach in place, or DeepSpeed's clipping did not come back, they would part.
    first = dict(max_norm=MAX_NORM / 5, norm_type=math.inf)
    detached = ranks.train(Job(stage=stage, config_clip=MAX_NORM, attach=first, detach_after=1))
    reattached = ranks.train(
        Job(stage=stage, config_clip=MAX_NORM, attach=first, detach_after=1, reattach=dict(max_norm=MAX_NORM))
    )
    restored = detached[0]["restored"]
    assert restored == {"no_instance_overrides": True, "no_step_hooks": True, "clip_grad": MAX_NORM}
    assert_params_close(detached[0]["params"], reattached[0]["params"], PARAM_ATOL)
    # DeepSpeed's own norm is back: the L2 norm, not the inf norm distclip reported at step 1; on stage 0 fp32
    # DeepSpeed reports none.
    for step in (1, 2):
        if stage == 0:
            assert detached[0]["engine_norm"][step] is None
        else:
            assert_close(detached[0]["engine_norm"][step], reattached[0]["last_norm"][step], f"step {step}")


@requires_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_overflow_steps_are_skipped_as_deepspeed_skips_them(ranks, stage):
    # A loss scale of 2**16 overflows this job's fp16 gradients; DeepSpeed skips the step and halves the scale,
    # until the gradients fit (after 4 steps here).
    common = dict(stage=stage, dtype="fp16", steps=8, initial_scale_power=16)
    twin = ranks.train(Job(**common, config_clip=MAX_NORM))
    attached = ranks.train(Job(**common, attach=dict(max_norm=MAX_NORM)))
    skipped = attached[0]["skipped_steps"]
    assert 0 < skipped < 8 and skipped == twin[0]["skipped_steps"]
    norms = attached[0]["last_norm"]
    assert norms[:skipped] == [math.inf] * skipped, "a skipped step must report inf, as DeepSpeed does"
    assert attached[0]["engine_norm"] == norms
    for step in range(skipped, 8):
        assert_close(norms[step], twin[0]["engine_norm"][step], f"step {step}: vs the twin")
    assert_params_close(attached[0]["params"], twin[0]["params"], PARAM_ATOL)


@requires_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_error_if_nonfinite_raises_on_every_rank(ranks, stage):
    job = Job(stage=stage, nan_at_step=1, attach=dict(max_norm=MAX_NORM, error_if_nonfinite=True))
    outcomes = ranks.world.outcomes(train, job, timeout=TIMEOUT_S)
    for rank, outcome in enumerate(outcomes):
        assert isinstance(outcome, RuntimeError) and "non-finite" in str(outcome), f"rank {rank}: {outcome!r}"


@requires_deepspeed
def test_attach_refuses_what_it_cannot_clip_correctly(ranks):
    errors = ranks.world.run(attach_errors, timeout=TIMEOUT_S)[0]
    for p in ("0", "-1.0", "-inf", "nan"):
        assert errors[f"norm_type={p}"].startswith("ValueError: distclip: norm_type="), errors
    assert errors["max_norm=-1"].startswith("ValueError: distclip: max_norm"), errors
    assert errors["attached twice"].startswith("RuntimeError: distclip: this engine is already attached"), errors
    assert errors["again after detach"] == "no error"
    offload = errors["optimizer offload"]
    assert offload.startswith("NotImplementedError") and "does not support optimizer offload" in offload, offload
    if "stage 0 fp16" in errors:
        assert errors["stage 0 fp16"].startswith("NotImplementedError") and "#8393" in errors["stage 0 fp16"]
    for version in ("0.19.7", "0.20.0", "1.0.0", "unknown"):
        tested = "ImportError: distclip.integrations.deepspeed was tested with DeepSpeed >=0.19.8,<0.20"
        assert errors[f"version {version}"].startswith(tested), errors
    assert errors["version 0.19.8"] == "no error"


def test_import_and_attach_without_deepspeed():
    # In a fresh interpreter where `import deepspeed` fails, as where it is not installed.
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "import distclip, distclip.integrations.deepspeed as integration\n"
        "try:\n"
        "    integration.attach(object(), 1.0)\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'distclip.integrations.deepspeed needs DeepSpeed: pip install "distclip[deepspeed]"'


@requires_deepspeed
def test_launcher_example_runs_on_two_cpu_processes():
    # launch/deepspeed/run.sh as a user runs it: the DeepSpeed launcher, 2 CPU processes, ZeRO 2, 5 steps.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["MASTER_PORT"] = str(_free_port())
    result = subprocess.run(
        ["bash", "launch/deepspeed/run.sh"], capture_output=True, text=True, timeout=240, env=env, cwd=REPO
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    steps = re.findall(r"^step (\d)/5  norm \S+  ref \S+  rel\.err \S+  OK$", result.stdout, re.MULTILINE)
    assert steps == ["1", "2", "3", "4", "5"], output
    summary = "distclip deepspeed example: 5/5 steps OK (2 ranks, ZeRO stage 2, gloo, norm_type=2.0)"
    assert summary in result.stdout.splitlines(), output
    # docs/deepspeed.md shows this run's output: the lines it shows are the lines printed.
    from test_docs import REPO as DOCS_REPO, missing_lines, shown_output

    shown = shown_output(DOCS_REPO / "docs" / "deepspeed.md", "launch/deepspeed/run.sh")
    assert shown is not None and summary in shown, shown
    missing = missing_lines(shown, result.stdout)
    assert not missing, f"docs/deepspeed.md shows lines not printed: {missing}\n{output}"
