"""Seeded models, batches and float64 references for the layout tests (``tests/clip/test_layout_*.py``).

Every model is built from a seed alone (its parameters are drawn from a private ``torch.Generator``), so the
gloo ranks and the test process build bitwise the same initial model, in float32 on the ranks and in float64
for the reference. The reference of a layout is computed in the test process, from the unwrapped float64
model and every rank's batch: the true gradient of the whole model, whatever the ranks hold of it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

INF = math.inf
# The float32 gradients of a job against the float64 model's: float32 rounding of values around 1.
MODEL_ATOL = 1e-6
# The mesh dimensions of HSDP (FSDP1's hybrid strategies, FSDP2 on a 2-D mesh): replicate over dim 0, shard on 1.
HSDP_MESH_DIMS = ("replicate", "shard")


def init_from_seed(module: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    """``module`` in ``dtype`` with every parameter drawn from ``randn(seed) * 0.5`` in registration order."""
    gen = torch.Generator().manual_seed(seed)
    module = module.to(dtype)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * 0.5)
    return module


# --------------------------------------------------------------------------------------------------------
# TinyNet: the model of the FSDP1, FSDP2 and DDP layouts.
# --------------------------------------------------------------------------------------------------------

TINY_SEED = 11


class TinyNet(nn.Module):
    """``head(body(x))``. Its Linear layers have 7, 3 and 2 output rows: sharded over 4 ranks along dim 0
    (FSDP2), the 3- and 2-row ones leave some rank an empty local shard; flattened (FSDP1), no unit divides
    evenly over 2 or 4 ranks, so there is padding. ``head`` is what the tests leave outside FSDP."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh())
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.body(x))


def tiny_net(dtype=torch.float32) -> TinyNet:
    return init_from_seed(TinyNet(), TINY_SEED, dtype)


def tiny_batch(index: int, dtype=torch.float32) -> torch.Tensor:
    """The input of data-parallel replica ``index`` (rank ``index`` unless said otherwise)."""
    gen = torch.Generator().manual_seed(1000 + index)
    return torch.randn(4, 5, generator=gen, dtype=torch.float64).to(dtype)


def tiny_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().sum()


def tiny_reference_grads(batch_indices) -> list[torch.Tensor]:
    """float64 gradients of the mean over ``batch_indices`` of the loss, per parameter of :class:`TinyNet`:
    what data parallelism (DDP's and FSDP's averaging of the replicas' gradients) produces."""
    model = tiny_net(torch.float64)
    loss = sum(tiny_loss(model, tiny_batch(i, torch.float64)) for i in batch_indices) / len(batch_indices)
    loss.backward()
    return [p.grad for p in model.parameters()]


# --------------------------------------------------------------------------------------------------------
# TiedLM: a two-stage pipeline whose first and last stages share the embedding.
# --------------------------------------------------------------------------------------------------------

TIED_SEED = 12
VOCAB, WIDTH, TOKENS = 11, 6, 5


class TiedLM(nn.Module):
    """Stage 0: embedding lookup and ``first``; stage 1: ``second`` and the output projection through the
    same embedding matrix (weight tying). Built whole on every rank; each stage uses its own part, and the
    last stage uses its own copy of the embedding, as a pipeline does."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.first = nn.Linear(WIDTH, WIDTH)
        self.second = nn.Linear(WIDTH, WIDTH)

    def stage0(self, tokens):
        return torch.tanh(self.first(self.embedding(tokens)))

    def stage1_loss(self, hidden, targets):
        logits = torch.tanh(self.second(hidden)) @ self.embedding.weight.T
        return F.cross_entropy(logits, targets)

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """The parameters stage ``stage`` holds besides the shared embedding."""
        return list((self.first if stage == 0 else self.second).parameters())


def tied_lm(dtype=torch.float32) -> TiedLM:
    return init_from_seed(TiedLM(), TIED_SEED, dtype)


def tied_batch(replica: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) of data-parallel replica ``replica``."""
    gen = torch.Generator().manual_seed(2000 + replica)
    return torch.randint(VOCAB, (TOKENS,), generator=gen), torch.randint(VOCAB, (TOKENS,), generator=gen)


def tied_reference_grads(replicas: int) -> list[torch.Tensor]:
    """float64 gradients of the whole tied model (the embedding once, both its uses summed) of the mean
    loss over the data-parallel replicas' batches."""
    model = tied_lm(torch.float64)
    loss = sum(model.stage1_loss(model.stage0(tokens), targets)
               for tokens, targets in map(tied_batch, range(replicas))) / replicas
    loss.backward()
    return [p.grad for p in model.parameters()]


# --------------------------------------------------------------------------------------------------------
# MoE: a top-1 mixture of experts with non-expert (shared) parameters.
# --------------------------------------------------------------------------------------------------------

MOE_SEED = 15
EXPERTS, MOE_WIDTH, MOE_HIDDEN = 4, 4, 3


class MoE(nn.Module):
    """``proj`` and ``gate`` are shared (non-expert); every token goes to its top-1 expert, weighted by the
    gate's probability."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(MOE_WIDTH, MOE_WIDTH)
        self.gate = nn.Linear(MOE_WIDTH, EXPERTS)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(MOE_WIDTH, MOE_HIDDEN), nn.Tanh(), nn.Linear(MOE_HIDDEN, MOE_WIDTH))
            for _ in range(EXPERTS)
        )

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        probs = torch.softmax(self.gate(h), dim=-1)
        weight, choice = probs.max(dim=-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            routed = choice == e
            out[routed] = expert(h[routed]) * weight[routed, None]
        return out

    def non_expert_parameters(self) -> list[nn.Parameter]:
        return [*self.proj.parameters(), *self.gate.parameters()]

    def expert_parameters(self, experts) -> list[nn.Parameter]:
        return [p for e in experts for p in self.experts[e].parameters()]


def moe(dtype=torch.float32) -> MoE:
    """The seeded MoE, its gate sharpened (bias 0, weight x4) so that every expert gets tokens."""
    model = init_from_seed(MoE(), MOE_SEED, dtype)
    with torch.no_grad():
        model.gate.bias.zero_()
        model.gate.weight.mul_(4.0)
    return model


def moe_batch(index: int, dtype=torch.float32) -> torch.Tensor:
    """32 tokens for rank ``index``: enough that every expert gets some (checked by the test)."""
    gen = torch.Generator().manual_seed(3000 + index)
    return torch.randn(32, MOE_WIDTH, generator=gen, dtype=torch.float64).to(dtype)


def moe_loss(model: MoE, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().sum()


def moe_reference_grads(batch_indices) -> dict[str, torch.Tensor]:
    """float64 gradients of the whole MoE (every expert once) of the mean loss over the ranks' batches, by
    parameter name (``experts.<e>.`` for expert e's)."""
    model = moe(torch.float64)
    loss = sum(moe_loss(model, moe_batch(i, torch.float64)) for i in batch_indices) / len(batch_indices)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}
