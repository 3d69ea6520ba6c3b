"""The bench's workloads (gradient shapes), their gradients laid out as each sharded layout (views, separate,
aligned) holds them, and the FSDP1 and FSDP2 models of the same shapes."""

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

WORKLOADS = ("gpt2", "small", "tiny", "huge", "llama")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# How a rank's gradient pieces lie in memory in the sharded runs (see `share` and `fsdp2_model`).
LAYOUTS = ("views", "separate", "aligned", "fsdp2")
# Workloads that are models (for the FSDP1 target: "bf16 models").
MODEL_WORKLOADS = ("gpt2", "llama")
_SCALE = 1e-3  # gradients are N(0, 1e-3): every element a normal float, far from overflow and from denormals
MAX_NORM = 1e-2  # below every workload's first norm, so the first call clips (coef < 1)


@dataclass(frozen=True)
class Workload:
    """A list of gradient shapes; ``blocks``: index ranges that FSDP1 wraps as units of their own (layers)."""

    name: str
    title: str
    shapes: tuple[tuple[int, ...], ...]
    blocks: tuple[tuple[int, int], ...] = ()

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * itemsize(dtype)


def workload(name: str, quick: bool = False, seed: int = 0) -> Workload:
    """The workload ``name`` (see `WORKLOADS`); ``quick``: the same structure, far fewer elements."""
    if name == "gpt2":
        if quick:
            return _gpt2(vocab=2048, ctx=256, d=96, layers=12, title="GPT-2 small structure (quick sizes)")
        return _gpt2(vocab=50257, ctx=1024, d=768, layers=12, title="GPT-2 small")
    if name == "small":
        count = 200 if quick else 2000
        sizes = torch.randint(1024, 16384 + 1, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
        return Workload("small", f"{count} small tensors (1K-16K elements)", tuple((n,) for n in sizes))
    if name == "tiny":
        count = 200 if quick else 2000
        return Workload("tiny", f"{count} tiny tensors (16 elements)", ((16,),) * count)
    if name == "huge":
        n = (1 << 20) if quick else (64 << 20)
        return Workload("huge", f"one huge tensor ({n >> 20}M elements)", ((n,),))
    if name == "llama":
        if quick:
            return _llama(dim=128, hidden=352, layers=2, vocab=1000, title="Llama-style stack (quick sizes)")
        return _llama(dim=2048, hidden=5632, layers=4, vocab=32000, title="Llama-style stack (dim 2048, 4 layers)")
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def _gpt2(vocab: int, ctx: int, d: int, layers: int, title: str) -> Workload:
    """GPT-2's 148 tensors (12 layers): wte, wpe, per layer ln_1 w/b, attn.c_attn w/b, attn.c_proj w/b,
    ln_2 w/b, mlp.c_fc w/b, mlp.c_proj w/b; ln_f w/b."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    blocks = []
    for _ in range(layers):
        start = len(shapes)
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
        blocks.append((start, len(shapes)))
    shapes += [(d,), (d,)]
    return Workload("gpt2", title, tuple(shapes), tuple(blocks))


def _llama(dim: int, hidden: int, layers: int, vocab: int, title: str) -> Workload:
    """Embedding; per layer wq, wk, wv, wo (dim x dim), w1, w3 (dim x hidden), w2 (hidden x dim), two norms;
    final norm; output (vocab x dim)."""
    shapes: list[tuple[int, ...]] = [(vocab, dim)]
    blocks = []
    for _ in range(layers):
        start = len(shapes)
        shapes += [(dim, dim)] * 4 + [(dim, hidden), (dim, hidden), (hidden, dim), (dim,), (dim,)]
        blocks.append((start, len(shapes)))
    shapes += [(dim,), (vocab, dim)]
    return Workload("llama", title, tuple(shapes), tuple(blocks))


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def p_value(norm_type: str) -> float:
    return float(norm_type)


def p_name(p: float) -> str:
    return "inf" if p == math.inf else ("-inf" if p == -math.inf else f"{p:g}")


# --------------------------------------------------------------------------------------------------- tensors


class Pool:
    """A 1 Mi-element block of N(0, _SCALE) values, copied cyclically into gradients: filling gigabytes at
    memory speed instead of at the random generator's speed (norms do not care that values repeat)."""

    def __init__(self, seed: int):
        self.values = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed)).mul_(_SCALE)
        self.offset = 0

    def fill_(self, tensor: Tensor) -> Tensor:
        flat = tensor.view(-1)
        n, size = flat.numel(), self.values.numel()
        done = 0
        while done < n:
            start = self.offset % size
            take = min(n - done, size - start)
            flat[done:done + take].copy_(self.values[start:start + take])
            done += take
            self.offset += take + 7919  # a different phase for the next tensor
        return tensor


