"""Accelerate custom loops and Lightning, through their own APIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import VOCAB, tiny_model

from memwatch import AlertConfig, MonitorConfig
from memwatch.store.runs import History

K = M = 16


def rows(n=8, length=48):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (n, length), generator=g)


def accelerate_loop(out, total=40, save_at=None, stop_at=None, resume_from=None):
    from accelerate import Accelerator
    from memwatch.integrations.accelerate import MemWatch

    accelerator = Accelerator(cpu=True, project_dir=str(out))
    torch.manual_seed(0)
    model = tiny_model("gpt2")
    opt = torch.optim.AdamW(model.parameters(), lr=8e-3)
    model, opt = accelerator.prepare(model, opt)
    batch = rows()
    watch = MemWatch(
        MonitorConfig(every_n_steps=10, prefix_len=K, suffix_len=M, console=False, run_name="acc"),
        train_data=[{"input_ids": r.tolist()} for r in batch],
        output_dir=out,
    )
    accelerator.register_for_checkpointing(watch)
    start = 0
    if resume_from is not None:
        accelerator.load_state(resume_from)
        start = 20
    watch.start(accelerator, model, start)
    for step in range(start + 1, total + 1):
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        watch.step(accelerator, model, step)
        if step == save_at:
            accelerator.save_state(str(out / "state"))
        if step == stop_at:  # a crash: no final evaluation, the process just stops
            watch.monitor.close()
            return watch
    watch.finish(accelerator, model, total)
    return watch


def test_accelerate_loop_and_resume_from_saved_state(tmp_path):
    full = accelerate_loop(tmp_path / "full")
    assert full.monitor.evaluated_steps == [0, 10, 20, 30, 40]
    crashed = accelerate_loop(tmp_path / "run", save_at=20, stop_at=35)
    assert crashed.monitor.evaluated_steps == [0, 10, 20, 30]
    accelerate_loop(tmp_path / "run", resume_from=tmp_path / "run" / "state")
    with History(tmp_path / "full") as h:
        a = h.run("acc")
    with History(tmp_path / "run") as h:
        b = h.run("acc")
        assert len(h.runs) == 1
    assert a.steps.tolist() == b.steps.tolist() == [0, 10, 20, 30, 40]
    np.testing.assert_array_equal(a.exact, b.exact)
    np.testing.assert_array_equal(a.generated, b.generated)
    np.testing.assert_allclose(a.suffix_nll, b.suffix_nll, atol=1e-6)
    assert a.exact[-1].any()  # it memorized: the comparison covers transitions


def test_accelerate_state_dict_round_trip(tmp_path):
    watch = accelerate_loop(tmp_path, total=10)
    state = watch.state_dict()
    assert state["evaluated_steps"] == [0, 10] and state["step"] == 10 and state["tracker"]["n"] == 8
    from memwatch.integrations.accelerate import MemWatch

    fresh = MemWatch(MonitorConfig())
    fresh.load_state_dict(state)
    assert fresh._pending_state["step"] == 10


@pytest.fixture
def lightning():
    return pytest.importorskip("lightning.pytorch")


def lightning_fit(pl, out, callback, max_steps=30):
    from memwatch.integrations.lightning import MemWatchLightningCallback  # noqa: F401 - imported only with lightning
    from torch.utils.data import DataLoader

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_model("gpt2")

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=8e-3)

    data = [{"input_ids": r} for r in rows()]
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[callback],
    )
    trainer.fit(LM(), DataLoader(data, batch_size=8))
    return trainer


def test_lightning_callback(lightning, tmp_path):
    from memwatch.integrations.lightning import MemWatchLightningCallback

    cb = MemWatchLightningCallback(MonitorConfig(every_n_steps=10, prefix_len=K, suffix_len=M, console=False))
    lightning_fit(lightning, tmp_path, cb)
    assert cb.monitor.evaluated_steps == [0, 10, 20, 30]
    with History(tmp_path) as h:
        run = h.run()
    assert run.group_names() == ["train"] and len(run.ids) == 8 and run.exact[-1].any()
    assert cb.state_dict()["evaluated_steps"] == [0, 10, 20, 30]


def test_lightning_alert_stops_training(lightning, tmp_path):
    from memwatch.integrations.lightning import MemWatchLightningCallback

    alerts = AlertConfig(extraction_rate={"train": 0.25}, actions={"extraction_rate": ("stop_training",)})
    cb = MemWatchLightningCallback(
        MonitorConfig(every_n_steps=5, prefix_len=K, suffix_len=M, console=False, alerts=alerts)
    )
    trainer = lightning_fit(lightning, tmp_path, cb, max_steps=200)
    fired = [a for a in cb.monitor.alerts if a.rule == "extraction_rate"]
    assert fired and trainer.global_step == fired[0].step < 200


def test_lightning_import_error_names_the_extra(monkeypatch):
    import builtins
    import importlib
    import sys

    real_import = builtins.__import__

    def no_lightning(name, *args, **kwargs):
        if name.startswith(("lightning", "pytorch_lightning")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lightning)
    monkeypatch.delitem(sys.modules, "memwatch.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'memwatch\[lightning\]'"):
        importlib.import_module("memwatch.integrations.lightning")


def test_the_readme_peft_snippet_monitors_a_lora_fine_tune_against_its_base(tmp_path):
    """README's PEFT snippet, run as written on a tiny GPT-2: the LoRA run is recorded, and reference="auto" measured
    the base (adapters off), so the calibrated membership signals are there."""
    pytest.importorskip("peft")
    from _readme import run_snippet

    g = torch.Generator().manual_seed(0)
    train = [
        {"input_ids": r.tolist(), "labels": r.tolist()}
        for r in torch.randint(0, VOCAB, (16, 80), generator=g)
    ]
    ns = run_snippet("peft", model=tiny_model("gpt2"), out=str(tmp_path), train=train)
    assert ns["trainer"].state.global_step == 20
    assert type(ns["model"]).__name__ == "PeftModelForCausalLM"
    with History(tmp_path) as h:
        run = h.run()
    assert run.steps.tolist() == [0, 10, 20]
    calibrated = run.values("loss_calibrated")  # the run's loss minus the base's: finite for every probe
    assert np.isfinite(calibrated).all()
    assert np.abs(calibrated[0]).max() < 1e-4  # at step 0 the adapters are zero: the model is its base
