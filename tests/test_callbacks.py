"""The framework callbacks, in real (CPU, single-process) training runs, against the same run written out as a
plain loop: clip with torch, then step. Each test is skipped where its framework is not installed."""

import math

import pytest
import torch
from torch import nn

import distclip

STEPS = 4


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _batches(nan_at=None):
    batches = [torch.randn(8, 6, generator=torch.Generator().manual_seed(t)) for t in range(STEPS)]
    if nan_at is not None:
        batches[nan_at][0, 0] = math.nan
    return batches


def _reference(max_norm, lr, nan_at=None):
    """The plain loop: for each batch, backward, torch's clip, SGD step; a non-finite step is skipped."""
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for t, x in enumerate(_batches(nan_at)):
        opt.zero_grad()
        net(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        if t != nan_at:
            opt.step()
    return net


# ---------------------------------------------------------------------------------------------- Lightning


def _lightning_run(callback, nan_at=None, max_steps=STEPS, ckpt_path=None, tmp_path=None):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, batch, index):
            return self.net(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(_batches(nan_at), batch_size=None), ckpt_path=ckpt_path)
    return trainer, module


def test_lightning_callback_clips_logs_and_skips():
    pytest.importorskip("lightning.pytorch")
    from distclip.integrations.lightning import GradClipperCallback

    callback = GradClipperCallback(0.5, nonfinite="skip", norms="module")
    trainer, module = _lightning_run(callback, nan_at=2)
    for p, q in zip(module.net.parameters(), _reference(0.5, 0.1, nan_at=2).parameters()):
        torch.testing.assert_close(p, q)
    report = callback.last_report
    assert int(report.steps) == STEPS and int(report.skipped_steps) == 1
    logged = trainer.callback_metrics
    assert {"grad/norm", "grad/clip_rate", "grad/skipped", "grad/norm/net.0", "grad/norm/net.2"} <= set(logged)


def test_lightning_callback_state_survives_a_checkpoint(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from distclip.integrations.lightning import GradClipperCallback

    first = GradClipperCallback(0.5, policy=distclip.ZClip(warmup_steps=2), log=False)
    trainer, _ = _lightning_run(first, max_steps=2, tmp_path=tmp_path)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = GradClipperCallback(0.5, policy=distclip.ZClip(warmup_steps=2), log=False)
    _lightning_run(resumed, max_steps=STEPS, ckpt_path=tmp_path / "last.ckpt", tmp_path=tmp_path)
    state = resumed.state_dict()
    assert int(state["counters"]["steps"]) == STEPS
    assert int(state["policies"][0]["state"]["count"]) == 2  # the warm-up ended before the checkpoint


def test_lightning_callback_refuses_the_trainers_clipping():
    pl = pytest.importorskip("lightning.pytorch")
    from distclip.integrations.lightning import GradClipperCallback

    trainer = pl.Trainer(accelerator="cpu", gradient_clip_val=1.0, logger=False, callbacks=[GradClipperCallback(1.0)])
    with pytest.raises(ValueError, match="gradient_clip_val"):
        trainer.callbacks[0].setup(trainer, None, "fit")
    with pytest.raises(ValueError, match="Lightning's"):
        GradClipperCallback(1.0, fused=True)


# ---------------------------------------------------------------------------------------------- transformers


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x):
        return {"loss": self.net(x).square().mean()}


class _Batches(torch.utils.data.Dataset):
    def __init__(self):
        self.batches = _batches()

    def __len__(self):
        return STEPS

    def __getitem__(self, i):
        return {"x": self.batches[i]}


def _collate(items):
    (item,) = items
    return item


def test_transformers_callback_clips_and_logs(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from distclip.integrations.transformers import GradClipperCallback

    class Recorder(transformers.TrainerCallback):
        logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    def trainer(max_grad_norm, callback, recorder=None):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=1, learning_rate=0.1,
            max_grad_norm=max_grad_norm, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
            disable_tqdm=True, optim="sgd", lr_scheduler_type="constant", dataloader_drop_last=False,
        )
        callbacks = [callback] + ([recorder] if recorder else [])
        model = _Regression()
        t = transformers.Trainer(model=model, args=args, train_dataset=_Batches(), data_collator=_collate,
                                 callbacks=callbacks)
        t._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(t.train_dataset)
        return t, model

    callback, recorder = GradClipperCallback(0.5, norms="parameter"), Recorder()
    run, model = trainer(0.0, callback, recorder)
    run.train()
    for p, q in zip(model.net.parameters(), _reference(0.5, 0.1).parameters()):
        torch.testing.assert_close(p, q)
    assert int(callback.last_report.steps) == STEPS
    step_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert len(step_logs) == STEPS and all(logs["grad/threshold"] == 0.5 for logs in step_logs)
    assert step_logs[0]["grad/norm"] == pytest.approx(step_logs[0]["grad_norm"], rel=1e-6)  # the Trainer's own
    assert "grad/norm/net.0.weight" in step_logs[0]

    run, _ = trainer(1.0, GradClipperCallback(0.5))
    with pytest.raises(ValueError, match="max_grad_norm"):
        run.train()
