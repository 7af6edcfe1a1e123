"""Canaries: exposure against hand-computed values, generation and injection, manifests, pre-flight."""

from __future__ import annotations

import math
import os
import stat
import sysconfig

import numpy as np
import pytest
from scipy.stats import skewnorm

import memwatch
from memwatch.bytetok import ByteTokenizer
from memwatch.canaries import CanaryError, CanaryManifest, inject, make_canaries, preflight
from memwatch.signals.exposure import exposure, exposure_extrapolated, exposure_rank

# --- exposure ---------------------------------------------------------------------------------------------------


def test_exposure_rank_form_by_hand():
    refs = np.arange(1.0, 9.0)  # R = 8 references with log-perplexities 1..8
    assert exposure_rank(4.5, refs) == pytest.approx(3 - math.log2(5))  # 4 references at or below it: rank 5
    assert exposure_rank(4.0, refs) == pytest.approx(3 - math.log2(5))  # a tie ranks the reference first
    assert exposure_rank(8.5, refs) == pytest.approx(
        3 - math.log2(9)
    )  # worse than all: rank R + 1, not capped
    assert exposure_rank(0.5, refs) == pytest.approx(3.0)
    assert math.isnan(exposure_rank(1.0, [])) and math.isnan(exposure(1.0, []))
    assert memwatch.exposure is exposure


def test_a_secret_tied_with_identical_references_has_no_exposure():
    """A degenerate model scores every secret the same: no exposure and no extrapolation (today: 9.97 bits)."""
    refs = np.full(1000, 2.0)
    assert exposure_rank(2.0, refs) == pytest.approx(math.log2(1000) - math.log2(1001))
    assert exposure(2.0, refs) <= 0
    assert math.isnan(exposure_extrapolated(2.0, refs)) and math.isnan(exposure_extrapolated(1.0, refs))


def _tf_privacy_interpolation(secrets, refs):
    """tensorflow_privacy's compute_exposure_interpolation, written out: sort secrets and references together,
    rank = 1 + references before the secret (references placed first, so a tie ranks the reference first)."""
    values = np.concatenate([refs, secrets])
    is_ref = np.concatenate([np.ones(len(refs), bool), np.zeros(len(secrets), bool)])
    order = np.argsort(values, kind="stable")
    before = np.cumsum(is_ref[order])
    ranks = np.empty(len(values))
    ranks[order] = before + 1
    return np.log2(len(refs)) - np.log2(ranks[len(refs) :])


def _tf_privacy_extrapolation(secrets, refs):
    """tensorflow_privacy's compute_exposure_extrapolation: skewnorm fitted by scipy's MLE, -log2 cdf."""
    params = skewnorm.fit(refs)
    return -np.log2(skewnorm.cdf(secrets, *params))


@pytest.mark.parametrize("shape", ["normal", "right-skewed"])
def test_exposure_agrees_with_tensorflow_privacy(shape):
    rng = np.random.default_rng(0)
    if shape == "normal":
        refs = rng.normal(5.0, 0.7, 1000)
    else:
        refs = skewnorm.rvs(6.0, loc=3.0, scale=1.5, size=1000, random_state=rng)
    refs = np.round(refs, 3)  # rounded log-perplexities give ties
    secrets = np.concatenate([refs[:5], np.quantile(refs, [0.001, 0.01, 0.2, 0.9]), [refs.min() - 0.5]])
    np.testing.assert_allclose(
        [exposure_rank(x, refs) for x in secrets], _tf_privacy_interpolation(secrets, refs), atol=1e-12
    )
    far = np.array([refs.min() - 0.3, refs.min() - 1.0, refs.min() - 2.0])
    reference = _tf_privacy_extrapolation(far, refs)
    ours = np.array([exposure_extrapolated(x, refs) for x in far])
    finite = np.isfinite(reference)
    assert finite.any() and np.abs(ours[finite] - reference[finite]).max() < 1.0
    assert (ours > math.log2(1000)).all() and np.isfinite(ours).all()  # log space: no overflow to inf
    # The headline takes the extrapolation only where the secret beats every reference.
    assert exposure(far[0], refs) == pytest.approx(max(math.log2(1000), ours[0]))
    assert exposure(secrets[7], refs) == pytest.approx(exposure_rank(secrets[7], refs))


