"""The training-data n-gram index and its signals, against counts and Kneser-Ney probabilities computed here by brute
force: documents never spanned, padding never counted, 32-bit vocabularies, streamed = pre-scanned, the cache."""

from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter

import numpy as np
import pytest
from scipy.stats import spearmanr

from memwatch import ConfigError, History, Monitor, MonitorConfig
from memwatch.corpus import (
    InfiniGramIndex,
    MissingPackageError,
    StreamingIndex,
    Vocabulary,
    dataset_index,
    documents_of_batch,
    ngram_products,
    require_tokengrams,
)
from memwatch.engine.result import ExtractionResult
from memwatch.record import ProbeTracker, build_record, products_of
from memwatch.signals.buckets import BUCKET_NAMES
from memwatch.signals.ngrams import DUP_BINS, NGRAM_SIGNALS

# --- brute force --------------------------------------------------------------------------------------------------


def brute_count(docs: list[list[int]], query: list[int]) -> int:
    """Occurrences of query inside the documents (never across two)."""
    n = len(query)
    return sum(1 for d in docs for i in range(len(d) - n + 1) if d[i : i + n] == query)


def brute_kn(docs: list[list[int]], vocab_size: int, context: list[int], token: int) -> float:
    """The interpolated Kneser-Ney probability (tokengrams' definition) from the documents, each followed by the
    separator id vocab_size, with plain Python counting."""
    sep = vocab_size
    stream = [t for d in docs for t in [*d, sep]]
    total, vocab = len(stream), vocab_size + 1
    uni = Counter(stream)

    def followers(q: list[int]) -> Counter:
        n = len(q)
        return Counter(stream[i + n] for i in range(len(stream) - n) if stream[i : i + n] == q)

    p = (uni[token] + 1e-9) / (total + 1e-9 * vocab)
    n1 = sum(1 for c in uni.values() if c == 1)
    n2 = sum(1 for c in uni.values() if c == 2)
    d1 = n1 / (n1 + 2 * n2) if n1 and n2 else 1.0
    p = max(uni[token] - d1, 0) / total + d1 * len(uni) / total * p
    for level in range(1, len(context) + 1):
        q = context[len(context) - level :]
        nxt = followers(q)
        s = sum(nxt.values())
        if s:
            p = max(nxt[token] - 0.5, 0) / s + 0.5 * len(nxt) / s * p
    return p


def docs_rows(docs: list[list[int]], width: int, pad: int = 0) -> list[dict]:
    """Dataset rows padded on the right to `width`, with their attention masks."""
    return [
        {"input_ids": d + [pad] * (width - len(d)), "attention_mask": [1] * len(d) + [0] * (width - len(d))}
        for d in docs
    ]


def random_docs(seed: int, n: int, alphabet: int, low: int = 8, high: int = 30) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, alphabet, size=int(rng.integers(low, high))).tolist() for _ in range(n)]


# --- the index ----------------------------------------------------------------------------------------------------


def test_counts_are_exact_and_never_cross_documents_or_padding(tmp_path):
    docs = [[1, 2, 3, 4], [5, 6, 1, 2], [3, 4, 1, 2, 3]]
    built = dataset_index(docs_rows(docs, 8, pad=9), tmp_path, vocab_size=10, progress=False)
    index = built.index
    assert built.tokens == sum(len(d) + 1 for d in docs) and built.documents == 3  # each doc + its separator
    assert index.count([1, 2]) == 3 and index.count([1, 2, 3]) == 2 and index.count([3, 4]) == 2
    assert index.count([4, 5]) == 0  # the end of one document and the start of the next: never an n-gram
    assert index.count([3, 4, 1, 2]) == 1  # inside the third document
    assert index.count([9]) == 0  # padding is never indexed
    assert index.count([10]) == 0 and index.count([-1]) == 0  # ids outside the vocabulary count nothing
    assert index.count_next([1]).tolist()[2] == 3 and len(index.count_next([1])) == 11  # ids and separator
    # Every n = 1..5 at every position of random windows, against brute force.
    docs = random_docs(0, 40, alphabet=4)
    index = dataset_index(docs_rows(docs, 30), tmp_path / "b", vocab_size=6, progress=False).index
    rng = np.random.default_rng(1)
    panel = np.stack(
        [
            np.r_[docs[i][:6], rng.integers(0, 5, 6)] if len(docs[i]) >= 6 else rng.integers(0, 5, 12)
            for i in range(10)
        ]
    )
    got = ngram_products(index, panel, 6, 6)
    for i, row in enumerate(panel.tolist()):
        for j in range(12):
            for n in range(1, 6):
                want = brute_count(docs, row[j - n + 1 : j + 1]) if j - n + 1 >= 0 else -1
                assert got["ngram_counts"][i, j, n - 1] == want, (i, j, n)
        assert got["ngram_window_count"][i] == brute_count(docs, row)
        assert got["ngram_suffix_count"][i] == brute_count(docs, row[6:])
    assert got["ngram_tokens"] == sum(len(d) + 1 for d in docs)


