"""The training-data n-gram index: build and query throughput, memory and disk per token, cost per evaluation."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from memwatch.corpus import (
    CorpusIndex,
    StreamingIndex,
    Vocabulary,
    dataset_index,
    ngram_products,
    window_counts,
)
from memwatch.corpus.index import _quiet_stdout
from memwatch.corpus.stats import MAX_ORDER, kneser_ney_logprobs
from memwatch.corpus.stream import SEAL_TOKENS

__all__ = ["main", "synthetic_corpus"]

VOCAB = 50_257  # GPT-2 / Pythia-sized ids: 16-bit token files


def synthetic_corpus(tokens: int, seed: int = 0) -> list[np.ndarray]:
    """Documents of ~512 tokens made of phrases (1-8 tokens, ids Zipf-distributed over VOCAB) drawn Zipf-wise from a
    table of 200k phrases, and 5% of the documents repeated a Zipf number of times: text-like n-gram statistics
    (frequent short n-grams, rare long ones, heavy-tailed duplicates) without a data set to download."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 9, 200_000)
    ids = (rng.zipf(1.1, int(lengths.sum())) - 1) % VOCAB
    phrases = np.split(ids, np.cumsum(lengths)[:-1])
    docs: list[np.ndarray] = []
    total = 0
    while total < tokens:
        picks = (rng.zipf(1.2, 120) - 1) % len(phrases)
        doc = np.concatenate([phrases[i] for i in picks])[:512]
        copies = int(min(rng.zipf(1.5), 200)) if rng.random() < 0.05 else 1
        for _ in range(copies):
            docs.append(doc)
            total += len(doc) + 1
    return docs


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is this phase's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _panel(docs: list[np.ndarray], n: int, k: int, m: int, seed: int) -> np.ndarray:
    """n windows of k + m tokens: half from training documents (their first window), half unseen (random ids)."""
    rng = np.random.default_rng(seed)
    long = [d for d in docs if len(d) >= k + m]
    train = [long[int(i)][: k + m] for i in rng.choice(len(long), n // 2, replace=False)]
    unseen = [(rng.zipf(1.1, k + m) - 1) % VOCAB for _ in range(n - n // 2)]
    return np.stack(train + unseen).astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--tokens", type=float, default=10e6, help="training tokens (10e6 default; 100e6 for scale)"
    )
    parser.add_argument("--probes", type=int, default=768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--baseline-contexts", type=int, default=20, help="tokengrams KN distributions timed")
    parser.add_argument("--dir", default=None, help="where the index files go (default: a temporary folder)")
    args = parser.parse_args(argv)
    target = int(args.tokens)
    k, m = args.k, args.m
    work = Path(args.dir or tempfile.mkdtemp(prefix="memwatch-ngrams-"))
    print(f"$ python benchmarks/ngrams.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(
        f"cpu cores {os.cpu_count()}, tokens {target:,}, panel {args.probes} x (k={k} + m={m}), vocab {VOCAB}"
    )

    t = time.perf_counter()
    docs = synthetic_corpus(target)
    n_tokens = sum(len(d) + 1 for d in docs)
    print(
        f"synthetic corpus: {len(docs):,} documents, {n_tokens:,} tokens with separators ({time.perf_counter() - t:.1f}s)"
    )

    rows: list[tuple[str, str]] = []
    # --- build: memwatch's dataset index against tokengrams' sort of the same token file alone (the floor) --------
    rss0 = _rss()
    _reset_peak()
    t = time.perf_counter()
    built = dataset_index(docs, work / "corpus", VOCAB, progress=False)
    build_s = time.perf_counter() - t
    build_peak = _peak_rss() - rss0
    part = built.index.parts[0]
    import tokengrams

    floor_dir = work / "floor"
    floor_dir.mkdir()
    shutil.copy(part.tokens_path, floor_dir / "t.bin")
    t = time.perf_counter()
    with _quiet_stdout():
        tokengrams.MemmapIndex.build(
            str(floor_dir / "t.bin"), str(floor_dir / "t.idx"), vocab=Vocabulary(VOCAB).vocab
        )
    floor_s = time.perf_counter() - t
    shutil.rmtree(floor_dir)
    t = time.perf_counter()
    again = dataset_index(docs, work / "corpus", VOCAB, progress=False)
    reuse_s = time.perf_counter() - t
    assert again.reused
    disk = _disk(built.directory)
    rows += [
        ("dataset index build", f"{n_tokens / build_s / 1e6:.2f} M tokens/s ({build_s:.1f}s)"),
        (
            "  tokengrams sort alone (floor)",
            f"{n_tokens / floor_s / 1e6:.2f} M tokens/s; build / floor {build_s / floor_s:.2f}x",
        ),
        ("  cache hit (hash pass, no build)", f"{reuse_s:.1f}s = {reuse_s / build_s:.2f}x of the build"),
        ("disk", f"{disk / n_tokens:.2f} bytes/token ({disk / 2**20:.0f} MiB)"),
        (
            "peak memory while building",
            f"{build_peak / n_tokens:.2f} bytes/token above the process before it",
        ),
    ]

    # --- queries ------------------------------------------------------------------------------------------------
    index = built.index
    rss_before = _rss()
    index.count([1])  # opens the shard (in memory up to 2^24 tokens, memory-mapped above)
    rows.append(("index resident after opening", f"{(_rss() - rss_before) / n_tokens:.2f} bytes/token"))
    flat = np.concatenate([np.r_[d, VOCAB] for d in docs[:20000]])
    rng = np.random.default_rng(1)
    for n in (1, 3, 5, 32):
        starts = rng.integers(0, len(flat) - n, 20_000)
        queries = [flat[s : s + n].tolist() for s in starts if VOCAB not in flat[s : s + n]][:10_000]
        t = time.perf_counter()
        index.batch_count(queries)
        dt = time.perf_counter() - t
        rows.append((f"count, {n}-grams of the corpus", f"{len(queries) / dt / 1e3:.0f} k queries/s"))
    unseen = [((rng.zipf(1.1, 5) - 1) % VOCAB).tolist() for _ in range(10_000)]
    t = time.perf_counter()
    index.batch_count(unseen)
    rows.append(("count, unseen 5-grams", f"{len(unseen) / (time.perf_counter() - t) / 1e3:.0f} k queries/s"))
    contexts = [
        flat[s : s + 2].tolist() for s in rng.integers(0, len(flat) - 2, 1000) if VOCAB not in flat[s : s + 2]
    ]
    t = time.perf_counter()
    index.distinct_next(contexts)
    rows.append(
        ("N1+ (distinct next), 2-token contexts", f"{len(contexts) / (time.perf_counter() - t):.0f} /s")
    )

    # --- one evaluation of a panel ------------------------------------------------------------------------------
    panel = _panel(docs, args.probes, k, m, seed=2)

    def fresh() -> CorpusIndex:
        """The index opened anew (a cache hit): shards that have kept nothing yet."""
        return dataset_index(docs, work / "corpus", VOCAB, progress=False).index

    cold = fresh()
    cold.count([1])  # opened before the clock
    t = time.perf_counter()
    counts = window_counts(cold, panel, MAX_ORDER)
    counts_s = time.perf_counter() - t
    t = time.perf_counter()
    kn = kneser_ney_logprobs(cold, panel, counts, k, m)
    kn_s = time.perf_counter() - t
    cold = fresh()
    cold.count([1])
    t = time.perf_counter()
    products = ngram_products(cold, panel, k, m)
    products_s = time.perf_counter() - t
    t = time.perf_counter()
    ngram_products(cold, panel, k, m)
    warm_s = time.perf_counter() - t
    assert np.allclose(products["ngram_logprobs"], kn)
    # Baseline: tokengrams' own Kneser-Ney distributions (a [vocab] vector per suffix token), timed on a sample.
    sample = [
        (i, j) for i in range(0, args.probes, max(1, args.probes // args.baseline_contexts)) for j in (k,)
    ]
    sample = sample[: args.baseline_contexts]
    t = time.perf_counter()
    for i, j in sample:
        part.index.get_smoothed_probs(panel[i, j - MAX_ORDER + 1 : j].tolist())
    per_context = (time.perf_counter() - t) / len(sample)
    baseline_s = per_context * args.probes * m
    rows += [
        (f"panel of {args.probes}: window counts (n=1..5, all k+m positions)", f"{counts_s:.2f}s"),
        (f"panel of {args.probes}: Kneser-Ney log p of the {m} suffix tokens", f"{kn_s:.2f}s"),
        (
            f"panel of {args.probes}: every product (counts, duplicates, KN)",
            f"{products_s:.2f}s the first time; {warm_s:.2f}s again (each shard keeps the panel's counts)",
        ),
        (
            "  tokengrams get_smoothed_probs for the same tokens (baseline)",
            f"{baseline_s:.0f}s extrapolated from {len(sample)} ({per_context * 1e3:.0f} ms each); "
            f"baseline / memwatch KN {baseline_s / max(kn_s, 1e-9):.0f}x",
        ),
    ]

    # --- streamed: the same tokens as batches, sealed every SEAL_TOKENS, plus one evaluation after new batches --------
    stream = StreamingIndex(work / "stream", Vocabulary(VOCAB))
    t = time.perf_counter()
    step = 0
    for start in range(0, len(docs), 8):  # batches of 8 documents, one optimizer step each
        step += 1
        stream.add_documents(docs[start : start + 8])
        stream.maybe_seal(step)
    stream.seal(step)
    stream_s = time.perf_counter() - t
    run_shards = len(stream.shards)
    t = time.perf_counter()
    stream_products = ngram_products(stream.index, panel, k, m)
    stream_eval_s = time.perf_counter() - t
    assert np.array_equal(stream_products["ngram_counts"], products["ngram_counts"])
    # The next evaluation, after ~1% more tokens: only the new shard is asked (merged shards add what they kept).
    more = docs[: max(1, len(docs) // 100)]
    new_tokens = sum(len(d) + 1 for d in more)
    stream.add_documents(more)
    t = time.perf_counter()
    stream.seal(step + 1)
    seal_s = time.perf_counter() - t
    t = time.perf_counter()
    ngram_products(stream.index, panel, k, m)
    next_eval_s = time.perf_counter() - t
    rows += [
        (
            "streamed index (batches of 8 documents, sealed every "
            f"{SEAL_TOKENS / 2**20:.0f}Mi tokens, merged)",
            f"{n_tokens / stream_s / 1e6:.2f} M tokens/s over the run ({stream_s:.1f}s), {run_shards} shard(s)",
        ),
        (
            f"  panel of {args.probes} on the streamed index, first time",
            f"{stream_eval_s:.2f}s (counts = pre-scanned)",
        ),
        (
            f"  the next evaluation, after {new_tokens:,} new tokens",
            f"{seal_s:.2f}s sealing + {next_eval_s:.2f}s counting ({len(stream.shards)} shard(s))",
        ),
    ]
    print()
    print("| measure | result |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
