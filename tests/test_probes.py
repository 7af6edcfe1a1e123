"""Probes and panels: ids, deterministic sampling with a private RNG, windows in trained tokens only."""

import itertools
import random

import numpy as np
import pytest
import torch

from memwatch.probes import Panel, Probe, example_tokens, probe_id, probes_from_user, sample_windows


def _dataset(n=40, length=80, seed=0):
    g = np.random.default_rng(seed)
    return [{"input_ids": g.integers(0, 500, length).tolist()} for _ in range(n)]


def test_probe_id_is_a_content_hash():
    a = Probe((1, 2, 3), "train")
    assert a.id == Probe([1, 2, 3], "heldout", {"x": 1}).id == probe_id(np.array([1, 2, 3]))
    assert a.id != Probe((1, 2, 4), "train").id
    assert len(a.id) == 16 and int(a.id, 16) >= 0


def test_panel_deduplicates_and_orders_groups():
    panel = Panel(
        [Probe((1, 2), "train"), Probe((3, 4), "heldout"), Probe((1, 2), "heldout"), Probe((5, 6), "canary")]
    )
    assert len(panel) == 3 and panel.duplicates == 1
    assert panel.groups.tolist() == ["train", "heldout", "canary"]
    assert panel.group_names() == ["canary", "train", "heldout"]
    assert panel.tokens(2).tolist() == [[1, 2], [3, 4], [5, 6]]
    assert panel.filter_short(3) == 3 and len(panel) == 0


def test_sampling_is_deterministic_and_leaves_global_rngs_alone():
    data = _dataset()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    a = sample_windows(data, 10, prefix_len=16, suffix_len=16, group="train", seed=3, window="random")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    b = sample_windows(data, 10, prefix_len=16, suffix_len=16, group="train", seed=3, window="random")
    c = sample_windows(data, 10, prefix_len=16, suffix_len=16, group="train", seed=4, window="random")
    assert [p.id for p in a] == [p.id for p in b]
    assert [p.id for p in a] != [p.id for p in c]
    for p in a:  # every window is a real slice of its source example
        src = data[p.meta["source_index"]]["input_ids"]
        s = p.meta["start"]
        assert list(p.tokens) == src[s : s + 32]


def test_first_window_is_the_start_of_each_example():
    data = _dataset()
    probes = sample_windows(data, 5, prefix_len=16, suffix_len=16, group="train", seed=0)
    assert all(p.meta["start"] == 0 for p in probes)
    assert len({p.meta["source_index"] for p in probes}) == 5


def test_windows_take_suffixes_from_trained_tokens_only():
    """Completion-only labels: the suffix must lie where labels != -100 (from the dataset or the collator)."""
    data = []
    for ex in _dataset(20, 80):
        labels = [-100] * 50 + ex["input_ids"][50:]
        data.append({"input_ids": ex["input_ids"], "labels": labels})
    probes = sample_windows(data, 20, prefix_len=16, suffix_len=16, group="train", seed=0, window="random")
    assert probes and all(p.meta["start"] + 16 >= 50 for p in probes)
    first = sample_windows(data, 5, prefix_len=16, suffix_len=16, group="train", seed=0)
    assert all(
        p.meta["start"] == 34 for p in first
    )  # the earliest window whose suffix starts at the completion

    def collator(batch):  # masks the first 60 tokens, the way a completion-only collator would
        ids = torch.tensor([b["input_ids"] for b in batch])
        labels = ids.clone()
        labels[:, :60] = -100
        torch.rand(3)  # a collator that consumes the RNG must not disturb training
        return {"input_ids": ids, "labels": labels}

    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    via = sample_windows(
        _dataset(20, 80), 20, prefix_len=16, suffix_len=16, group="train", seed=0, collator=collator
    )
    assert torch.equal(torch.rand(1), expected)
    assert via and all(p.meta["start"] + 16 >= 60 for p in via)


