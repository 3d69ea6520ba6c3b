"""torch.compile: a training step that clips with distclip compiles with no more graph breaks than one that
clips with torch, and the compiled step gives bitwise the eager step's norms and parameters.
"""

import torch

import distclip


def _training_step(clip):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randn(32, 4)

    def step():
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        norm = clip(model.parameters(), 0.5)
        optimizer.step()
        return norm

    return model, step


def test_compiled_step_matches_eager_with_torchs_graph_breaks():
    import torch._dynamo as dynamo

    breaks = {}
    for name, clip in [("torch", torch.nn.utils.clip_grad_norm_), ("distclip", distclip.clip_grad_norm_)]:
        dynamo.reset()
        _, step = _training_step(clip)
        breaks[name] = dynamo.explain(step)().graph_break_count
    assert breaks["distclip"] <= breaks["torch"], breaks

    eager_model, eager_step = _training_step(distclip.clip_grad_norm_)
    compiled_model, step = _training_step(distclip.clip_grad_norm_)
    dynamo.reset()
    compiled_step = torch.compile(step, backend="aot_eager")
    for _ in range(3):
        assert torch.equal(compiled_step(), eager_step())
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
