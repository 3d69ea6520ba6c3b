"""Per-unit norms: the pre-clip norm of each parameter or module, for `GradClipper`'s ``norms=`` report."""

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distclip._clip import layout, partials, reduction, row, total_norm
from distclip._clip.foreach import by_device_and_dtype
from distclip._clip.layout import Layout

# Module names that wrappers insert into parameter names; per-unit norms are named without them.
_WRAPPER_NAMES = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


@dataclass(frozen=True)
class Units:
    """The units of per-unit norms: their names, and for each parameter (by identity) its unit's index."""

    names: tuple[str, ...]
    index_of: dict[int, int]

    @staticmethod
    def of(module: torch.nn.Module | None, parameters: list[Any], kind: str) -> "Units":
        if module is None:
            named = [(str(i), p) for i, p in enumerate(flat_parameters(parameters))]
        else:
            ddp = isinstance(module, torch.nn.parallel.DistributedDataParallel)
            named = [(_clean(name, ddp), p) for name, p in module.named_parameters()]
        names: dict[str, int] = {}
        index_of = {}
        for name, p in named:
            unit = name if kind == "parameter" else (name.rpartition(".")[0] or "root")
            index_of[id(p)] = names.setdefault(unit, len(names))
        return Units(tuple(names), index_of)

    def norms(
        self, parameters: list[Any], laid_out: Layout, p: float, foreach: bool | None, device: torch.device
    ) -> Tensor:
        """The pre-clip p-norm of every unit, over the counted pieces (one reduction when sharded)."""
        counted = {id(t) for t in laid_out.counted}
        pieces: list[list[Tensor]] = [[] for _ in self.names]
        grads = iter(laid_out.grads)  # the layout lists the local gradients in the order of the parameters
        for param in flat_parameters(parameters):
            if param.grad is None:
                continue
            grad = next(grads)
            if id(param) not in self.index_of:
                raise ValueError("distclip: a parameter that the clipper was not built with has a gradient")
            if id(grad) in counted:
                pieces[self.index_of[id(param)]].append(grad)
        if not laid_out.sharded:
            zero = torch.zeros((), device=device)
            return torch.stack([
                total_norm.combine(partials.tensor_norms(by_device_and_dtype(g), p, foreach), p, device) if g else zero
                for g in pieces
            ])
        wire = reduction.wire_device(laid_out.group)
        rows = torch.cat([
            row.encode(partials.local_norm(by_device_and_dtype(g), p, foreach, wire) if g else None, (), wire)
            for g in pieces
        ])
        gathered = reduction.gather_rows(rows, laid_out.group).reshape(-1, len(pieces), len(row.NORM_COLUMNS))
        return torch.stack([total_norm.from_rows(gathered[:, u], p) for u in range(len(pieces))]).to(device)


def flat_parameters(parameters: list[Any]) -> list[Any]:
    """Every parameter of ``parameters``, declared groups expanded, in the order the layout lists them."""
    flat: list[Any] = []
    for item in parameters:
        flat.extend(layout.as_list(item["params"], "params") if type(item) is dict else [item])
    return flat


def _clean(name: str, ddp: bool) -> str:
    parts = [part for part in name.split(".") if part not in _WRAPPER_NAMES]
    return ".".join(parts[1:] if ddp and parts[:1] == ["module"] else parts)