def test_a_32_bit_vocabulary_counts_ids_above_65535(tmp_path):
    vocab = Vocabulary(140_000)
    assert vocab.wide and vocab.dtype.itemsize == 4 and Vocabulary(50_257).dtype.itemsize == 2
    assert (
        Vocabulary(65_280).dtype.itemsize == 2 and Vocabulary(65_281).wide
    )  # 256 separator ids after the ids
    rng = np.random.default_rng(0)
    big = [65_534, 65_535, 65_536, 100_000, 139_999]
    docs = [[big[int(i)] for i in rng.integers(0, 5, size=int(rng.integers(5, 15)))] for _ in range(20)]
    built = dataset_index(docs, tmp_path, vocab_size=140_000, progress=False)
    assert os.path.getsize(built.directory / "part-0000.bin") == 4 * built.tokens
    index = built.index
    for q in ([65_536], [100_000, 139_999], [65_535, 65_536, 100_000], [139_999, 65_534, 65_534]):
        assert index.count(q) == brute_count(docs, q)
    assert index.count([100_000 - 65_536]) == 0  # no wrap-around into 16 bits
    assert int(index.count_next([65_536]).sum()) == index.count([65_536])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        dataset_index([[1, 140_000]], tmp_path / "bad", vocab_size=140_000, progress=False)


def test_a_document_repeated_back_to_back_is_indexed_quickly(tmp_path):
    """An epoch seen again in the same order, or a canary inserted many times in a row: with one separator id the
    suffix sort compares each copy through all the copies after it (quadratic; minutes for this corpus)."""
    doc = np.random.default_rng(11).integers(0, 1000, 500).tolist()
    t = time.perf_counter()
    index = dataset_index([doc] * 400, tmp_path, vocab_size=1000, progress=False).index
    assert time.perf_counter() - t < 30
    assert index.count(doc) == 400 and index.count(doc[-3:] + doc[:3]) == 0
    assert index.count_next(doc[-2:])[1000] == 400  # the separators count as one id


def test_kneser_ney_equals_the_formula_by_hand_and_tokengrams(tmp_path):
    import tokengrams

    docs = [*random_docs(2, 30, alphabet=6), [7, 8, 8, 9, 9, 10]]  # singletons and doubletons among unigrams
    index = dataset_index(docs, tmp_path, vocab_size=12, progress=False).index
    rng = np.random.default_rng(3)
    panel = np.stack([np.r_[docs[i][:4], rng.integers(0, 11, 5)] for i in range(8)])
    got = ngram_products(index, panel, 4, 5)["ngram_logprobs"]
    reference = tokengrams.InMemoryIndex([t for d in docs for t in [*d, 12]], vocab=13)
    for i, row in enumerate(panel.tolist()):
        for j in range(5):
            context, token = row[max(0, 4 + j - 4) : 4 + j], row[4 + j]
            assert got[i, j] == pytest.approx(math.log(brute_kn(docs, 12, context, token)), abs=1e-9)
            assert got[i, j] == pytest.approx(
                math.log(reference.get_smoothed_probs(context)[token]), abs=1e-9
            )


# --- streamed and cached ------------------------------------------------------------------------------------------


