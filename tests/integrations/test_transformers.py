"""The transformers callback (``distclip.integrations.transformers.GradClipperCallback``) in a real CPU
single-process Trainer run, against the same run written out as a plain loop (clip with torch, then step):
it clips and logs (its norm equal to the Trainer's own ``grad_norm``), and refuses the Trainer's own clipping.
Skipped where transformers or accelerate is not installed."""

import pytest
import torch
from torch import nn

from _integration_helpers import STEPS, _batches, _net, _reference


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
