"""The parameters of a module as ``clip_module_grad_norm_`` reads them (`modules.parameter_list`): the same
tensors, in the same order, as ``list(module.parameters())``, whatever the module's structure, and the module's
own listing where its class overrides it."""

import torch
from torch import nn

from distclip._clip.modules import parameter_list


def _same(module: nn.Module) -> None:
    expected = list(module.parameters())
    got = parameter_list(module)
    assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected))


def test_nested_shared_and_missing_parameters():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(2, 3), shared, nn.Sequential(shared, nn.LayerNorm(3)), nn.Linear(3, 2))
    model[3].weight = model[0].weight  # tied across modules (a parameter listed once, where first met)
    model[0].register_parameter("extra", None)  # a parameter slot holding None is skipped
    model.register_parameter("scale", nn.Parameter(torch.ones(1)))  # the root's own come first
    _same(model)
    assert len(parameter_list(model)) == 8  # scale, 2 + 2 (shared once) + 2, and the last bias


def test_empty_module():
    _same(nn.ReLU())
    assert parameter_list(nn.ReLU()) == []


def test_a_class_that_lists_its_parameters_itself_is_asked():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def parameters(self, recurse=True):
            return self.b.parameters(recurse)

    model = Frozen()
    _same(model)
    assert len(parameter_list(model)) == 2
