"""The Lightning callback (``distclip.integrations.lightning.GradClipperCallback``) in real CPU single-process
training runs, against the same run written out as a plain loop (clip with torch, then step): it clips, logs
and skips a non-finite step, its state survives a checkpoint, and it refuses the Trainer's own clipping.
Skipped where Lightning is not installed."""

import pytest
import torch

import distclip

from _integration_helpers import STEPS, _batches, _net, _reference


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