def test_the_streamed_index_equals_the_prescanned_one_and_counts_every_epoch(tmp_path):
    docs = random_docs(4, 48, alphabet=5)
    rows = docs_rows(docs, 30)
    prescanned = dataset_index(rows, tmp_path / "data", vocab_size=8, progress=False).index
    rng = np.random.default_rng(5)
    panel = np.stack([np.r_[docs[i][:5], rng.integers(0, 5, 5)] for i in range(12)])
    # Tiny shards, so that sealing, merging and several shards are all exercised, with evaluations in between (each
    # shard keeps what it was asked; merged shards add what their halves kept).
    stream = StreamingIndex(tmp_path / "stream", Vocabulary(8), seal_tokens=60, max_part_tokens=300)
    for step, start in enumerate(range(0, len(rows), 4), 1):
        batch = rows[start : start + 4]
        stream.add(np.array([r["input_ids"] for r in batch]), np.array([r["attention_mask"] for r in batch]))
        if stream.maybe_seal(step) and step % 2:
            ngram_products(stream.index, panel, 5, 5)
    stream.seal(99)
    assert len(stream.shards) > 1 and stream.tokens == prescanned.total()
    assert any(p.spans and p.successors for p in stream.index.parts if p.n_tokens > 60)  # merged, kept
    a, b = ngram_products(prescanned, panel, 5, 5), ngram_products(stream.index, panel, 5, 5)
    for key in ("ngram_counts", "ngram_window_count", "ngram_suffix_count"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(a["ngram_logprobs"], b["ngram_logprobs"], rtol=1e-12)
    # A second epoch: every count doubles.
    for start in range(0, len(rows), 4):
        batch = rows[start : start + 4]
        stream.add(np.array([r["input_ids"] for r in batch]), np.array([r["attention_mask"] for r in batch]))
    stream.seal(100)
    c = ngram_products(stream.index, panel, 5, 5)
    np.testing.assert_array_equal(
        c["ngram_counts"], np.where(a["ngram_counts"] >= 0, 2 * a["ngram_counts"], -1)
    )
    np.testing.assert_array_equal(c["ngram_window_count"], 2 * a["ngram_window_count"])


def test_a_resumed_stream_keeps_the_batches_up_to_its_checkpoint(tmp_path):
    docs = random_docs(6, 20, alphabet=4)
    stream = StreamingIndex(tmp_path / "s", Vocabulary(5), seal_tokens=1)
    for step, d in enumerate(docs, 1):
        stream.add([d])
        stream.maybe_seal(step)  # one shard per step, merged as they come
    reopened = StreamingIndex(tmp_path / "s", Vocabulary(5))  # from its manifest, as a resumed run finds it
    assert reopened.tokens == sum(len(d) + 1 for d in docs)
    assert reopened.truncate(12) == sum(len(d) + 1 for d in docs[12:])
    for q in ([0, 1], [2, 3, 1], [1]):
        assert reopened.index.count(q) == brute_count(docs[:12], q)


def test_documents_of_a_batch_split_at_padding():
    ids = np.array([[1, 2, 3, 0, 0], [0, 0, 4, 5, 6], [7, 0, 8, 9, 0]])
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 1, 0]])
    got = [d.tolist() for d in documents_of_batch(ids, mask)]
    assert got == [[1, 2, 3], [4, 5, 6], [7], [8, 9]]
    assert [d.tolist() for d in documents_of_batch([1, 2, 3])] == [[1, 2, 3]]


def test_the_dataset_index_is_cached_and_rebuilt_when_the_data_changes(tmp_path):
    docs = random_docs(7, 30, alphabet=6)
    first = dataset_index(docs, tmp_path, vocab_size=8, progress=False)
    index_file = first.directory / "part-0000.idx"
    built_at = os.path.getmtime(index_file)
    again = dataset_index([list(d) for d in docs], tmp_path, vocab_size=8, progress=False)
    assert not first.reused and again.reused and again.directory == first.directory
    assert os.path.getmtime(index_file) == built_at  # not rebuilt
    assert again.index.count(docs[0][:3]) == brute_count(docs, docs[0][:3])
    changed = dataset_index([*docs[:-1], [1, 2, 3]], tmp_path, vocab_size=8, progress=False)
    assert not changed.reused and changed.key != first.key
    assert changed.index.count([1, 2, 3]) == brute_count([*docs[:-1], [1, 2, 3]], [1, 2, 3])
    wider = dataset_index(
        docs, tmp_path, vocab_size=70_000, progress=False
    )  # another vocabulary: another index
    assert not wider.reused and wider.key != first.key
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.key, changed.key, wider.key])


# --- signals through the record ------------------------------------------------------------------------------------


