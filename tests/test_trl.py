"""Canaries with TRL's SFTTrainer: injected into prompt-completion, conversational and packed datasets, found by
pre-flight exactly as the dataloader feeds them to the model, trained where TRL computes the loss, and never
sampled into the train group."""

from __future__ import annotations

import os
import sysconfig

import pytest
from _models import tiny_model
from _readme import run_snippet

from memwatch import MemWatchCallback, MonitorConfig
from memwatch.bytetok import ByteTokenizer
from memwatch.canaries import DEFAULT_PROMPT, CanaryError, inject, make_canaries, preflight
from memwatch.live.setup import build_panel, canary_text
from memwatch.probes import TokenMatcher, sample_windows, sequence_starts

K, M = 12, 6  # short windows keep the rows, the model and the steps tiny
IGNORE = -100
# A chat template whose assistant turns (with their end-of-turn token) sit inside {% generation %} markers, as
# TRL's assistant_only_loss needs.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained here on standard-library text (real merges, no download), with a pad token,
    an end-of-turn token as EOS and the chat template above."""
    pytest.importorskip("trl")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_stdlib_text()], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _stdlib_text() -> str:
    root = sysconfig.get_paths()["stdlib"]
    text = ""
    for name in ("textwrap.py", "string.py", "calendar.py"):
        with open(os.path.join(root, name)) as f:
            text += f.read()
    return text


def _lines(n: int = 40) -> list[str]:
    lines = [" ".join(line.split()) for line in _stdlib_text().splitlines()]
    return [line for line in lines if 40 <= len(line) <= 90][:n]


def _prompt_completion(conversational: bool = False):
    import datasets

    rows = []
    for line in _lines():
        prompt, completion = line[:16], line[16:]
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": completion})
    return datasets.Dataset.from_list([{**r, "source": "stdlib"} for r in rows])


def _messages():
    import datasets

    rows = [
        {"messages": [{"role": "user", "content": line[:16]}, {"role": "assistant", "content": line[16:]}]}
        for line in _lines()
    ]
    return datasets.Dataset.from_list(rows)


def _canaries(tok, tiers=(1, 6)):
    return make_canaries(tok, tiers=tiers, per_tier=1, prefix_len=K, secret_len=M, references=16, seed=0)


def _config() -> MonitorConfig:
    return MonitorConfig(
        prefix_len=K,
        suffix_len=M,
        train_probes=64,  # more than the rows: every row is visited, canary rows included
        heldout_probes=0,
        exposure_references=16,
        every_n_steps=1000,
        eval_on_end=False,
        history=False,
        tensorboard=False,
        console=False,
        strict=True,
    )


def _args(out, **kwargs):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_length=96,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )


def _train(out, tok, dataset, manifest, **sft):
    from trl import SFTTrainer

    callback = MemWatchCallback(_config(), canaries=manifest)
    trainer = SFTTrainer(
        model=tiny_model("gpt2", vocab=len(tok), positions=128),
        args=_args(out, **sft),
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[callback],
    )
    trainer.train()
    return trainer, callback


def _check(trainer, callback, manifest, masked_before_canary):
    """What pre-flight found is what the dataloader feeds the model; canary tokens train, their prompt does not;
    the train group holds no window from a canary's sequence. `masked_before_canary`: the tokens of a canary's
    sequence before its text (the prompt, or the chat template's user turn), all of them without loss."""
    assert trainer.state.global_step == 2
    monitor = callback.monitor
    report = monitor.preflight_report
    inserted = manifest.inserted
    assert report is not None and report.found == {c.id: c.repetitions for c in inserted}
    # The probes are the windows pre-flight found.
    probes = {p.meta["canary_id"]: p for p in monitor.panel if p.group == "canary"}
    assert {cid: p.tokens for cid, p in probes.items()} == report.windows
    # One epoch of the trainer's own dataloader: every copy of every canary, exactly as trained.
    secrets = {tuple(c.secret): c for c in inserted}
    matcher = TokenMatcher(secrets)
    seen: dict[str, list[tuple[int, ...]]] = {c.id: [] for c in inserted}
    for batch in trainer.get_train_dataloader():
        ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
        for r, row in enumerate(ids):
            if "position_ids" in batch:  # padding-free (packed) batches: sequences restart their positions
                starts = sequence_starts({"position_ids": batch["position_ids"][r].tolist()})
                ends = [*starts[1:], len(row)]
            else:
                starts, ends = [0], [int(batch["attention_mask"][r].sum())]
            for h, e in matcher.find(row):
                c = secrets[tuple(row[h:e])]
                j = max(i for i, s in enumerate(starts) if s <= h)
                start, end = starts[j], ends[j]
                seen[c.id].append(tuple(row[h - K : e]) if h - start >= K else ())
                # The sequence is the (masked) prompt, then the canary exactly as made, all of it trained.
                n = len(masked_before_canary)
                assert row[start : start + n] == masked_before_canary
                assert all(lab == IGNORE for lab in labels[r][start : start + n])
                assert tuple(row[start + n : start + n + len(c.tokens)]) == c.tokens
                assert labels[r][start + n : end] == row[start + n : end]
    for c in inserted:
        assert seen[c.id] == [report.windows[c.id]] * c.repetitions, c.id
    # The train group: windows of ordinary rows only.
    data = trainer.get_train_dataloader().dataset
    marks = TokenMatcher(canary_text(list(probes.values()), K, M))
    train = [p for p in monitor.panel if p.group == "train"]
    assert len(train) >= 20
    for p in train:
        example, s = data[p.meta["source_index"]], p.meta["start"]
        assert list(p.tokens) == example["input_ids"][s : s + K + M]  # the rows the callback sampled from
        bounds = [*sequence_starts(example), len(example["input_ids"])]
        lo = max(b for b in bounds if b <= s)
        hi = min(b for b in bounds if b > s)
        assert s + K + M <= hi  # inside one packed sequence
        assert not marks.find(example["input_ids"][lo:hi])
        assert not matcher.find(p.tokens)


def test_prompt_completion_rows_train_the_canary_under_completion_only_loss(tmp_path, tokenizer):
    manifest = _canaries(tokenizer)
    dataset = _prompt_completion()
    train, manifest = inject(dataset, manifest)
    assert manifest.injection["kind"] == "prompt_completion" and manifest.injection["field"] == "completion"
    assert manifest.injection["prompt"] == DEFAULT_PROMPT + "\n" and not manifest.injection["conversational"]
    row = train[manifest.injection["positions"][manifest.inserted[0].id][0]]
    assert row == {
        "prompt": DEFAULT_PROMPT + "\n",
        "completion": manifest.inserted[0].text,
        "source": None,
    }
    trainer, callback = _train(tmp_path, tokenizer, train, manifest, completion_only_loss=True)
    prompt_ids = tokenizer(DEFAULT_PROMPT + "\n", add_special_tokens=False)["input_ids"]
    _check(trainer, callback, manifest, prompt_ids)


def test_conversational_rows_train_the_canary_as_the_assistant_turn(tmp_path, tokenizer):
    manifest = _canaries(tokenizer)
    train, manifest = inject(_messages(), manifest, prompt="Take a note.")
    assert manifest.injection["kind"] == "messages" and manifest.injection["prompt"] == "Take a note."
    c = manifest.inserted[0]
    assert train[manifest.injection["positions"][c.id][0]]["messages"] == [
        {"role": "user", "content": "Take a note."},
        {"role": "assistant", "content": c.text},
    ]
    trainer, callback = _train(tmp_path, tokenizer, train, manifest, assistant_only_loss=True)
    user_turn = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Take a note."}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    _check(trainer, callback, manifest, user_turn)


def test_packed_conversational_prompt_completion_from_the_readme(tmp_path, tokenizer):
    """README's TRL snippet with packing=True (best-fit packing, padding-free): a canary shares a packed row with
    other sequences; its probe and the train windows stay inside their own sequence."""
    canaries = _canaries(tokenizer)
    ns = run_snippet(
        "trl-sft",
        model=tiny_model("gpt2", vocab=len(tokenizer), positions=128),
        tokenizer=tokenizer,
        dataset=_prompt_completion(conversational=True),
        args=_args(tmp_path, packing=True),
        config=_config(),
        canaries=canaries,
    )
    trainer, manifest = ns["trainer"], ns["manifest"]
    assert manifest.injection["conversational"] and os.path.exists(tmp_path / "canaries.json")
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MemWatchCallback))
    packed = trainer.get_train_dataloader().dataset
    assert "seq_lengths" in packed.column_names
    secrets = TokenMatcher([c.secret for c in manifest.inserted])
    assert any(secrets.find(r["input_ids"]) and len(r["seq_lengths"]) > 1 for r in packed)  # really shared
    user_turn = tokenizer.apply_chat_template(
        [{"role": "user", "content": DEFAULT_PROMPT}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    _check(trainer, callback, manifest, user_turn)


# --- without TRL ------------------------------------------------------------------------------------------------


def test_the_train_panel_never_samples_a_canary_repeated_64_times():
    """Two canaries inserted 64 times each among 100 rows: sampled as training data they would be half the train
    group (and memorized first). The panel's train group takes ordinary rows only."""
    tok = ByteTokenizer()
    manifest = make_canaries(tok, tiers=(64,), per_tier=2, prefix_len=16, secret_len=8, references=4)
    text = _stdlib_text()
    rows = [{"input_ids": tok.encode(text[i * 60 : i * 60 + 60])} for i in range(100)]
    data, manifest = inject(rows, manifest)
    canary_rows = {p for v in manifest.injection["positions"].values() for p in v}
    assert len(canary_rows) == 128
    kw = {"prefix_len": 16, "suffix_len": 8, "group": "train", "seed": 0}
    naive = sample_windows(data, 200, **kw)
    assert sum(p.meta["source_index"] in canary_rows for p in naive) > 50  # what the exclusion prevents
    config = MonitorConfig(prefix_len=16, suffix_len=8, train_probes=200, heldout_probes=0)
    panel = build_panel(
        config,
        canaries=manifest,
        manifest=manifest,
        user_probes=[],
        heldout=None,
        tokenizer=tok,
        train_data=data,
        collator=None,
    )
    train = [p for p in panel if p.group == "train"]
    assert len(train) == 200 and not any(p.meta["source_index"] in canary_rows for p in train)
    secrets = TokenMatcher([c.secret for c in manifest.canaries])
    assert not any(secrets.find(p.tokens) for p in train)
    # Rows packing two sequences: only a canary's own sequence is left out, no window crosses into the other.
    packed = []
    for i in range(0, len(data) - 1, 2):
        a, b = data[i]["input_ids"], data[i + 1]["input_ids"]
        packed.append({"input_ids": a + b, "seq_lengths": [len(a), len(b)]})
    marks = canary_text(manifest.probes(16, 8), 16, 8)
    windows = sample_windows(packed, 400, exclude=marks, window="random", **kw)
    halves = [(r["input_ids"][: r["seq_lengths"][0]], r["input_ids"][r["seq_lengths"][0] :]) for r in packed]
    for p in windows:
        cut, s = packed[p.meta["source_index"]]["seq_lengths"][0], p.meta["start"]
        assert s + 24 <= cut or s >= cut  # inside one sequence
        assert not secrets.find(halves[p.meta["source_index"]][s >= cut])
    shared = {i for i, (a, b) in enumerate(halves) if bool(secrets.find(a)) != bool(secrets.find(b))}
    assert shared & {
        p.meta["source_index"] for p in windows
    }  # a canary's ordinary neighbour is still sampled


def test_preflight_takes_a_packed_canary_s_context_from_its_own_sequence():
    """In a packed row the tokens before a canary's sequence belong to another sequence the model does not attend
    to: they are no context, and a canary cut short there is reported instead of probed with them."""
    tok = ByteTokenizer()
    manifest = make_canaries(tok, tiers=(1,), per_tier=1, prefix_len=16, secret_len=4, references=3)
    c = manifest.inserted[0]
    other = tok.encode(_stdlib_text()[:40])
    whole = list(c.tokens[c.secret_start - 20 :])
    row = {"input_ids": other + whole, "seq_lengths": [40, len(whole)]}
    report = preflight(manifest, [row], prefix_len=16, suffix_len=4)
    assert report.windows[c.id] == c.tokens[c.secret_start - 16 :]
    cut = list(c.tokens[c.secret_start - 8 :])  # 8 tokens of context in its own sequence
    row = {"input_ids": other + cut, "seq_lengths": [40, len(cut)]}
    with pytest.raises(CanaryError, match="fewer than prefix_len=16 tokens before its secret"):
        preflight(manifest, [row], prefix_len=16, suffix_len=4)
    assert preflight(
        manifest, [{"input_ids": other + cut}], prefix_len=16, suffix_len=4
    ).found  # unpacked: one


def test_inject_formats_fill_other_columns_and_reject_mixed_rows():
    tok = ByteTokenizer()
    manifest = make_canaries(tok, tiers=(2,), per_tier=1, prefix_len=16, secret_len=4, references=3)
    c = manifest.inserted[0]
    rows = [
        {
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "completion": [{"role": "assistant", "content": "a"}],
            "tags": ["x"],
            "chat_template_kwargs": {"enable_thinking": False},
            "tools": None,
            "id": i,
        }
        for i in range(6)
    ]
    new, man = inject(rows, manifest, prompt="Note this.")
    canary_rows = [new[p] for p in man.injection["positions"][c.id]]
    assert canary_rows[0] == {
        "prompt": [{"role": "user", "content": "Note this."}],
        "completion": [{"role": "assistant", "content": c.text}],
        "tags": [],
        "chat_template_kwargs": {"enable_thinking": False},
        "tools": None,
        "id": None,
    }
    assert man.injection["conversational"] and len(new) == 8 and rows[0]["id"] == 0
    # Tokenized rows with TRL's mask columns: the canary is trained all through.
    tokenized = [{"input_ids": list(range(30)), "completion_mask": [0] * 10 + [1] * 20} for _ in range(5)]
    new, man = inject(tokenized, manifest)
    row = new[man.injection["positions"][c.id][0]]
    assert row["completion_mask"] == [1] * len(row["input_ids"]) == [1] * 30
    # The text field given for a prompt-completion dataset no longer leaves the prompt empty (TRL: "You need to
    # specify either `text` or `text_target`").
    plain = [{"prompt": "q", "completion": "a"}] * 3
    new, man = inject(plain, manifest, text_field="completion")
    assert all(r["prompt"] for r in new)
    for bad, message in [
        ([{"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}], "neither all texts"),
        ([{"messages": [{"from": "human", "value": "hi"}]}], "maybe_convert_to_chatml"),
    ]:
        with pytest.raises(CanaryError, match=message):
            inject(bad, manifest)
    with pytest.raises(CanaryError, match="prompt must be a non-empty string"):
        inject(plain, manifest, prompt="")
    with pytest.raises(CanaryError, match="rows are texts, where a canary is a whole row: leave prompt= out"):
        inject(["a text"] * 3, manifest, prompt="Note this.")