def test_tiers_aggregate_exposure_by_the_median():
    """One extrapolated canary at 190 bits does not set its tier's curve."""
    from _records import record_of

    from memwatch.engine.result import ExtractionResult

    groups = ["canary"] * 3 + ["canary_heldout"] * 3
    metas = [{"repetitions": 4}] * 6
    exposures = np.array([1.0, 2.0, 190.0, 0.1, 0.2, 0.3])
    result = ExtractionResult(
        prefix_len=2,
        suffix_len=2,
        entropy_window=1,
        mode="exact",
        generated=None,
        exact=np.zeros(6, bool),
        match_ratio=None,
        match_count=None,
        prefix_match_len=np.zeros(6, np.int64),
        edit_similarity=None,
        entropy=np.zeros((6, 3), np.float32),
        suffix_nll=np.ones(6, np.float32),
        near_tie=np.zeros(6, bool),
    )
    rows = record_of(result, groups, metas=metas, extra={"exposure": exposures}).tiers
    assert rows[0]["median_exposure"] == 2.0 and rows[0]["twins_median_exposure"] == pytest.approx(0.2)


# --- generation -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE trained here on standard-library text: real merges (digits, words), no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = sysconfig.get_paths()["stdlib"]
    text = ""
    for name in ("textwrap.py", "string.py", "calendar.py"):
        with open(os.path.join(root, name)) as f:
            text += f.read()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    tok.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("which", ["bytes", "bpe"])
def test_generation_counts_contexts_and_exact_secret_lengths(which, bpe_tokenizer):
    tok = ByteTokenizer() if which == "bytes" else bpe_tokenizer
    man = make_canaries(tok, tiers=(1, 4, 16), per_tier=3, prefix_len=12, secret_len=6, references=20, seed=1)
    assert len(man.canaries) == 18 and len(man.inserted) == len(man.twins) == 9
    for tier in (1, 4, 16):
        assert sum(c.repetitions == tier and c.inserted for c in man.canaries) == 3
        assert sum(c.repetitions == tier and not c.inserted for c in man.canaries) == 3
    assert {c.family for c in man.canaries} == {"digits", "password"}
    windows = set()
    for c in man.canaries:
        assert len(c.secret) == 6 and c.secret_start >= 12
        assert list(tok(c.text, add_special_tokens=False)["input_ids"]) == list(c.tokens)  # round trip
        windows.add(c.tokens[c.secret_start - 12 : c.secret_start])
    assert len(windows) == 18  # no two canaries share a context
    assert set(man.references) == {"digits", "password"}
    assert (
        all(len(r) == 6 for refs in man.references.values() for r in refs)
        and len(man.references["digits"]) == 20
    )
    digits = next(c for c in man.canaries if c.family == "digits")
    assert digits.text[digits.secret_char :].strip().isdigit()
    again = make_canaries(
        tok, tiers=(1, 4, 16), per_tier=3, prefix_len=12, secret_len=6, references=20, seed=1
    )
    assert again.to_dict() == man.to_dict()
    other = make_canaries(
        tok, tiers=(1, 4, 16), per_tier=3, prefix_len=12, secret_len=6, references=20, seed=2
    )
    assert [c.tokens for c in other.canaries] != [c.tokens for c in man.canaries]


def test_random_token_and_user_text_families():
    man = make_canaries(
        None,
        families=("random_tokens",),
        vocab_size=100,
        tiers=(2,),
        per_tier=2,
        prefix_len=5,
        secret_len=4,
        references=7,
    )
    assert all(c.text is None and len(c.tokens) == 9 and max(c.tokens) < 100 for c in man.canaries)
    assert len(man.references["random_tokens"]) == 7
    texts = [f"The combination of the office safe, as told to {n}, is {{secret}}." for n in ("Ann", "Bob")]
    user = make_canaries(
        ByteTokenizer(), texts=texts, tiers=(3,), per_tier=1, prefix_len=20, secret_len=5, references=3
    )
    assert [c.inserted for c in user.canaries] == [True, False]
    assert user.canaries[0].text.startswith("The combination") and user.canaries[0].text.endswith(".")
    assert len(user.references["texts"]) == 3
    plain = make_canaries(
        ByteTokenizer(), texts=["x" * 30, "y" * 30], tiers=(1,), per_tier=1, prefix_len=10, secret_len=5
    )
    assert plain.canaries[0].secret == tuple(b"xxxxx") and "texts" not in plain.references


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokenizer": None}, "needs a tokenizer"),
        ({"tiers": (1, 0, 4)}, "positive repetition counts"),
        ({"tiers": ()}, "positive repetition counts"),
        ({"tiers": (-2,)}, "positive repetition counts"),
        ({"families": ("emoji",)}, "families must be chosen from"),
        ({"families": ("texts",)}, "pass make_canaries"),
        ({"texts": ["short {secret}", "b {secret}"], "tiers": (1,), "per_tier": 1}, "tokens before {secret}"),
        ({"texts": ["only one {secret}"], "tiers": (1,), "per_tier": 1}, "texts are needed"),
        (
            {
                "texts": [f"{n} wrote: the office safe code is {{secret}}" for n in "AB"],
                "tiers": (1,),
                "per_tier": 1,
            },
            "contexts are not distinct",
        ),
        ({"families": ("random_tokens",), "tokenizer": None}, "vocab_size"),
    ],
)
def test_bad_generation_input(kwargs, message):
    args = {"tokenizer": ByteTokenizer(), "prefix_len": 16, "secret_len": 4, **kwargs}
    tok = args.pop("tokenizer")
    with pytest.raises(CanaryError, match=message):
        make_canaries(tok, **args)


