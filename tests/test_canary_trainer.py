"""Canaries end to end with a real Trainer: dose-response, exposure, twins as the control, pre-flight."""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from _models import tiny_model
from transformers import Trainer, TrainingArguments

from memwatch import MemWatchCallback, MonitorConfig
from memwatch.bytetok import ByteTokenizer
from memwatch.canaries import inject, make_canaries
from memwatch.demo import stdlib_corpus
from memwatch.live.monitor import SetupError
from memwatch.store.runs import History, report_dict

K, M, REFS = 16, 8, 128


def canary_setup(per_tier=1):
    text, _ = stdlib_corpus(240 * 48)
    rows = [
        {"input_ids": list(text[i : i + 48]), "labels": list(text[i : i + 48])}
        for i in range(0, 240 * 48, 48)
    ]
    man = make_canaries(
        ByteTokenizer(),
        tiers=(1, 4, 16, 64),
        per_tier=per_tier,
        prefix_len=K,
        secret_len=M,
        references=REFS,
        seed=0,
    )
    return inject(rows, man)


def make_trainer(out, data, callbacks, steps=400, collator=None):
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=16,
        max_steps=steps,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    kwargs = {"data_collator": collator} if collator else {}
    return Trainer(
        model=tiny_model("gpt2", seed=0), args=args, train_dataset=data, callbacks=callbacks, **kwargs
    )


@pytest.mark.slow
def test_dose_response_exposure_and_twins(tmp_path):
    data, manifest = canary_setup(per_tier=3)
    cfg = MonitorConfig(
        every_n_steps=50,
        prefix_len=K,
        suffix_len=M,
        train_probes=32,
        heldout_probes=0,
        exposure_references=REFS,
        console=False,
    )
    cb = MemWatchCallback(cfg, canaries=manifest)
    make_trainer(tmp_path, data, [cb]).train()

    with History(tmp_path) as h:
        run = h.run()
        report = report_dict(h)
    canary = run.groups == "canary"
    twins = run.groups == "canary_heldout"
    tiers = np.array([m.get("repetitions", 0) for m in run.metas])
    # Twins are never extracted, at any evaluation: their extraction rate (the false-positive rate) is 0.
    assert not run.exact[:, twins].any()
    # The 64x canaries are extractable at the end and highly exposed: ranked first among the 128 references.
    top = canary & (tiers == 64)
    assert run.exact[-1, top].all()
    assert (run.exposure[-1, top] >= math.log2(REFS)).all()
    assert np.nanmean(run.exposure[-1, top]) > np.nanmean(run.exposure[-1, twins]) + 3
    # Exposure was computed for every canary and twin and for nothing else.
    assert (
        np.isfinite(run.exposure[:, canary | twins]).all()
        and np.isnan(run.exposure[:, ~(canary | twins)]).all()
    )
    # First memorized step is non-increasing with the tier (never memorized counts as after the last step).
    first = run.first_memorized()
    never = int(run.steps[-1]) + 50
    mean_first = [
        np.mean([f if f >= 0 else never for f in first[canary & (tiers == t)]]) for t in (1, 4, 16, 64)
    ]
    assert all(a >= b for a, b in itertools.pairwise(mean_first)), mean_first
    # The JSON report carries the dose-response per tier and step.
    rows = [r for r in report["canaries"]["tiers"] if r["step"] == int(run.steps[-1])]
    assert [r["repetitions"] for r in rows] == [1, 4, 16, 64]
    last = rows[-1]
    assert (
        last["inserted"] == last["twins"] == 3
        and last["inserted_extracted"] == 3
        and last["twins_extracted"] == 0
    )
    # Telling a canary's secret from its twin's (membership on the secret span) gets easier with the dose: the
    # canary~twin AUC of the secret's NLL reaches 1 (every canary's secret likelier than every twin's) no later
    # for a higher tier, and later for the 1x canaries than for the 64x ones (~13 epochs: in the end all do).
    scalars = [r.scalars for _e, r in run.records()]
    aucs = {t: [s[f"canaries/{t}x/suffix_nll_auc"] for s in scalars] for t in (1, 4, 16, 64)}
    separated = [next((int(run.steps[i]) for i, a in enumerate(aucs[t]) if a == 1.0), never) for t in aucs]
    assert all(a >= b for a, b in itertools.pairwise(separated)) and separated[0] > separated[-1], aucs
    assert last["median_exposure"] >= math.log2(REFS) and last["first_memorized_step"] is not None
    assert json.dumps(report)  # serializable
    # The probes are the canaries as found in the training data.
    assert cb.monitor.preflight_report.found == {c.id: c.repetitions for c in manifest.inserted}


def test_preflight_stops_training_when_the_collator_masks_the_secret(tmp_path):
    data, manifest = canary_setup()

    def completion_only(batch):  # trains only on tokens after the 30th: every canary's secret is masked
        ids = torch.tensor([b["input_ids"] for b in batch])
        labels = ids.clone()
        labels[:, :30] = -100
        return {"input_ids": ids, "labels": labels}

    cb = MemWatchCallback(MonitorConfig(prefix_len=K, suffix_len=M, console=False), canaries=manifest)
    trainer = make_trainer(tmp_path, data, [cb], steps=5, collator=completion_only)
    with pytest.raises(SetupError, match="receives no loss in training"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_preflight_catches_a_manifest_not_injected_into_this_dataset(tmp_path):
    data, manifest = canary_setup()
    clean = [
        r
        for r in data
        if r["input_ids"][:K]
        not in [list(c.tokens[c.secret_start - K : c.secret_start]) for c in manifest.inserted]
    ]
    cb = MemWatchCallback(MonitorConfig(prefix_len=K, suffix_len=M, console=False), canaries=manifest)
    with pytest.raises(SetupError, match="is not in the training dataset"):
        make_trainer(tmp_path, clean, [cb], steps=5).train()
    path = manifest.save(os.path.join(tmp_path, "canaries.json"))
    cb2 = MemWatchCallback(MonitorConfig(prefix_len=K, suffix_len=32, console=False), canaries=path)
    with pytest.raises(SetupError, match="suffix_len is 32"):
        make_trainer(tmp_path, data, [cb2], steps=5).train()