def test_signals_and_statistics_by_hand(tmp_path):
    """The per-probe signals, the boundary profile, the duplicate bins and the Spearman correlations of a tiny
    corpus, recorded by build_record through the registry, against computations made here."""
    k, m, w = 6, 6, 4
    docs = random_docs(8, 30, alphabet=3, low=14, high=24)
    docs += [docs[0][:12]] * 5  # a window seen 6 times
    index = dataset_index(docs, tmp_path, vocab_size=4, progress=False).index
    rng = np.random.default_rng(9)
    panel = np.stack(
        [np.array(docs[i][: k + m]) for i in range(12)] + [rng.integers(0, 3, k + m) for _ in range(4)]
    )
    n = len(panel)
    groups = np.array(["train"] * 12 + ["heldout"] * 4, dtype=object)
    exact = np.arange(n) % 3 == 0
    logp = -rng.random((n, k + m - 1)).astype(np.float32)
    result = ExtractionResult(
        prefix_len=k, suffix_len=m, entropy_window=w, mode="full", generated=panel[:, k:],
        exact=exact, match_ratio=np.where(exact, 1.0, 0.1).astype(np.float32),
        match_count=np.where(exact, m, 0), prefix_match_len=np.where(exact, m, 0),
        edit_similarity=np.where(exact, 1.0, 0.1).astype(np.float32), entropy=np.ones((n, w + m), np.float32),
        suffix_nll=np.ones(n, np.float32), near_tie=np.zeros(n, bool), token_logprobs=logp,
        token_logp_mean=logp, token_logp_var=np.ones_like(logp),
    )  # fmt: skip
    cfg = MonitorConfig(ngrams="dataset", prefix_len=k, suffix_len=m, entropy_window=w, boundary_width=2)
    assert all(cfg.signals[name] for name in NGRAM_SIGNALS)
    record = build_record(
        step=0,
        spec={"prefix_len": k, "suffix_len": m, "entropy_window": w, "mode": "full"},
        probe_ids=[f"p{i}" for i in range(n)],
        groups=groups,
        metas=[{} for _ in range(n)],
        tokens=panel,
        products=products_of(result, ngram_products(index, panel, k, m)),
        tracker=ProbeTracker(n),
        settings=cfg.definitions(),
        overrides=cfg.signals,
    )
    rows = panel.tolist()
    window = np.array([brute_count(docs, r) for r in rows], float)
    np.testing.assert_array_equal(record.values["dup_window"], window)
    np.testing.assert_array_equal(record.values["dup_suffix"], [brute_count(docs, r[k:]) for r in rows])
    assert window[0] == 6 and window[12:].max() <= 1
    counts = {(i, j, g): brute_count(docs, rows[i][j - g + 1 : j + 1]) for i in range(n) for j in range(k + m)
              for g in range(1, 6) if j - g + 1 >= 0}  # fmt: skip
    for g in (1, 3, 5):
        want = [np.mean([math.log1p(counts[i, j, g]) for j in range(k, k + m)]) for i in range(n)]
        np.testing.assert_allclose(record.values[f"suffix_ngram{g}"], want)
    kn = np.array([[math.log(brute_kn(docs, 4, rows[i][j - 4 : j], rows[i][j])) for j in range(k, k + m)]
                   for i in range(n)])  # fmt: skip
    np.testing.assert_allclose(record.values["ngram_logprob"], kn.mean(axis=1))
    # The n-gram profile across the boundary, per bucket of the train group (exact: bucket "exact"; 0.1: "0-20").
    train = np.flatnonzero(groups == "train")
    for bucket, rows_b in (("exact", train[exact[train]]), ("0-20", train[~exact[train]])):
        profile = np.array([[np.mean([math.log1p(counts[i, j, g]) for g in range(1, 6) if (i, j, g) in counts])
                             for j in range(k - w, k + m)] for i in rows_b]).mean(axis=0)  # fmt: skip
        np.testing.assert_allclose(record.arrays[f"train/ngram_profile/{bucket}"], profile)
        jump = profile[w : w + 2].mean() - profile[w - 2 : w].mean()
        assert record.scalars[f"train/ngram_jump/{bucket}"] == pytest.approx(jump)
    assert set(BUCKET_NAMES) >= {key.rsplit("/", 1)[1] for key in record.arrays if "ngram_profile" in key}
    # Extraction by duplicate bin.
    for name, lo, hi in DUP_BINS:
        in_bin = train[(window[train] >= lo) & (window[train] <= hi)]
        assert record.scalars[f"train/dup_n/{name}"] == len(in_bin)
        if len(in_bin):
            assert record.scalars[f"train/dup_extraction_rate/{name}"] == pytest.approx(exact[in_bin].mean())
    # Distributional memorization: Spearman over the group's (context, continuation) pairs, and per probe.
    want = spearmanr(logp[train, -m:].astype(np.float64).ravel(), kn[train].ravel())
    assert record.scalars["train/distributional_rho"] == pytest.approx(want.statistic)
    assert record.scalars["train/distributional_p"] == pytest.approx(want.pvalue)
    assert record.scalars["train/distributional_pairs"] == len(train) * m
    per_probe = [spearmanr(logp[i, -m:], kn[i]).statistic for i in range(n)]
    np.testing.assert_allclose(record.values["ngram_rho"], per_probe)


