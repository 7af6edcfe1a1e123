"""Sweeps over k, m and model size: one extraction per (model, k), equal to separate extractions and scans per cell."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _models import VOCAB
from transformers import GPT2Config, GPT2LMHeadModel

import memwatch
from memwatch.cli import main
from memwatch.engine import extraction as engine
from memwatch.posthoc.scan import ScanError
from memwatch.posthoc.sweep import format_parameters, render_sweep_html, render_sweep_text, sweep
from memwatch.probes import probe_id
from memwatch.store.runs import History

KS, MS = (4, 8, 12), (4, 8, 12)
K, M = max(KS), max(MS)  # every continuation starts at token K of a probe


def _panel() -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows [8, K+M], probes [16, K+M]).

    Rows 4-7 come in two pairs that share the last 4 prefix tokens but not the earlier ones, and continue
    differently: with k = 4 the model can recite at most one of each pair, with k = 12 both (context helps).
    Probes: the 8 trained rows, 4 that follow a trained row for 2, 5, 9 or 11 continuation tokens and then depart
    (exact at the smaller m only), 4 unseen rows.
    """
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, VOCAB, (8, K + M), generator=g)
    train[5, K - 4 : K] = train[4, K - 4 : K]
    train[7, K - 4 : K] = train[6, K - 4 : K]
    partial = train[:4].clone()
    for i, keep in enumerate((2, 5, 9, 11)):
        partial[i, K + keep :] = (partial[i, K + keep :] + 1) % VOCAB  # departs from the trained row there
    unseen = torch.randint(0, VOCAB, (4, K + M), generator=g)
    return train, torch.cat([train, partial, unseen])


