"""Rank side of the DeepSpeed tests: real DeepSpeed engines on the CPU accelerator, over the harness's gloo ranks.

Every function here runs on each rank of a ``_world.World`` (the harness pickles them by reference) and returns
plain numbers, so that the test process compares ranks, twins and references. The engines are a tiny MLP with
two parameter groups (ZeRO steps the optimizer once per group), trained on data that differs per rank.
"""

import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Small enough that most steps clip: the gradient norms of this job are around 1 to 10.
MAX_NORM = 0.5


def setup() -> dict:
    """Bring DeepSpeed up on this rank's torch.distributed world (gloo); what the machine supports."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(dist.get_rank())
    os.environ["WORLD_SIZE"] = str(dist.get_world_size())
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend="gloo")
    return {"version": deepspeed.__version__, "fp16": bool(get_accelerator().is_fp16_supported())}


@dataclass
class Job:
    """One engine's run: its config, whether and how distclip is attached, and what to do on the way."""

    stage: int
    dtype: str = "fp32"
    gas: int = 1
    steps: int = 3
    config_clip: float = 0.0  # the config's gradient_clipping
    attach: dict | None = None  # attach(engine, **attach) before the first step; None: DeepSpeed's own clipping
    detach_after: int | None = None  # detach after this many optimizer steps
    reattach: dict | None = None  # attach(engine, **reattach) right after that detach
    fp32_accumulation: bool = False  # bf16 with fp32 gradient accumulation: DeepSpeed's BF16_Optimizer
    initial_scale_power: int = 8  # fp16 dynamic loss scale 2**power; high values overflow on purpose
    nan_at_step: int | None = None  # feed NaN inputs at this optimizer step
    reference_norm_types: tuple = (2.0,)


@dataclass
class Record:
    """What one rank saw: per optimizer step, the norms reported and the float64 references."""

    optimizer: str = ""
    last_norm: list = field(default_factory=list)  # handle.last_norm after each optimizer step
    engine_norm: list = field(default_factory=list)  # engine.get_global_grad_norm() after each optimizer step
    reference: list = field(default_factory=list)  # {p: float64 norm of the full averaged unscaled gradient}
    unchanged_between_boundaries: bool = True  # last_norm kept its value across every non-boundary step()
    skipped_steps: int = 0
    params: list = field(default_factory=list)  # full fp32 parameters after the run, float64 values
    restored: dict = field(default_factory=dict)  # after detach: is the engine as DeepSpeed built it?


def _config(job: Job) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": job.gas,
        "gradient_clipping": job.config_clip,
        "zero_optimization": {"stage": job.stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if job.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    if job.dtype == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": job.initial_scale_power, "hysteresis": 1}
    if job.fp32_accumulation:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def make_engine(job: Job, extra_config: dict | None = None):
    """A fresh engine for ``job``: the same initial weights on every rank and in every call."""
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    groups = [
        {"params": [model[0].weight, model[2].weight], "weight_decay": 0.01},
        {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=0.01)
    config = {**_config(job), **(extra_config or {})}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def train(job: Job) -> dict:
    """Run ``job`` on this rank and return its :class:`Record` as a dict."""
    from distclip.integrations import deepspeed as integration

    engine = make_engine(job)
    record = Record(optimizer=type(engine.optimizer).__name__)
    handle = integration.attach(engine, **job.attach) if job.attach is not None else None
    data = torch.Generator().manual_seed(1000 + dist.get_rank())
    for step in range(job.steps):
        for micro in range(job.gas):
            x = torch.randn(4, 6, generator=data)
            if job.nan_at_step == step:
                x[0, 0] = math.nan
            loss = engine(x.to(DTYPES[job.dtype])).float().pow(2).sum() * 4
            engine.backward(loss)
            boundary = micro == job.gas - 1
            if boundary:
                record.reference.append(_reference_norms(engine, job))
            before = handle.last_norm if handle is not None else None
            engine.step()
            if not boundary and handle is not None:
                record.unchanged_between_boundaries &= handle.last_norm is before
        record.engine_norm.append(_number(engine.get_global_grad_norm()))
        record.last_norm.append(_number(handle.last_norm) if handle is not None else None)
        if job.detach_after == step + 1:
            handle.detach()
            record.restored = _as_built(engine)
            handle = integration.attach(engine, **job.reattach) if job.reattach is not None else None
    record.skipped_steps = engine.skipped_steps
    record.params = _full_params(engine)
    return asdict(record)


def _reference_norms(engine, job: Job) -> dict:
    """The p-norms, in float64, of the full gradient averaged over the ranks, unscaled: what clipping is about."""
    from deepspeed.utils import safe_get_full_grad

    grads = torch.cat([safe_get_full_grad(p).double().flatten() for p in engine.module.parameters()])
    if job.dtype == "fp16":  # ZeRO's gradients still carry the loss scale before step()
        grads /= engine.optimizer.loss_scale
    return {str(p): torch.linalg.vector_norm(grads, p).item() for p in job.reference_norm_types}


def _full_params(engine) -> list:
    """The full fp32 parameters (ZeRO's fp32 master copy where there is one), as nested float64 lists."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = []
    for p in engine.module.parameters():
        full = safe_get_full_fp32_param(p)
        params.append((p.detach() if full is None else full).double().tolist())
    return params


def _as_built(engine) -> dict:
    """Whether detach() left the engine as DeepSpeed built it: no overrides, no hooks, clip_grad as configured."""
    optimizer = engine.optimizer
    return {
        "no_instance_overrides": not {"step", "scaled_global_norm", "_get_norm_groups"} & set(vars(optimizer))
        and "clip_fp32_gradients" not in vars(engine),
        "no_step_hooks": not engine.basic_optimizer._optimizer_step_pre_hooks,
        "clip_grad": getattr(optimizer, "clip_grad", engine.gradient_clipping()),
    }


def _number(norm) -> float | None:
    return None if norm is None else float(norm)


def attach_errors() -> dict:
    """The errors attach() raises for what it must refuse, as {case: "ExceptionType: message"}."""
    from deepspeed.accelerator import get_accelerator

    from distclip.integrations import deepspeed as integration

    errors = {}

    def expect(case, fn):
        try:
            fn()
        except Exception as err:
            errors[case] = f"{type(err).__name__}: {err}"
        else:
            errors[case] = "no error"

    engine = make_engine(Job(stage=2))
    for p in (0, -1.0, "-inf", "nan"):
        expect(f"norm_type={p}", lambda p=p: integration.attach(engine, 1.0, norm_type=p))
    expect("max_norm=-1", lambda: integration.attach(engine, -1.0))
    handle = integration.attach(engine, 1.0)
    expect("attached twice", lambda: integration.attach(engine, 1.0))
    handle.detach()
    expect("again after detach", lambda: integration.attach(engine, 1.0).detach())
    offload = {
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "zero_force_ds_cpu_optimizer": False,
    }
    expect("optimizer offload", lambda: integration.attach(make_engine(Job(stage=2), offload), 1.0))
    if get_accelerator().is_fp16_supported():
        expect("stage 0 fp16", lambda: integration.attach(make_engine(Job(stage=0, dtype="fp16")), 1.0))
    for version in ("0.19.7", "0.20.0", "1.0.0", "unknown"):
        expect(f"version {version}", lambda v=version: integration._check_version(v))
    expect("version 0.19.8", lambda: integration._check_version("0.19.8"))
    return errors
