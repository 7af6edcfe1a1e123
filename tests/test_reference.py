"""The reference model: a PEFT model's base through disable_adapter, or a model named by path; calibrated signals
checked against an fp64 recomputation, the adapters left exactly as they were, and "known before" kinds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _models import VOCAB, memorizing_panel, tiny_model, train_rows, trained_model

from memwatch import Monitor, MonitorConfig, SetupError

K = M = 16
peft = pytest.importorskip("peft")


def _rows(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, K + M), generator=torch.Generator().manual_seed(seed))


def _fp64_stats(model: torch.nn.Module, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token log p of the true next tokens, and the mean and variance of log p under the model's own
    distribution, in fp64 from a plain forward: each [N, k + m - 1]."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=rows).logits.double(), dim=-1)[:, :-1]  # [N, T, V]
    p = logp.exp()
    mean = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mean.square()
    true = logp.gather(-1, rows[:, 1:, None]).squeeze(-1)
    return true.numpy(), mean.numpy(), var.numpy()


def _min_k_plus_by_hand(true: np.ndarray, mean: np.ndarray, var: np.ndarray, k: float = 0.2) -> np.ndarray:
    z = (true - mean) / np.sqrt(np.maximum(var, 1e-6))
    n = max(1, int(np.floor(k * z.shape[1])))
    return np.sort(z, axis=1)[:, :n].mean(axis=1)


@pytest.fixture(scope="module")
def lora():
    """A base model that knows the `known` rows, and a LoRA on it trained on those and on new `members`."""
    known, _ = memorizing_panel(K, M)  # the rows trained_model recites
    members = _rows(7, 4)
    base = copy.deepcopy(trained_model("gpt2", K, M))
    reference = copy.deepcopy(base).eval()  # an independent copy of the base, never wrapped
    config = peft.LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        lora_dropout=0.0,
    )
    model = train_rows(peft.get_peft_model(base, config), torch.cat([members, known]), steps=600, lr=3e-3)
    return model, reference, known, members


def test_peft_base_calibrates_the_signals_and_leaves_the_adapters_as_they_were(lora, tmp_path):
    model, reference, known, members = lora
    heldout = _rows(11, 8)
    monitor = Monitor(
        MonitorConfig(prefix_len=K, suffix_len=M, entropy_window=8, console=False, tensorboard=False),
        probes=[{"input_ids": r.tolist(), "group": "known"} for r in known],
        heldout=[r.tolist() for r in heldout],
    )
    monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in members])
    assert monitor.reference.description == "the PEFT base model (adapters disabled)"

    model.eval()
    with torch.no_grad():
        before = model(input_ids=members).logits.clone()
    model.train()  # as in training: evaluation must hand it back in train mode
    frozen = [n for n, p in model.named_parameters() if "lora_A" in n]
    for (
        n,
        p,
    ) in model.named_parameters():  # LoRA-FA style: the A matrices frozen; peft's re-enabling would thaw them
        if n in frozen:
            p.requires_grad_(False)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = []
    real = model.disable_adapter
    model.disable_adapter = lambda: (calls.append(1), real())[1]
    try:
        first = monitor.evaluate(model, 1)
        second = monitor.evaluate(model, 2)
    finally:
        del model.disable_adapter
    monitor.close()

    # The adapters are exactly as they were: weights, trainability, mode, and the adapted outputs.
    assert model.training and model.active_adapter == "default"
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(True)  # as the module fixture made it, for the other tests
    model.eval()  # no dropout: the adapted model's outputs, bit for bit
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=members).logits, before, rtol=0, atol=0)
    assert len(calls) == 1  # the frozen base is measured once, then reused

    # Calibrated signals against fp64: the adapted model's loss minus the base's, min-k%++ minus the base's.
    rows = torch.tensor(np.asarray(monitor._tokens))
    model.eval()
    live = _fp64_stats(model, rows)
    base = _fp64_stats(reference, rows)
    for record in (first, second):
        np.testing.assert_allclose(
            record.values["loss_calibrated"], -live[0].mean(1) + base[0].mean(1), atol=2e-3
        )
        np.testing.assert_allclose(
            record.values["suffix_nll_calibrated"],
            -live[0][:, -M:].mean(1) + base[0][:, -M:].mean(1),
            atol=2e-3,
        )
        np.testing.assert_allclose(
            record.values["min_k_plus_calibrated"],
            _min_k_plus_by_hand(*live) - _min_k_plus_by_hand(*base),
            atol=5e-3,
        )

    # Known before the fine-tune, or learned by it: the base reproduces the known rows, not the members.
    groups = np.asarray(first.groups)
    ref_memorized = np.asarray(first.values["reference_memorized"], bool)
    assert ref_memorized[groups == "known"].all() and not ref_memorized[groups == "train"].any()
    assert first.scalars["known/reference_extraction_rate"] == 1.0
    assert first.scalars["train/reference_extraction_rate"] == 0.0
    memorized = np.asarray(first.values["memorized"], bool)
    learned = memorized & (groups == "train")
    assert learned.sum() >= 2
    assert first.values["recollection"][learned].all()  # learned by this fine-tune: rare text recalled
    known_memorized = memorized & (groups == "known")
    assert known_memorized.any()
    assert first.values["reconstruction"][known_memorized].all()  # the base already produced it

    # The calibrated contrast, as scikit-learn computes it from the record's own values.
    from sklearn.metrics import roc_auc_score

    values = first.values["loss_calibrated"]
    member, control = values[groups == "train"], values[groups == "heldout"]
    expected = roc_auc_score(np.r_[np.ones(len(member)), np.zeros(len(control))], -np.r_[member, control])
    assert first.scalars["train~heldout/loss_calibrated_auc"] == pytest.approx(expected)
    assert expected == 1.0  # the members' loss fell under the fine-tune; the held-out text's did not


def test_a_named_reference_is_loaded_once_measured_once_and_freed(tmp_path):
    path = tmp_path / "reference"
    reference = copy.deepcopy(trained_model("gpt2", K, M)).eval()
    reference.save_pretrained(path)
    members = _rows(7, 4)
    model = train_rows(copy.deepcopy(reference), members, steps=150, lr=3e-3).eval()
    monitor = Monitor(
        MonitorConfig(prefix_len=K, suffix_len=M, entropy_window=8, console=False, reference=str(path)),
    )
    monitor.setup(model, output_dir=tmp_path / "run", train_data=[{"input_ids": r.tolist()} for r in members])
    assert monitor.reference.model is not None  # loaded at setup: a bad path is said before training
    record = monitor.evaluate(model, 1)
    assert monitor.reference.model is None  # measured, then freed
    again = monitor.evaluate(model, 2)
    monitor.close()
    rows = torch.tensor(np.asarray(monitor._tokens))
    expected = -_fp64_stats(model, rows)[0].mean(1) + _fp64_stats(reference, rows)[0].mean(1)
    for r in (record, again):
        np.testing.assert_allclose(r.values["loss_calibrated"], expected, atol=2e-3)
    # In TensorBoard (the event files read back) and in the history's catalog.
    from test_trainer import read_events

    from memwatch import History

    scalars = read_events(str(tmp_path / "run" / "memwatch" / "tb" / "train")).Tags()["scalars"]
    for tag in ("mean_loss_calibrated", "mean_suffix_nll_calibrated", "mean_min_k_plus_calibrated"):
        assert f"memwatch/{tag}" in scalars
    assert "memwatch/reference_extraction_rate" in scalars
    with History(str(tmp_path / "run" / "memwatch" / "history.sqlite")) as h:
        replayed = [r for _e, r in h.run().records()]
    np.testing.assert_allclose(
        replayed[0].values["loss_calibrated"], record.values["loss_calibrated"], rtol=1e-6
    )


def test_without_a_reference_the_calibrated_signals_are_absent_and_cost_nothing(tmp_path):
    model = trained_model("gpt2", K, M)
    monitor = Monitor(
        MonitorConfig(prefix_len=K, suffix_len=M, entropy_window=8, console=False, tensorboard=False)
    )
    monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in _rows(7, 4)])
    record = monitor.evaluate(model, 1)
    monitor.close()
    assert monitor.reference.description is None and monitor.reference.products is None
    assert np.isnan(record.values["loss_calibrated"]).all()
    from memwatch.store.history import HistoryStore

    with HistoryStore(str(tmp_path / "memwatch" / "history.sqlite"), readonly=True) as h:
        stored = h.signal_values(h.evals(h.runs()[0]["run_id"])[0]["eval_id"])
    assert "loss" in stored and "loss_calibrated" not in stored


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "could not be loaded as a causal LM"),
        (
            lambda p: tiny_model("gpt2", vocab=300).save_pretrained(p),
            "must share the trained model's tokenizer",
        ),
    ],
)
def test_a_reference_that_cannot_serve_is_refused_at_setup(tmp_path, make, message):
    path = tmp_path / "ref"
    make(path)
    monitor = Monitor(MonitorConfig(prefix_len=K, suffix_len=M, console=False, reference=str(path)))
    with pytest.raises(SetupError, match=message):
        monitor.setup(
            trained_model("gpt2", K, M),
            output_dir=tmp_path,
            train_data=[{"input_ids": r.tolist()} for r in _rows(7, 4)],
        )


@pytest.mark.monitor_failures
def test_a_failing_reference_switches_itself_off_and_the_evaluation_goes_on(tmp_path, lora, monkeypatch):
    model, _reference, _known, members = lora
    monitor = Monitor(
        MonitorConfig(prefix_len=K, suffix_len=M, entropy_window=8, console=False, tensorboard=False)
    )
    monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in members])
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("adapter type cannot be disabled")

    monkeypatch.setattr(model, "disable_adapter", broken)
    first, second = monitor.evaluate(model, 1), monitor.evaluate(model, 2)
    monitor.close()
    assert first is not None and second is not None and not monitor.disabled
    assert len(calls) == 1  # switched off after the failure: not retried at every evaluation
    assert np.isnan(first.values["loss_calibrated"]).all() and np.isfinite(first.values["loss"]).all()
    assert any(
        "measuring the reference" in f and "adapter type cannot be disabled" in f for f in monitor.failures
    )


def test_a_given_reference_that_shares_weights_with_the_trained_model_is_refused(tmp_path, lora):
    model, _reference, _known, members = lora
    base = model.get_base_model()  # what get_peft_model changed in place: it trains with the adapters
    monitor = Monitor(MonitorConfig(prefix_len=K, suffix_len=M, console=False), reference=base)
    with pytest.raises(SetupError, match=r"shares \d+ parameter tensors with the trained model"):
        monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": r.tolist()} for r in members])
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # untouched