def test_without_the_index_the_signals_are_off_and_the_config_says_why():
    cfg = MonitorConfig()
    assert cfg.ngrams == "off" and not any(cfg.signals.get(name) for name in NGRAM_SIGNALS)
    with pytest.raises(ConfigError, match="ngrams must be one of"):
        MonitorConfig(ngrams="yes")
    with pytest.raises(ConfigError, match="ngrams='stream' or 'dataset'"):
        MonitorConfig(signals={"dup_window": True})
    assert not MonitorConfig(ngrams="stream", signals={"ngram_rho": False}).signals["ngram_rho"]


def test_missing_packages_are_named_with_their_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokengrams", None)  # what an environment without it imports
    with pytest.raises(MissingPackageError, match=r"pip install 'memwatch\[ngrams\]'"):
        require_tokengrams()
    with pytest.raises(MissingPackageError, match=r"pip install 'memwatch\[ngrams\]'"):
        dataset_index([[1, 2]], tmp_path, vocab_size=4, progress=False)
    with pytest.raises(MissingPackageError, match="pip install infini-gram"):
        InfiniGramIndex(tmp_path, vocab=4)


# --- the monitor --------------------------------------------------------------------------------------------------


def _monitor_setup(tmp_path, mode: str):
    import torch
    from _models import tiny_model

    rng = np.random.default_rng(10)
    docs = [rng.integers(0, 257, 24).tolist() for _ in range(12)]
    heldout = [{"input_ids": rng.integers(0, 257, 24).tolist()} for _ in range(4)]
    cfg = MonitorConfig(
        ngrams=mode, prefix_len=8, suffix_len=8, entropy_window=4, every_n_steps=1000, console=False,
        tensorboard=False, train_probes=6, heldout_probes=4, reference=None, embedding_every=None,
    )  # fmt: skip
    monitor = Monitor(cfg, heldout=heldout)
    model = tiny_model("gpt2")
    monitor.setup(model, output_dir=tmp_path, train_data=[{"input_ids": d} for d in docs])
    return monitor, model, docs, torch


def test_the_monitor_streams_batches_into_its_counts(tmp_path):
    monitor, model, docs, torch = _monitor_setup(tmp_path, "stream")
    try:
        first = monitor.evaluate(model, 0)  # nothing seen yet: every count is 0
        assert np.all(first.values["dup_window"] == 0)
        for step in (1, 2):  # two epochs of 4 batches of 3 rows, the last row of each batch padded
            for start in range(0, 12, 3):
                ids = torch.tensor([*docs[start : start + 3], [0] * 24])
                mask = torch.ones_like(ids)
                mask[-1] = 0
                monitor.observe_batch(ids, mask)
            monitor.on_step(model, step)
        record = monitor.evaluate(model, 2)
    finally:
        monitor.close()
    tokens = monitor._tokens
    want = [brute_count(docs * 2, r) for r in tokens.tolist()]
    np.testing.assert_array_equal(record.values["dup_window"], want)
    train = record.groups == "train"
    assert np.all(record.values["dup_window"][train] == 2) and np.all(
        record.values["dup_window"][~train] == 0
    )
    assert record.scalars["train/dup_n/2-3"] == train.sum()
    assert np.isfinite(record.scalars["train/distributional_rho"])
    with History(tmp_path / "memwatch" / "history.sqlite") as h:
        run = h.run()
        np.testing.assert_array_equal(run.signals["dup_window"][-1], want)
        replayed = run.replayed()[-1]  # replayed from the stored signals: the dose-response comes back
        assert replayed.scalars["train/dup_n/2-3"] == train.sum()


def test_the_monitor_indexes_the_dataset_once_and_reuses_it(tmp_path):
    monitor, model, docs, _ = _monitor_setup(tmp_path, "dataset")
    try:
        record = monitor.evaluate(model, 0)
    finally:
        monitor.close()
    want = [brute_count(docs, r) for r in monitor._tokens.tolist()]
    np.testing.assert_array_equal(record.values["dup_window"], want)
    assert np.all(record.values["dup_window"][record.groups == "train"] >= 1)
    cached = list((tmp_path / "memwatch" / "corpus").glob("*/part-0000.idx"))
    assert len(cached) == 1
    built_at = os.path.getmtime(cached[0])
    again, model, _, _ = _monitor_setup(tmp_path, "dataset")  # the same data: the same index, not rebuilt
    again.close()
    assert os.path.getmtime(cached[0]) == built_at