def leaf(grad: Tensor) -> Tensor:
    """A parameter for ``grad`` that holds no memory of its own: a broadcast 0-d tensor of its shape."""
    param = torch.zeros((), dtype=grad.dtype).expand(grad.shape)
    param.grad = grad
    return param


def gradients(wl: Workload, dtype: torch.dtype, seed: int) -> list[Tensor]:
    """One separately allocated tensor per shape, as a model's ``.grad``s are."""
    pool = Pool(seed)
    return [pool.fill_(torch.empty(shape, dtype=dtype)) for shape in wl.shapes]


@dataclass
class Share:
    """A rank's contiguous 1/N of the workload's flat element range, one tensor per piece, laid out as
    ``layout`` says: ``views``, consecutive views of one buffer (ZeRO partitions, FSDP1 flat shards);
    ``separate``, one allocation per piece (a model's own ``.grad``s); ``aligned``, views of one buffer that
    each start on a 64-byte boundary after a 64-byte gap, so that no two are consecutive (FSDP2 local shards,
    per-parameter ZeRO-3 pieces)."""

    params: list[Tensor]
    numel: int


_ALIGN = 64  # bytes


def share(wl: Workload, dtype: torch.dtype, rank: int, world: int, seed: int, layout: str = "views") -> Share:
    total = wl.numel
    lo, hi = total * rank // world, total * (rank + 1) // world
    sizes, offset = [], 0
    for shape in wl.shapes:
        n = math.prod(shape)
        a, b = max(offset, lo), min(offset + n, hi)
        if a < b:
            sizes.append(b - a)
        offset += n
    pool = Pool(seed + 1 + rank)
    if layout == "separate":
        return Share([leaf(pool.fill_(torch.empty(n, dtype=dtype))) for n in sizes], hi - lo)
    align = _ALIGN // itemsize(dtype)
    starts, end = [], 0
    for n in sizes:
        start = end if layout == "views" else -(-end // align) * align + align
        starts.append(start)
        end = start + n
    buffer = pool.fill_(torch.empty(end, dtype=dtype))
    return Share([leaf(buffer[a:a + n]) for a, n in zip(starts, sizes)], hi - lo)


class _Holder(nn.Module):
    """Parameters of the given shapes (uninitialised: FSDP1 only flattens them; their gradients are set)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype):
        super().__init__()
        self.tensors = nn.ParameterList([nn.Parameter(torch.empty(s, dtype=dtype)) for s in shapes])


def fsdp1_model(wl: Workload, dtype: torch.dtype, seed: int) -> nn.Module:
    """The workload as an FSDP1 model: FULL_SHARD, one unit per block (layer) and one for the other tensors,
    ``use_orig_params=False``; every flat parameter's ``.grad`` (this rank's shard) set at random."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    in_blocks = {i for lo, hi in wl.blocks for i in range(lo, hi)}
    model = nn.Module()
    model.blocks = nn.ModuleList([_Holder(wl.shapes[lo:hi], dtype) for lo, hi in wl.blocks])
    model.rest = _Holder([s for i, s in enumerate(wl.shapes) if i not in in_blocks], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fsdp = FullyShardedDataParallel(
            model,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            auto_wrap_policy=ModuleWrapPolicy({_Holder}),
            device_id=torch.device("cpu"),
            use_orig_params=False,
        )
    pool = Pool(seed + 1000 + dist.get_rank())
    for flat in fsdp.parameters():
        flat.grad = pool.fill_(torch.empty_like(flat))
    fsdp.clip_grad_norm_(MAX_NORM)  # FSDP1's lazy initialisation, outside every measurement
    return fsdp


def fsdp2_model(wl: Workload, dtype: torch.dtype, seed: int) -> nn.Module:
    """The workload as an FSDP2 model: ``fully_shard`` on each block (layer), on the other tensors' holder and
    on the root, over the world; every parameter's ``.grad`` a DTensor laid out as the parameter, its local
    shard (one allocation each, as backward leaves them) set at random."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    in_blocks = {i for lo, hi in wl.blocks for i in range(lo, hi)}
    model = nn.Module()
    model.blocks = nn.ModuleList([_Holder(wl.shapes[lo:hi], dtype) for lo, hi in wl.blocks])
    model.rest = _Holder([s for i, s in enumerate(wl.shapes) if i not in in_blocks], dtype)
    for holder in [*model.blocks, model.rest]:
        fully_shard(holder)
    fully_shard(model)
    pool = Pool(seed + 2000 + dist.get_rank())
    for param in model.parameters():
        local = pool.fill_(torch.empty_like(param.to_local()))
        param.grad = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                        shape=param.shape, stride=param.stride())
    return model