def test_padding_is_never_sampled_and_short_examples_are_skipped():
    ids = list(range(1, 41)) + [0] * 40
    data = [{"input_ids": ids, "attention_mask": [1] * 40 + [0] * 40}, {"input_ids": list(range(20))}]
    probes = sample_windows(data, 10, prefix_len=16, suffix_len=16, group="train", seed=0, window="random")
    assert probes and all(0 not in p.tokens for p in probes)
    assert all(p.meta["source_index"] == 0 for p in probes)


def test_small_datasets_give_several_non_overlapping_windows_per_example():
    data = _dataset(2, 200)
    probes = sample_windows(data, 8, prefix_len=16, suffix_len=16, group="train", seed=0)
    assert len(probes) == 8
    for src in (0, 1):
        starts = sorted(p.meta["start"] for p in probes if p.meta["source_index"] == src)
        assert all(b - a >= 32 for a, b in itertools.pairwise(starts))


def test_duplicated_examples_do_not_fill_the_panel_with_shifted_windows():
    rows = [
        {"input_ids": list(range(i * 100, i * 100 + 96))} for i in range(4)
    ] * 8  # 4 distinct, 8 copies each
    probes = sample_windows(rows, 64, prefix_len=16, suffix_len=32, group="train", seed=0)
    starts = sorted(p.meta["start"] for p in probes)
    assert starts == [0] * 4 + [48] * 4  # the first window and the one non-overlapping window of each text


def test_iterable_datasets_are_read_from_the_start():
    data = _dataset(30)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    probes = sample_windows(Stream(), 5, prefix_len=16, suffix_len=16, group="train", seed=0, scan_limit=10)
    assert len(probes) == 5 and all(p.meta["source_index"] < 10 for p in probes)


def test_user_probes_and_tokens_of_examples():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    probes = probes_from_user(
        ["abc", [1, 2, 3], {"input_ids": [4, 5], "group": "pii", "id": "x"}], tokenizer=Tok()
    )
    assert [p.tokens for p in probes] == [(97, 98, 99), (1, 2, 3), (4, 5)]
    assert [p.group for p in probes] == ["user", "user", "pii"] and probes[2].meta["user_id"] == "x"
    with pytest.raises(ValueError, match="no tokenizer"):
        probes_from_user(["text"])
    assert example_tokens({"input_ids": torch.tensor([[1, 2]])}) == ([1, 2], [True, True])
    assert example_tokens([3, 4]) == ([3, 4], [True, True])
    assert example_tokens({"text": "no ids"}) is None


def test_windows_never_include_padding_in_the_prefix():
    ids = [0] * 10 + list(range(1, 71))  # left-padded
    data = [{"input_ids": ids, "attention_mask": [0] * 10 + [1] * 70, "labels": [-100] * 10 + ids[10:]}]
    probes = sample_windows(data, 5, prefix_len=16, suffix_len=16, group="train", seed=0, window="random")
    assert probes and all(p.meta["start"] >= 10 and 0 not in p.tokens for p in probes)


def test_user_token_dicts_drop_their_padding_and_a_padded_heldout_set_gives_unpadded_windows(tmp_path):
    from memwatch import Monitor, MonitorConfig

    pad = 0
    right = {"input_ids": [5, 6, 7, 8, pad, pad], "attention_mask": [1, 1, 1, 1, 0, 0]}
    left = {"input_ids": [pad, pad, 9, 10, 11, 12], "attention_mask": [0, 0, 1, 1, 1, 1]}
    got = probes_from_user([right, left], default_group="heldout")
    assert [p.tokens for p in got] == [(5, 6, 7, 8), (9, 10, 11, 12)]
    # Through the monitor: a held-out set padded to 40 tokens with 12 real tokens gives no 16+16 window of padding.
    rows = [{"input_ids": [3 + i] * 12 + [pad] * 28, "attention_mask": [1] * 12 + [0] * 28} for i in range(4)]
    rows.append({"input_ids": list(range(1, 41)), "attention_mask": [1] * 40})
    monitor = Monitor(
        MonitorConfig(prefix_len=16, suffix_len=16, console=False, history=False, tensorboard=False),
        heldout=rows,
    )
    from _models import tiny_model

    monitor.setup(tiny_model("gpt2"), output_dir=tmp_path)
    assert [p.tokens for p in monitor.panel.probes] == [tuple(range(1, 33))]
