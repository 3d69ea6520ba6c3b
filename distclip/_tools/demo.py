"""``distclip demo``: clip ZeRO-style sharded gradients over real processes and check every norm.

Every rank trains the same small MLP with SGD on synthetic data. After backward the ranks average their
gradients as one flat vector, then each keeps only its own uneven, contiguous piece of it (cut across parameter
boundaries, as ZeRO and FSDP flat shards are) and clips that piece with
``distclip.clip_grad_norm_(piece, ..., group=WORLD)``. Each step is checked against a float64 reference
computed from the whole, unsharded gradient: the norm, its agreement across ranks, and the scaling applied.
"""

import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.queues import SimpleQueue
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import distclip
from distclip._tools.ports import free_port
from distclip.shutdown import exit_cleanly

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
_COLLECTIVE_TIMEOUT = timedelta(seconds=60)
# The model, the data and the SGD step: small, and scaled so that the default max_norm 1.0 clips.
_IN, _HIDDEN, _OUT = 16, 32, 4
_ROWS_PER_RANK = 32
_LEARNING_RATE = 0.1
# A step is OK if the norm is within this relative error of the float64 reference ...
_NORM_RTOL = 1e-5
# ... and every gradient was scaled by the float64 coefficient, up to float32 rounding: of the coefficient and
# of the product, together at most 2 * 2**-24 (1.2e-7).
_SCALING_RTOL = 2.5e-7
_FLOAT64_TINY = torch.finfo(torch.float64).tiny


@dataclass(frozen=True)
class Config:
    """The command-line options of ``distclip demo``; ``nproc`` is unused under torchrun, which sets the world."""

    nproc: int = 2
    steps: int = 5
    max_norm: float = 1.0
    norm_type: float = 2.0
    backend: str = "gloo"
    seed: int = 0


@dataclass(frozen=True)
class StepCheck:
    """One step's clip next to its float64 reference, and what is wrong with it (nothing: OK)."""

    norm: float
    coefficient: float
    reference: float
    relative_error: float
    problems: tuple[str, ...]

    def line(self, step: int, steps: int) -> str:
        verdict = "OK" if not self.problems else "MISMATCH (" + "; ".join(self.problems) + ")"
        return (
            f"step {step}/{steps}  norm {self.norm:.6e}  coef {self.coefficient:.6f}  "
            f"ref {self.reference:.6e}  rel.err {self.relative_error:.1e}  {verdict}"
        )


@dataclass(frozen=True)
class Sharding:
    """Where the pieces of the flat vector lie: rank r holds ``[cuts[r], cuts[r + 1])``; parameter i is
    ``[param_cuts[i], param_cuts[i + 1])``."""

    cuts: list[int]
    param_cuts: list[int]
    rank: int

    @property
    def sizes(self) -> list[int]:
        return [hi - lo for lo, hi in zip(self.cuts, self.cuts[1:])]

    @property
    def own(self) -> slice:
        return slice(self.cuts[self.rank], self.cuts[self.rank + 1])


def run(config: Config) -> int:
    """Run the demo: as one rank when started by torchrun, else by spawning ``nproc`` ranks on 127.0.0.1.

    Returns the exit status: 0 if every step is OK, 1 on a mismatch or an error in any rank, 2 if
    nccl has fewer GPUs than ranks. A torchrun rank does not return: it leaves with that status through
    `distclip.shutdown.exit_cleanly`, as every spawned rank does.
    """
    if all(name in os.environ for name in _TORCHRUN_VARIABLES):
        return _run_torchrun_rank(config)
    return _spawn(config)


def _run_torchrun_rank(config: Config) -> NoReturn:
    """This process is one rank of a torchrun world: join it through the environment, train, and leave with
    the status (1 with the traceback on an error) without Python's shutdown, where torch 2.13's gloo threads
    can abort a finished rank and with it the torchrun job."""
    try:
        dist.init_process_group(config.backend, init_method="env://", timeout=_COLLECTIVE_TIMEOUT)
        exit_status = _train(config, _device(config.backend, int(os.environ["LOCAL_RANK"])))
    except Exception:  # noqa: BLE001 (any error of the rank: its traceback, and status 1)
        traceback.print_exc()
        exit_status = 1
    exit_cleanly(exit_status)