def _gpt2(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return GPT2LMHeadModel(cfg)


def _fit(model: torch.nn.Module, rows: torch.Tensor, steps: int) -> torch.nn.Module:
    """Full-batch AdamW on every window rows[:, K - k:] together: GPT-2 learns absolute positions, so a model
    trained at one offset only would recite nothing from a shorter prefix (a real LM sees text at every offset)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = sum(model(input_ids=rows[:, K - k :], labels=rows[:, K - k :]).loss for k in KS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second intra-op thread, and on a shared 2-core machine the threads contend
    # (training measured 7x slower with 2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family(tmp_path_factory, _one_thread):
    """Two sizes of one family trained for a few seconds on the same rows, saved as model directories."""
    train, probes = _panel()
    out = tmp_path_factory.mktemp("family")
    models, dirs = {}, {}
    for name, width, layers, steps in (("small", 16, 1, 40), ("large", 32, 2, 60)):
        model = _fit(_gpt2(width, layers), train, steps)
        model.save_pretrained(out / name)
        models[name], dirs[name] = model, str(out / name)
    jsonl = out / "probes.jsonl"
    jsonl.write_text("".join(json.dumps({"input_ids": row.tolist()}) + "\n" for row in probes))
    return models, dirs, probes, str(jsonl)


def test_one_extraction_per_k_answers_every_m(family, monkeypatch):
    models, _dirs, probes, _ = family
    calls = []
    real_extract = engine.extract

    def counting_extract(model, sequences, **kw):  # the real engine, counted
        calls.append((kw["prefix_len"], kw["suffix_len"]))
        return real_extract(model, sequences, **kw)

    monkeypatch.setattr(engine, "extract", counting_extract)
    result = sweep(
        [("large", models["large"]), ("small", models["small"])],
        probes=probes.tolist(),
        prefix_lens=list(KS),
        suffix_lens=list(MS),
    )
    monkeypatch.undo()
    # One pass per (model, k), each at the largest m.
    assert calls == [(k, M) for _ in range(2) for k in KS]
    assert [(e["model"], e["prefix_len"]) for e in result.extractions] == [
        (m, k) for m in ("large", "small") for k in KS
    ]
    assert [m.label for m in result.models] == ["small", "large"]  # ordered by size
    assert result.models[0].parameters < result.models[1].parameters

    cells = {(c["model"], c["prefix_len"], c["suffix_len"]): c for c in result.cells()}
    seen = set()
    for name, model in models.items():
        for k in KS:
            for m in MS:
                # A separate extraction at (k, m), aligned the same way: the k tokens before token K, then m.
                alone = memwatch.extract(model, probes[:, K - k : K + m], prefix_len=k, suffix_len=m)
                np.testing.assert_array_equal(result.exact(name, k, m), alone.exact)
                np.testing.assert_allclose(result.match_ratio(name, k, m), alone.match_ratio, atol=1e-6)
                assert cells[(name, k, m)]["rate"] == pytest.approx(alone.exact.mean())
                assert cells[(name, k, m)]["mean_match_ratio"] == pytest.approx(alone.match_ratio.mean())
                seen.update(alone.exact.tolist())
    assert seen == {True, False}  # the comparison covers extracted and non-extracted probes
    large = {(k, m): cells[("large", k, m)]["rate"] for k in KS for m in MS}
    assert large[(12, 4)] >= large[(12, 12)]  # exact at m implies exact at every smaller m
    assert large[(12, 12)] > large[(4, 12)]  # a longer context recovers the pairs a 4-token prefix confuses
    assert large[(12, 12)] > cells[("small", 12, 12)]["rate"]  # the larger model memorized more


def test_sweep_equals_separate_scans_and_reports(family, tmp_path, capsys):
    _, dirs, probes, jsonl = family
    out = tmp_path / "sweep.json"
    code = main(
        [
            "sweep",
            dirs["large"],
            dirs["small"],
            "--probes",
            jsonl,
            "--prefix-lens",
            ",".join(map(str, KS)),
            "--suffix-lens",
            ",".join(map(str, MS)),
            "--format",
            "json",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    d = json.loads(out.read_text())
    assert len(d["extractions"]) == 2 * len(KS)  # one pass per model and k
    assert d["spec"]["continuation_start"] == K and d["probes"]["n"] == len(probes)
    rates = {(c["model"], c["prefix_len"], c["suffix_len"]): c for c in d["cells"]}

    # `memwatch scan` at each (k, m) of the large model, on the same windows: the same per-probe flags and rate.
    history = tmp_path / "scans.sqlite"
    for k in KS:
        for m in MS:
            windows = probes[:, K - k : K + m]
            pair = tmp_path / f"k{k}m{m}.jsonl"
            pair.write_text("".join(json.dumps({"input_ids": w.tolist()}) + "\n" for w in windows))
            args = ["scan", dirs["large"], "--probes", str(pair), "--history", str(history)]
            args += ["--run-name", f"k{k}m{m}", "--prefix-len", str(k), "--suffix-len", str(m)]
            assert main(args) == 0
            with History(history) as h:
                run = h.run(f"k{k}m{m}")
            by_id = dict(zip(run.ids, run.exact[-1].tolist(), strict=True))
            scanned = np.array([by_id[probe_id(w.tolist())] for w in windows])
            pml = np.array(d["prefix_match_len"]["large"][str(k)])
            np.testing.assert_array_equal(pml >= m, scanned)
            assert rates[("large", k, m)]["rate"] == pytest.approx(scanned.mean())
    capsys.readouterr()

    # The table and the chart, from the API's result.
    result = sweep([dirs["small"], dirs["large"]], probes=jsonl, prefix_lens=list(KS), suffix_lens=list(MS))
    assert result.cells() == d["cells"]
    text = render_sweep_text(result)
    assert "m=4" in text and "m=12" in text and format_parameters(result.models[1].parameters) in text
    page = render_sweep_html(result)
    assert page.count("<svg") == 3  # against k, against m, against model size
    assert "<script" not in page and "http://www.w3.org/2000/svg" in page


def test_short_probes_are_dropped_and_counted(family, tmp_path, capsys):
    models, dirs, probes, _ = family
    rows = [*probes.tolist(), list(range(K + M - 1))]  # one probe too short for K + M
    result = sweep([("large", models["large"])], probes=rows, prefix_lens=[K], suffix_lens=[M], mode="exact")
    assert result.dropped == 1 and len(result.probe_ids) == len(probes) and result.match_count is None
    with pytest.raises(ScanError, match="no probe has"):
        sweep([("large", models["large"])], probes=[list(range(5))], prefix_lens=[4], suffix_lens=[4])
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"input_ids": list(range(5))}) + "\n")
    assert (
        main(["sweep", dirs["large"], "--probes", str(short), "--prefix-lens", "4", "--suffix-lens", "4"])
        == 2
    )
    assert "no probe has" in capsys.readouterr().err
    assert format_parameters(70_426_624) == "70.4M" and format_parameters(999) == "999"


def test_the_live_monitor_sweeps_k_and_m_at_one_pass_per_shorter_k(family, tmp_path, monkeypatch):
    """MonitorConfig.sweep_prefix_lens / sweep_suffix_lens: every (k, m) rate at each evaluation, equal to Hugging
    Face generate from the last k prefix tokens, one extra teacher-forced pass per k below prefix_len, and in the
    history's JSON report."""
    from _models import generate_row

    models, _dirs, probes, _ = family
    model = models["large"]
    cfg = memwatch.MonitorConfig(
        prefix_len=K, suffix_len=M, sweep_prefix_lens=KS, sweep_suffix_lens=MS, console=False,
        tensorboard=False, reference=None, embedding_every=None, train_probes=0, heldout_probes=0,
    )  # fmt: skip
    monitor = memwatch.Monitor(cfg, probes=probes.tolist())
    monitor.setup(model, output_dir=tmp_path)
    calls = []
    real_extract = engine.extract

    def counting_extract(model, sequences, **kw):  # the real engine, counted
        calls.append((kw["prefix_len"], kw["suffix_len"], kw["mode"]))
        return real_extract(model, sequences, **kw)

    monkeypatch.setattr(engine, "extract", counting_extract)
    try:
        record = monitor.evaluate(model, 0)
    finally:
        monkeypatch.undo()
        monitor.close()
    assert calls == [(K, M, "full"), (4, M, "exact"), (8, M, "exact")]  # k = K is the extraction's own
    group = str(record.groups[0])
    seen = set()
    for k in KS:
        generated = torch.stack(
            [generate_row(model, probes[i : i + 1, K - k : K], M)[0] for i in range(len(probes))]
        )
        for m in MS:
            exact = (generated[:, :m] == probes[:, K : K + m]).all(dim=1).numpy()
            assert record.scalars[f"{group}/sweep_rate/k{k}_m{m}"] == pytest.approx(exact.mean()), (k, m)
            seen.add(float(exact.mean()))
    assert len(seen) > 2  # the cells differ: the comparison is not of constants
    out = tmp_path / "report.json"
    assert main(["report", str(tmp_path), "--format", "json", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["evals"][0]
    assert row["sweep_rate/k4_m12"] == pytest.approx(record.scalars[f"{group}/sweep_rate/k4_m12"])


def test_a_live_sweep_past_the_configured_lengths_is_refused_with_the_fix():
    with pytest.raises(memwatch.ConfigError, match="raise that to sweep further"):
        memwatch.MonitorConfig(prefix_len=8, sweep_prefix_lens=(4, 16))
    assert memwatch.MonitorConfig(prefix_len=8, suffix_len=8, sweep_suffix_lens=(2, 4)).sweep() == (
        (8,),
        (2, 4),
    )
