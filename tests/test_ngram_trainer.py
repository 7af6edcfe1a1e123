"""The n-gram index in a real Trainer run: duplicated training windows are memorized earlier (Carlini's dose-response
on natural data), and the n-gram numbers reach the JSON report as the live monitor computed them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_canary_trainer import make_trainer

from memwatch import MemWatchCallback, MonitorConfig
from memwatch.cli import main
from memwatch.store.runs import History

K, M = 16, 8
COPIES = (
    1,
    3,
    8,
    32,
)  # per distinct row: the duplicate bins 1, 2-3, 4-15 and 16-63 before training repeats them


def duplicated_rows(
    per_level: int = 6, length: int = 32, seed: int = 0
) -> tuple[list[dict], dict[tuple, int]]:
    rng = np.random.default_rng(seed)
    rows, copies = [], {}
    for n in COPIES:
        for _ in range(per_level):
            ids = rng.integers(1, 250, size=length).tolist()
            copies[tuple(ids[: K + M])] = n
            rows += [{"input_ids": ids, "labels": ids}] * n
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], copies


@pytest.mark.slow
def test_duplicated_windows_are_memorized_earlier_and_the_report_holds_the_ngram_numbers(tmp_path, capsys):
    data, copies = duplicated_rows()
    cfg = MonitorConfig(
        every_n_steps=25,
        prefix_len=K,
        suffix_len=M,
        train_probes=len(copies),
        heldout_probes=0,
        console=False,
        ngrams="stream",
    )
    cb = MemWatchCallback(cfg)
    trainer = make_trainer(tmp_path, data, [cb], steps=150)
    trainer.train()
    last = cb.monitor.last_record
    out = tmp_path / "report.json"
    assert main(["report", str(tmp_path), "--format", "json", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    with History(tmp_path) as h:
        run = h.run()
        dup = run.values("dup_window")  # [E, N] seen so far
        first = run.first_memorized()
    # Every training window's duplicate count, seen so far, is what was streamed: its copies per epoch times the
    # epochs started (the panel's windows are the rows' first K + M tokens).
    windows = [tuple(t[: K + M]) for t in run.tokens]
    epochs_done = int(trainer.state.epoch)  # whole epochs, then part of one
    for i, w in enumerate(windows):
        assert copies[w] * epochs_done <= dup[-1, i] <= copies[w] * (epochs_done + 1)
    assert (dup[0] == 0).all()  # the baseline at step 0: nothing trained on yet
    # Carlini's dose-response on natural data: the more copies, the earlier memorized; the rate by duplicate bin
    # rises with the bin in the report.
    mean_first = {}
    for n in COPIES:
        rows = [i for i, w in enumerate(windows) if copies[w] == n]
        steps = np.where(first[rows] >= 0, first[rows], 10_000)
        mean_first[n] = float(np.mean(steps))
    assert mean_first[32] < mean_first[1] and mean_first[8] <= mean_first[1], mean_first
    final = next(r for r in report["evals"] if r["step"] == 150 and r["group"] == "train")
    rates = [final.get(f"dup_extraction_rate/{b}") for b in ("1", "2-3", "4-15", "16-63", "64plus")]
    present = [r for r in rates if r is not None]
    assert len(present) >= 3 and present[-1] > present[0], rates
    # The n-gram numbers the replay cannot recompute are the live monitor's own, read back from the history.
    for stat in ("distributional_rho", "distributional_p", "distributional_pairs"):
        assert final[stat] == pytest.approx(last.scalars[f"train/{stat}"], rel=1e-12)
    assert final["ngram_profile"], "the boundary n-gram profile per bucket"
    for bucket, profile in final["ngram_profile"].items():
        live = last.arrays[f"train/ngram_profile/{bucket}"]
        assert np.allclose(profile, live, atol=1e-6) and len(profile) == cfg.entropy_window + M
        assert final[f"ngram_jump/{bucket}"] == pytest.approx(last.scalars[f"train/ngram_jump/{bucket}"])
    # ... over steps: a series, one value per evaluation.
    rho = [r["distributional_rho"] for r in report["evals"] if r["group"] == "train"]
    assert len(rho) == len(run.steps) and sum(v is not None for v in rho) >= len(rho) - 1


def test_the_trainer_is_left_as_found_even_when_train_raises(tmp_path):
    """Streaming shadows trainer.training_step on the Trainer object only; it is gone after training, and a train()
    that raised (so on_train_end never ran) is never wrapped twice by the next one."""
    from test_trainer import make_trainer as small_trainer
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        armed = True

        def on_step_end(self, args, state, control, **kwargs):
            if self.armed and state.global_step == 3:
                raise RuntimeError("user code failed")

    boom = Boom()
    cb = MemWatchCallback(
        MonitorConfig(every_n_steps=5, prefix_len=K, suffix_len=M, console=False, ngrams="stream")
    )
    trainer = small_trainer(tmp_path, [cb, boom], steps=6)
    with pytest.raises(RuntimeError, match="user code failed"):
        trainer.train()
    left = vars(trainer).get("training_step")
    assert left is not None and left.__memwatch_before__ is None  # ours, around the class's method
    boom.armed = False
    seen = []
    cb.monitor.observe_batch = lambda ids, mask=None: seen.append(1)  # count what reaches the monitor
    trainer.train()
    assert "training_step" not in vars(trainer)  # the class's method again
    assert len(seen) == 6  # one observation per micro-batch: never wrapped twice