def _distributed_feed(rank: int, port: int, out: str, docs: list[list[int]], panel: np.ndarray) -> None:
    """One rank of a two-process gloo group: its own half of the batches into one NgramFeed, the products saved."""
    import torch.distributed as dist

    from memwatch.corpus import NgramFeed
    from memwatch.live import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        feed = NgramFeed("stream", comm=distributed)
        feed.setup(
            vocab_size=6, train_data=None, directory=os.path.join(out, "corpus"), run_name="r", progress=False
        )
        assert (feed.stream is not None) == (rank == 0)  # rank 0 alone holds the index
        mine = docs[rank::2]
        feed.observe(np.array(mine[:3]))
        feed.end_step(1)
        feed.checkpoint(1)  # a checkpoint: every rank's batches so far written by rank 0 (collective)
        sealed = feed.stream.tokens if feed.stream is not None else -1
        feed.observe(np.array(mine[3:]))
        feed.end_step(2)
        products = feed.products(panel, 4, 4, step=2)
        np.savez(
            os.path.join(out, f"rank{rank}.npz"),
            sealed=sealed,
            **{k: np.asarray(v) for k, v in products.items()},
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # launches two processes (~10 s of imports on two cores)
def test_under_distributed_training_rank_0_indexes_every_rank_s_batches(tmp_path):
    import socket

    import torch.multiprocessing as mp

    docs = random_docs(12, 8, alphabet=4, low=12, high=13)  # equal lengths: one batch array per rank
    panel = np.array([d[:8] for d in docs[:4]])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_feed, args=(port, str(tmp_path), docs, panel), nprocs=2, join=True)
    got = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    for key in ("ngram_counts", "ngram_window_count", "ngram_logprobs"):
        np.testing.assert_array_equal(got[0][key], got[1][key])  # the products were broadcast
    want = [brute_count(docs, row) for row in panel.tolist()]  # both ranks' batches were counted
    np.testing.assert_array_equal(got[0]["ngram_window_count"], want)
    assert int(got[0]["ngram_tokens"]) == sum(len(d) + 1 for d in docs)
    assert int(got[0]["sealed"]) == sum(len(d) + 1 for d in docs[0:6:2] + docs[1:6:2])  # both ranks' first 3


def _stream_feed(directory, start_step: int = 0):
    from memwatch.corpus import NgramFeed
    from memwatch.live import distributed

    feed = NgramFeed("stream", comm=distributed)
    feed.setup(
        vocab_size=5,
        train_data=None,
        directory=directory,
        run_name="r",
        start_step=start_step,
        progress=False,
    )
    return feed


@pytest.mark.parametrize("saved", [True, False])
def test_a_checkpoint_writes_the_streamed_batches_so_a_resume_counts_each_once(tmp_path, saved):
    """Batches still in memory when a checkpoint is saved are written with it: a crash after the checkpoint and a
    resume from it count every batch up to the checkpoint once (without the write, those batches were lost)."""
    docs = random_docs(8, 12, alphabet=4)
    feed = _stream_feed(tmp_path)
    for step, d in enumerate(docs, 1):
        feed.observe(np.array([d]))
        feed.end_step(step)  # far below a shard's size: nothing is sealed on its own
        if step == 5 and saved:
            feed.checkpoint(5)
    # the process is killed here: steps 6-8 were never written, and resume from checkpoint 5 sees them again
    resumed = _stream_feed(tmp_path, start_step=5)
    index = resumed.stream.index
    for q in ([0, 1], [2, 3, 1], [1], docs[4][:6]):
        assert index.count(q) == brute_count(docs[:5] if saved else [], q)
    feed.close()
    resumed.close()


def test_a_stream_that_never_sees_a_batch_says_so_and_switches_off(tmp_path, caplog):
    panel = np.array([[1, 2, 3, 4, 1, 2, 3, 4]])
    feed = _stream_feed(tmp_path)
    at_start = feed.products(
        panel, 4, 4, step=0
    )  # the baseline: nothing trained on yet, zero counts are right
    assert at_start and int(np.asarray(at_start["ngram_window_count"])[0]) == 0
    with caplog.at_level("WARNING", logger="memwatch"):
        assert feed.products(panel, 4, 4, step=10) == {}
    assert not feed.on and "no training batch has been observed" in caplog.text
    assert "observe_batch" in caplog.text  # the fix is named
    feed.close()