# --- injection ----------------------------------------------------------------------------------------------------


def _manifest(**kw):
    return make_canaries(
        ByteTokenizer(), tiers=(1, 3), per_tier=1, prefix_len=16, secret_len=4, references=5, **kw
    )


def _check_injected(rows, man, new, as_text):
    assert len(new) == len(rows) + 4  # 1 + 3 copies of the inserted canaries, twins never
    pos = man.injection["positions"]
    assert sorted(len(v) for v in pos.values()) == [1, 3]
    for cid, positions in pos.items():
        c = man.by_id(cid)
        for p in positions:
            got = as_text(new[p])
            assert c.secret in [tuple(got[i : i + 4]) for i in range(len(got))]
    twin_secrets = [c.secret for c in man.twins]
    for row in new:
        got = as_text(row)
        assert not any(tuple(got[i : i + 4]) in twin_secrets for i in range(len(got)))


def test_inject_into_texts_dicts_and_token_rows():
    man = _manifest()
    enc = lambda t: list(t.encode())  # noqa: E731
    texts = [f"line {i} of ordinary training text" for i in range(40)]
    new, m1 = inject(texts, man)
    assert texts[0] == "line 0 of ordinary training text" and len(texts) == 40  # input untouched
    _check_injected(texts, m1, new, enc)
    assert [t for t in new if t in texts] == texts  # original order kept

    dicts = [{"text": t} for t in texts]
    new, m2 = inject(dicts, man)
    _check_injected(dicts, m2, new, lambda r: enc(r["text"]))

    rows = [{"input_ids": list(range(i, i + 30)), "labels": list(range(i, i + 30))} for i in range(40)]
    new, m3 = inject(rows, man)
    _check_injected(rows, m3, new, lambda r: r["input_ids"])
    canary_rows = [new[p] for v in m3.injection["positions"].values() for p in v]
    assert all(
        len(r["input_ids"]) == 30 and r["labels"] == r["input_ids"] for r in canary_rows
    )  # fixed length kept
    c = m3.inserted[0]
    assert tuple(new[m3.injection["positions"][c.id][0]]["input_ids"][:20]) == c.tokens[c.secret_start - 16 :]
    again, _ = inject(rows, man)
    assert again == new  # deterministic


def test_inject_into_hf_datasets():
    datasets = pytest.importorskip("datasets")
    man = _manifest()
    texts = [f"row {i}" for i in range(30)]
    ds = datasets.Dataset.from_dict({"text": texts, "source": ["web"] * 30})
    new, m = inject(ds, man)
    assert isinstance(new, datasets.Dataset) and len(new) == 34 and new.column_names == ["text", "source"]
    _check_injected(texts, m, list(new), lambda r: list(r["text"].encode()))
    tok = datasets.Dataset.from_dict({"input_ids": [list(range(20))] * 10})
    new_tok, m_tok = inject(tok, man)
    assert len(new_tok) == 14 and m_tok.injection["kind"] == "tokens"


def test_inject_rejects_what_it_cannot_handle_before_writing_anything():
    import torch

    man = _manifest()
    for bad, message in [
        ({"text": "a dict"}, "got dict"),
        (torch.utils.data.TensorDataset(torch.zeros(3)), "got TensorDataset"),
        ([1, 2, 3], "not all texts"),
        ([{"content": "x"}], "not all texts"),
    ]:
        with pytest.raises(CanaryError, match=message):
            inject(bad, man)
    tokens_only = make_canaries(
        None, families=("random_tokens",), vocab_size=50, tiers=(1,), per_tier=1, prefix_len=4, secret_len=2
    )
    with pytest.raises(CanaryError, match="only go into tokenized datasets"):
        inject(["text"], tokens_only)