def _spawn(config: Config) -> int:
    """Spawn ``nproc`` ranks and return rank 0's exit status, or 1 with a one-line message if any rank failed."""
    if config.backend == "nccl" and torch.cuda.device_count() < config.nproc:
        gpus = torch.cuda.device_count()
        fewer = f"--nproc {gpus} or " if gpus else ""
        print(f"distclip demo: nccl needs one GPU per rank: {config.nproc} ranks, {gpus} GPUs; pass {fewer}"
              "--backend gloo", file=sys.stderr)
        return 2
    status = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_spawned_rank, (free_port(), config, status), config.nproc)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        last_line = str(err).strip().splitlines()[-1]  # the exception, after the rank's traceback
        print(f"distclip demo: rank {err.error_index} failed: {last_line}", file=sys.stderr, flush=True)
        return 1
    return status.get()


def _spawned_rank(rank: int, port: int, config: Config, status: SimpleQueue) -> None:
    """One spawned rank: join the world over TCP, train, and (rank 0) report the exit status."""
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group(
        config.backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=config.nproc,
        timeout=_COLLECTIVE_TIMEOUT,
    )
    try:
        exit_status = _train(config, _device(config.backend, rank))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        status.put(exit_status)
    # Leave now rather than through Python's shutdown, where torch 2.13's gloo threads can abort the process
    # (mp.spawn would then report this rank as killed by SIGABRT). An error above is left to mp.spawn to report.
    exit_cleanly(0)


def _device(backend: str, local_rank: int) -> torch.device:
    """The CPU for gloo; for nccl this rank's GPU, made the current one (NCCL collectives run there)."""
    if backend != "nccl":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _train(config: Config, device: torch.device) -> int:
    """Train for ``config.steps`` steps, rank 0 printing each step's check; 0 if every step is OK, else 1.

    Every rank checks the same gathered values, so every rank returns the same status.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(config.seed)
    model = nn.Sequential(
        nn.Linear(_IN, _HIDDEN), nn.Tanh(), nn.Linear(_HIDDEN, _HIDDEN), nn.Tanh(), nn.Linear(_HIDDEN, _OUT)
    ).to(device)
    sharding = _sharding(model, rank, world_size)
    shards = " + ".join(map(str, sharding.sizes))
    _say(rank, f"distclip demo: {world_size} ranks ({config.backend}), an MLP's gradient of {sharding.cuts[-1]} "
               f"values in {len(sharding.param_cuts) - 1} parameters, cut into uneven shards of {shards} values")
    data = torch.Generator().manual_seed(config.seed)  # the same draws, so the same global batches, on every rank
    teacher = torch.randn(_IN, _OUT, generator=data)
    ok_steps = 0
    for step in range(1, config.steps + 1):
        x = torch.randn(_ROWS_PER_RANK * world_size, _IN, generator=data)
        rows = slice(rank * _ROWS_PER_RANK, (rank + 1) * _ROWS_PER_RANK)
        flat_grad = _averaged_gradient(model, x[rows].to(device), (x[rows] @ teacher).to(device))
        check = _clip_check_and_update(model, flat_grad, sharding, config)
        ok_steps += not check.problems
        _say(rank, check.line(step, config.steps))
    _say(rank, f"distclip demo: {ok_steps}/{config.steps} steps OK ({world_size} ranks, {config.backend}, "
               f"norm_type={config.norm_type}, max_norm={config.max_norm})")
    return 0 if ok_steps == config.steps else 1


def _say(rank: int, line: str) -> None:
    if rank == 0:
        print(line, flush=True)


def _sharding(model: nn.Module, rank: int, world_size: int) -> Sharding:
    """Cut the flat parameter vector into one contiguous piece per rank, rank r's share proportional to r + 1:
    uneven on purpose, and blind to parameter boundaries."""
    param_cuts = [0]
    for p in model.parameters():
        param_cuts.append(param_cuts[-1] + p.numel())
    total_share = world_size * (world_size + 1) // 2
    cuts = [param_cuts[-1] * (r * (r + 1) // 2) // total_share for r in range(world_size + 1)]
    return Sharding(cuts, param_cuts, rank)


def _averaged_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The gradient of the mean squared error over the global batch, as one flat vector: this rank's rows
    through backward, then the sum over ranks divided by the world size."""
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    flat_grad = parameters_to_vector(p.grad for p in model.parameters())
    dist.all_reduce(flat_grad)
    return flat_grad.div_(dist.get_world_size())