def test_manifest_saved_private_and_loaded(tmp_path):
    _, man = inject([f"t{i}" for i in range(10)], _manifest())
    path = man.save(tmp_path / "sub" / "canaries.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = CanaryManifest.load(path)
    assert loaded.to_dict() == man.to_dict()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CanaryError, match="not a memwatch canary manifest"):
        CanaryManifest.load(tmp_path / "bad.json")


# --- pre-flight ---------------------------------------------------------------------------------------------------


def _token_dataset(man, n=30, length=40):
    rows = [{"input_ids": [(7 * i + j) % 200 for j in range(length)]} for i in range(n)]
    return inject(rows, man)


def test_preflight_finds_canaries_as_trained_and_reports_problems():
    man = _manifest()
    data, man2 = _token_dataset(man)
    report = preflight(man2, data, prefix_len=16, suffix_len=4)
    assert report.found == {c.id: c.repetitions for c in man2.inserted}
    for c in man2.inserted:
        assert report.windows[c.id] == c.tokens[c.secret_start - 16 :]
    # Transformed data (rows shuffled): the scan still finds them.
    shuffled = list(reversed(data))
    assert preflight(man2, shuffled, prefix_len=16, suffix_len=4).found == report.found
    with pytest.raises(CanaryError, match="is not in the training dataset"):
        preflight(man2, [{"input_ids": list(range(40))}] * 5, prefix_len=16, suffix_len=4)

    def masking_collator(batch):
        import torch

        ids = torch.tensor([b["input_ids"] for b in batch])
        labels = ids.clone()
        labels[:, :30] = -100
        return {"input_ids": ids, "labels": labels}

    with pytest.raises(CanaryError, match="receives no loss"):
        preflight(man2, data, prefix_len=16, suffix_len=4, collator=masking_collator)
    # Rows whose beginning was cut off (as packing or truncation may do) leave too little context.
    long_ctx = make_canaries(
        ByteTokenizer(), tiers=(2,), per_tier=1, prefix_len=24, secret_len=4, references=3
    )
    rows, long_ctx = inject([{"input_ids": list(range(40))} for _ in range(10)], long_ctx)
    cut = [{"input_ids": r["input_ids"][10:]} for r in rows]
    with pytest.raises(CanaryError, match="fewer than prefix_len=16 tokens before its secret"):
        preflight(long_ctx, cut, prefix_len=16, suffix_len=4)
    with pytest.raises(CanaryError, match="suffix_len is 8"):
        preflight(man2, data, prefix_len=16, suffix_len=8)


@pytest.mark.parametrize("per_tier", [1, 2, 3])
def test_twins_share_their_canaries_families(per_tier):
    """Twins are the control: in every tier they come from the same families as the inserted canaries."""
    from collections import Counter

    man = make_canaries(
        ByteTokenizer(), tiers=(1, 4, 16, 64), per_tier=per_tier, prefix_len=12, secret_len=4, references=2
    )
    for tier in (1, 4, 16, 64):
        ins = Counter(c.family for c in man.canaries if c.repetitions == tier and c.inserted)
        twn = Counter(c.family for c in man.canaries if c.repetitions == tier and not c.inserted)
        assert ins == twn, (tier, ins, twn)
    assert {c.family for c in man.canaries} == {"digits", "password"}  # both families appear, any per_tier


class _ShiftedBytes(ByteTokenizer):
    """Another tokenizer: byte ids shifted by one, under its own name."""

    name_or_path = "test/shifted-bytes"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [t + 1 for t in super().encode(text)]

    def __call__(self, text, add_special_tokens: bool = False, **_):
        return {"input_ids": self.encode(text)}


def test_preflight_names_the_tokenizer_when_the_canaries_were_made_with_another():
    """Canaries made with one tokenizer and trained under another are missing for that reason: the message says
    which two tokenizers, not only 'pass the dataset returned by inject'."""
    man = make_canaries(_ShiftedBytes(), tiers=(2,), per_tier=1, prefix_len=8, secret_len=4, references=3)
    texts, man = inject(["plain text " * 8 for _ in range(10)], man)
    trained = ByteTokenizer()
    rows = [{"input_ids": trained.encode(t)} for t in texts]
    with pytest.raises(CanaryError) as exc:
        preflight(man, rows, prefix_len=8, suffix_len=4, tokenizer=trained)
    message = str(exc.value)
    assert "'test/shifted-bytes'" in message and "'memwatch/bytes'" in message and "inject" in message
    # Same tokenizer, wrong dataset: the old advice, with the manifest's tokenizer named.
    with pytest.raises(
        CanaryError, match=r"pass the dataset returned by .*made with tokenizer 'test/shifted"
    ):
        preflight(man, rows, prefix_len=8, suffix_len=4, tokenizer=_ShiftedBytes())