@torch.no_grad()
def _clip_check_and_update(model: nn.Module, flat_grad: Tensor, sharding: Sharding, config: Config) -> StepCheck:
    """Clip this rank's piece of ``flat_grad`` with distclip, check the clip, take the SGD step on the piece,
    and all-gather the updated pieces into the model."""
    flat_param = parameters_to_vector(model.parameters())
    piece = _piece_tensors(flat_param, flat_grad, sharding)
    before = flat_grad[sharding.own].clone()
    norm = distclip.clip_grad_norm_(piece, config.max_norm, config.norm_type, group=dist.group.WORLD)
    check = _check(
        _all_gather_pieces(before, sharding.sizes),
        _all_gather_pieces(flat_grad[sharding.own], sharding.sizes),
        _all_gather_pieces(norm.reshape(1), [1] * len(sharding.sizes)),
        config,
    )
    for tensor in piece:
        tensor.sub_(_LEARNING_RATE * tensor.grad)
    vector_to_parameters(_all_gather_pieces(flat_param[sharding.own], sharding.sizes), model.parameters())
    return check


def _piece_tensors(flat_param: Tensor, flat_grad: Tensor, sharding: Sharding) -> list[Tensor]:
    """This rank's piece of the flat vector as the leaf tensors a sharded optimizer holds: one per parameter
    the piece overlaps, each a view of ``flat_param`` whose ``.grad`` is the matching view of ``flat_grad``
    (so clipping them clips ``flat_grad``, and updating them updates ``flat_param``)."""
    tensors = []
    for lo, hi in zip(sharding.param_cuts, sharding.param_cuts[1:]):
        a, b = max(lo, sharding.own.start), min(hi, sharding.own.stop)
        if a < b:
            tensor = flat_param[a:b].detach()
            tensor.grad = flat_grad[a:b]
            tensors.append(tensor)
    return tensors


def _all_gather_pieces(piece: Tensor, sizes: list[int]) -> Tensor:
    """The concatenation of every rank's 1-d ``piece`` (rank r's of size ``sizes[r]``), on every rank.

    ``all_gather`` needs pieces of one size, so each is padded to the largest and trimmed after.
    """
    padded = piece.new_zeros(max(sizes))
    padded[: piece.numel()] = piece
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:size] for g, size in zip(gathered, sizes)])


def _check(before: Tensor, after: Tensor, norms: Tensor, config: Config) -> StepCheck:
    """Compare a sharded clip with float64 math on the whole gradient.

    ``before``/``after``: the unsharded gradient before and after the clip; ``norms``: each rank's returned
    norm. The norm must be within ``_NORM_RTOL`` of `_reference_norm` of ``before`` and bitwise the same
    on every rank, and ``after`` must be ``before * min(max_norm / (norm + 1e-6), 1)``, up to float32 rounding
    (and underflow: differences below the smallest normal float32 are not errors of the coefficient).
    """
    norm = norms[0].item()
    reference = _reference_norm(before, config.norm_type)
    relative_error = 0.0 if norm == reference else abs(norm - reference) / max(abs(reference), _FLOAT64_TINY)
    coefficient = min(config.max_norm / (norm + 1e-6), 1.0)
    problems = []
    if not relative_error <= _NORM_RTOL:
        problems.append(f"norm off by more than {_NORM_RTOL:g}")
    if not torch.equal(norms, norms[:1].expand_as(norms)):
        problems.append("ranks returned different norms: " + ", ".join(f"{n:.17g}" for n in norms.tolist()))
    expected = before.double() * coefficient
    if not torch.allclose(after.double(), expected, rtol=_SCALING_RTOL, atol=torch.finfo(after.dtype).tiny):
        problems.append("gradients not scaled by the coefficient")
    return StepCheck(norm, coefficient, reference, relative_error, tuple(problems))


def _reference_norm(gradient: Tensor, p: float) -> float:
    """The p-norm of ``gradient`` in float64 on one process, for inf/-inf the max/min of ``|g|``.

    Taken as ``m * ||g / m||_p`` with ``m = max |g|``: for a large p every ``|g| ** p`` of a gradient below 1
    would underflow to 0, and the unscaled norm with it.
    """
    g = gradient.double()
    m = g.abs().amax().clamp(min=_FLOAT64_TINY)
    return (m * torch.linalg.vector_norm(g / m, p)).item()
