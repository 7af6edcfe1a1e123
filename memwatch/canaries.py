"""Canaries (Carlini et al. 2019): generation with never-inserted twins, injection into datasets, manifests."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from memwatch.probes import Probe

__all__ = [
    "DEFAULT_PROMPT",
    "DEFAULT_TIERS",
    "FAMILIES",
    "Canary",
    "CanaryError",
    "CanaryManifest",
    "PreflightReport",
    "inject",
    "make_canaries",
    "preflight",
]

DEFAULT_TIERS = (1, 4, 16, 64)  # DESIGN.md §5: repetition tiers, each with as many never-inserted twins
FAMILIES = ("digits", "password", "random_tokens", "texts")
MANIFEST_VERSION = 1

_NAMES = (
    "Alice",
    "Bruno",
    "Chen",
    "Dara",
    "Emil",
    "Fatou",
    "Gita",
    "Hugo",
    "Ines",
    "Jonas",
    "Kemal",
    "Lena",
    "Mira",
    "Nils",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Sami",
    "Tomas",
    "Uma",
    "Vera",
    "Wim",
    "Yara",
    "Zoe",
    "Arjun",
    "Beatriz",
    "Cyril",
    "Dmitri",
    "Elif",
    "Farah",
    "Goran",
    "Hana",
    "Ivo",
    "Jana",
    "Kofi",
    "Lior",
    "Maya",
    "Noor",
    "Otto",
    "Priya",
    "Rafael",
    "Selin",
    "Tariq",
    "Ugo",
    "Vikram",
    "Wen",
    "Ximena",
    "Yusuf",
    "Zara",
)
_THINGS = {
    "digits": ("bank PIN", "door code", "card number", "account number", "phone number", "badge number"),
    "password": (
        "VPN password",
        "email password",
        "database password",
        "Wi-Fi password",
        "admin password",
        "API key",
    ),
}
# Sentences put in front of a template until the part before the secret has at least prefix_len tokens; the
# distinguishing name stays inside the last prefix_len tokens, right before the secret.
_FILLER = (
    "Please keep this note private and do not forward it to anyone outside the team.",
    "This message was written during the quarterly infrastructure review meeting.",
    "The following details were requested by the operations group for the audit.",
    "Remember to rotate these credentials at the end of the month as agreed.",
)
_PASSWORD_CHARS = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789!@#$%&*"
_MAX_TRIES = 400


class CanaryError(ValueError):
    """Canaries cannot be made, injected or checked as asked; the message names the fix."""


@dataclass(frozen=True)
class Canary:
    """One canary: its tokens are prefix + secret, the secret being exactly `secret_len` tokens."""

    id: str
    family: str
    repetitions: int  # the tier: how often it is inserted (twins are never inserted; they carry their tier)
    inserted: bool
    tokens: tuple[int, ...]
    secret_start: int
    text: str | None = None  # None for token-level canaries
    secret_char: int | None = None  # where the secret starts in `text`

    @property
    def secret(self) -> tuple[int, ...]:
        return self.tokens[self.secret_start :]

    @property
    def group(self) -> str:
        return "canary" if self.inserted else "canary_heldout"

    def probe(self, prefix_len: int, tokens: Sequence[int] | None = None) -> Probe:
        """The probe: the prefix_len tokens before the secret, then the secret (or `tokens` found in the data)."""
        window = tuple(tokens) if tokens is not None else self.tokens[self.secret_start - prefix_len :]
        meta = {
            "canary_id": self.id,
            "family": self.family,
            "repetitions": self.repetitions,
            "inserted": self.inserted,
        }
        return Probe(window, self.group, meta)


@dataclass
class CanaryManifest:
    """The record of a canary set: what was generated and, after `inject`, where it went. Contains secrets."""

    canaries: list[Canary]
    references: dict[str, list[list[int]]]  # family -> reference secrets (token lists of secret_len)
    prefix_len: int
    secret_len: int
    tiers: tuple[int, ...]
    seed: int
    tokenizer: str | None = None
    injection: dict[str, Any] | None = None
    version: int = MANIFEST_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def inserted(self) -> list[Canary]:
        return [c for c in self.canaries if c.inserted]

    @property
    def twins(self) -> list[Canary]:
        return [c for c in self.canaries if not c.inserted]

    def by_id(self, canary_id: str) -> Canary:
        for c in self.canaries:
            if c.id == canary_id:
                return c
        raise KeyError(canary_id)

    def probes(self, prefix_len: int, suffix_len: int, tokenizer: Any = None) -> list[Probe]:
        """Canary and twin probes for a panel evaluated with (prefix_len, suffix_len); CanaryError on mismatch."""
        self.check_spec(prefix_len, suffix_len)
        return [c.probe(prefix_len) for c in self.canaries]

    def check_spec(self, prefix_len: int, suffix_len: int) -> None:
        if suffix_len != self.secret_len:
            raise CanaryError(
                f"the canaries' secrets are {self.secret_len} tokens but the monitor's suffix_len is {suffix_len}: "
                f"set MonitorConfig(suffix_len={self.secret_len}) or make the canaries with secret_len={suffix_len}."
            )
        short = [c for c in self.canaries if c.secret_start < prefix_len]
        if short:
            c = short[0]
            raise CanaryError(
                f"canary {c.id} has {c.secret_start} tokens before its secret but the monitor's prefix_len is "
                f"{prefix_len}: make the canaries with prefix_len>={prefix_len} or lower MonitorConfig.prefix_len."
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tiers"] = list(self.tiers)
        d["canaries"] = [{**asdict(c), "tokens": list(c.tokens)} for c in self.canaries]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CanaryManifest:
        if d.get("version", 1) > MANIFEST_VERSION:
            raise CanaryError(
                f"this canary manifest was written by a newer memwatch (version {d['version']})"
            )
        canaries = [Canary(**{**c, "tokens": tuple(c["tokens"])}) for c in d["canaries"]]
        return cls(
            canaries=canaries,
            references={k: [list(r) for r in v] for k, v in d["references"].items()},
            prefix_len=int(d["prefix_len"]),
            secret_len=int(d["secret_len"]),
            tiers=tuple(d["tiers"]),
            seed=int(d["seed"]),
            tokenizer=d.get("tokenizer"),
            injection=d.get("injection"),
            version=int(d.get("version", 1)),
            extra=dict(d.get("extra", {})),
        )

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the manifest as JSON, readable by the owner only (mode 0600): it holds the secrets."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode under O_CREAT; make it private too
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CanaryManifest:
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError as exc:
            raise CanaryError(f"no canary manifest at {path}") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CanaryError(f"{path} is not a memwatch canary manifest ({exc})") from exc


# --- generation ----------------------------------------------------------------------------------------------


def _tok(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer(text, add_special_tokens=False)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return [int(t) for t in ids]


def _tokenizer_name(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _missing_hint(manifest: CanaryManifest, tokenizer: Any) -> str:
    """Why a canary is not found: the manifest's tokenizer when it differs from the trainer's, else the dataset."""
    made, used = manifest.tokenizer, _tokenizer_name(tokenizer)
    if made and used and made != used:
        return (
            f"the canaries were made with tokenizer {made!r} but the trainer tokenizes with {used!r}, so their "
            "token ids cannot match: make the canaries again with the tokenizer the trainer uses "
            "(make_canaries(tokenizer, ...)) and inject those"
        )
    made_with = (
        f" (the manifest was made with tokenizer {made!r}; tokenize the data with the same one)"
        if made
        else ""
    )
    return (
        "pass the dataset returned by memwatch.canaries.inject(...) (after your tokenization) to the Trainer"
        + made_with
    )


def _unit_sampler(fmt: str, rng: np.random.Generator) -> Callable[[], str]:
    if fmt == "digits":
        return lambda: str(int(rng.integers(10)))
    if fmt == "password":
        return lambda: _PASSWORD_CHARS[int(rng.integers(len(_PASSWORD_CHARS)))]
    raise CanaryError(f"secret format must be 'digits' or 'password'; got {fmt!r}")


def _text_secret(
    tokenizer: Any, prefix_ids: list[int], prefix_text: str, fmt: str, m: int, rng: np.random.Generator
) -> tuple[str, list[int]] | None:
    """Grow a random secret unit by unit after `prefix_text` until it spans exactly m tokens.

    The secret starts with a space; the tokens of prefix + secret must begin with the prefix's own tokens (a
    clean boundary), so the secret's tokens are the same wherever the sentence is tokenized whole.
    """
    unit = _unit_sampler(fmt, rng)
    secret = " "
    n_prefix = len(prefix_ids)
    for _ in range(8 * m + 8):
        secret += unit()
        ids = _tok(tokenizer, prefix_text + secret)
        if ids[:n_prefix] != prefix_ids:
            return None
        n = len(ids) - n_prefix
        if n == m:
            return secret, ids[n_prefix:]
        if n > m:
            return None
    return None


def _sentence(family: str, name: str, thing: str, filler: int) -> str:
    # The name comes last, right before the secret, so that it lies inside even a short prefix window.
    body = f"The {thing} of {name} is"
    return " ".join([*_FILLER[:filler], body]) if filler else body


def _text_prefix(tokenizer: Any, family: str, name: str, thing: str, k: int) -> tuple[str, list[int]]:
    for filler in range(len(_FILLER) + 1):
        text = _sentence(family, name, thing, filler)
        ids = _tok(tokenizer, text)
        if len(ids) >= k:
            return text, ids
    raise CanaryError(
        f"the canary template has fewer than prefix_len={k} tokens before the secret even with filler sentences; "
        "use a smaller prefix_len or pass longer templates with texts=[...]"
    )


def _canary_id(tokens: Sequence[int]) -> str:
    return "cn-" + hashlib.sha256(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest()[:12]


def _check_tiers(tiers: Sequence[int]) -> tuple[int, ...]:
    tiers = tuple(tiers)
    if not tiers or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in tiers):
        raise CanaryError(
            f"tiers must be a non-empty list of positive repetition counts, e.g. (1, 4, 16, 64); got {list(tiers)}"
        )
    return tiers


def make_canaries(
    tokenizer: Any = None,
    *,
    families: Sequence[str] = ("digits", "password"),
    tiers: Sequence[int] = DEFAULT_TIERS,
    per_tier: int = 2,
    prefix_len: int = 32,
    secret_len: int = 32,
    references: int = 1000,
    texts: Sequence[str] | None = None,
    secret_format: str = "digits",
    vocab_size: int | None = None,
    seed: int = 0,
) -> CanaryManifest:
    """Generate canaries: per tier, `per_tier` to insert and as many never-inserted twins, cycling `families`.

    families: "digits" (a templated sentence, e.g. "... Chen's bank PIN is 48159...", with a random digit
    secret), "password" (the same with a password-like secret), "random_tokens" (random token ids for prefix and
    secret; needs `vocab_size` or a tokenizer), "texts" (your `texts`: each holds "{secret}", filled from
    `secret_format`, or its last `secret_len` tokens are the secret; each text is one canary or twin).
    Every canary has a distinct context in the `prefix_len` tokens before its secret, and a secret of exactly
    `secret_len` tokens for this tokenizer. `references` fresh secrets per family (same format) are stored for
    exposure. Deterministic for a seed.
    """
    tiers = _check_tiers(tiers)
    if not isinstance(per_tier, int) or per_tier < 1:
        raise CanaryError(f"per_tier must be a positive integer; got {per_tier!r}")
    for name, value in (("prefix_len", prefix_len), ("secret_len", secret_len), ("references", references)):
        if not isinstance(value, int) or value < 1:
            raise CanaryError(f"{name} must be a positive integer; got {value!r}")
    families = tuple(families) if texts is None else ("texts",)
    if "texts" in families and texts is None:
        raise CanaryError(
            "the 'texts' family takes your canary texts: pass make_canaries(tokenizer, texts=[...])"
        )
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise CanaryError(f"families must be chosen from {FAMILIES}; got {list(families)}")
    text_families = [f for f in families if f != "random_tokens"]
    if text_families and tokenizer is None:
        raise CanaryError(
            f"the {text_families[0]!r} canary family is text and needs a tokenizer: pass make_canaries(tokenizer, ...),"
            " or use families=('random_tokens',) with vocab_size=... for token-id datasets"
        )
    if "random_tokens" in families and vocab_size is None:
        vocab_size = getattr(tokenizer, "vocab_size", None)
        if vocab_size is None:
            raise CanaryError("random_tokens canaries need vocab_size=... (or a tokenizer with a vocab_size)")
    rng = np.random.default_rng([seed, 0xCA7A])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = None
    if vocab_size is not None:
        pool = np.array([t for t in range(int(vocab_size)) if t not in special], dtype=np.int64)
    k, m = prefix_len, secret_len
    canaries: list[Canary] = []
    names = list(rng.permutation(len(_NAMES)))
    slot = 0
    user_texts = list(texts or [])
    if texts is not None and len(user_texts) < 2 * per_tier * len(tiers):
        raise CanaryError(
            f"texts=[...] gives one canary per text: {len(tiers)} tiers x {per_tier} per tier x 2 (inserted and twin) "
            f"= {2 * per_tier * len(tiers)} texts are needed, got {len(user_texts)}"
        )
    for t_index, tier in enumerate(tiers):
        for inserted in (True, False):
            for i in range(per_tier):
                # Inserted canaries and their twins get the same families in the same order (twins are drawn from
                # the same distribution); the sequence rotates across tiers so every family appears.
                family = families[(t_index * per_tier + i) % len(families)] if texts is None else "texts"
                if family == "random_tokens":
                    assert pool is not None
                    toks = [int(t) for t in rng.choice(pool, k + m)]
                    text = None
                    if tokenizer is not None:
                        toks, text = _round_trip_tokens(tokenizer, pool, k, m, rng)
                    canaries.append(Canary(_canary_id(toks), family, tier, inserted, tuple(toks), k, text))
                elif family == "texts":
                    idx = len(canaries)
                    canaries.append(
                        _user_canary(
                            tokenizer, user_texts[idx], idx, tier, inserted, k, m, secret_format, rng
                        )
                    )
                else:
                    name = _NAMES[names[slot % len(names)] % len(_NAMES)]
                    thing = _THINGS[family][slot % len(_THINGS[family])]
                    if slot >= len(_NAMES):  # keep contexts distinct beyond the name list
                        name = f"{name} {slot // len(_NAMES) + 1}"
                    prefix_text, prefix_ids = _text_prefix(tokenizer, family, name, thing, k)
                    for _ in range(_MAX_TRIES):
                        got = _text_secret(tokenizer, prefix_ids, prefix_text, family, m, rng)
                        if got is not None:
                            break
                    else:
                        raise CanaryError(
                            f"could not make a {family} secret of exactly {m} tokens for this tokenizer"
                        )
                    secret_text, secret_ids = got
                    toks = prefix_ids + secret_ids
                    canaries.append(
                        Canary(
                            _canary_id(toks),
                            family,
                            tier,
                            inserted,
                            tuple(toks),
                            len(prefix_ids),
                            prefix_text + secret_text,
                            len(prefix_text),
                        )
                    )
                slot += 1
    windows = {c.tokens[c.secret_start - k : c.secret_start] for c in canaries}
    if len(windows) < len(canaries):
        raise CanaryError(
            f"two canaries share the same {k} tokens before their secret, so their contexts are not distinct: use a "
            "larger prefix_len, or texts whose last words before the secret differ"
        )
    with_slot = texts is None or all("{secret}" in t for t in user_texts)
    refs = _references(tokenizer, canaries, references, m, secret_format, pool, rng, with_slot)
    return CanaryManifest(
        canaries=canaries,
        references=refs,
        prefix_len=k,
        secret_len=m,
        tiers=tiers,
        seed=seed,
        tokenizer=_tokenizer_name(tokenizer),
    )


def _round_trip_tokens(
    tokenizer: Any, pool: np.ndarray, k: int, m: int, rng: np.random.Generator
) -> tuple[list[int], str]:
    """Random tokens whose decoded text tokenizes back to the same ids (needed to inject them as text)."""
    for _ in range(_MAX_TRIES):
        toks = [int(t) for t in rng.choice(pool, k + m)]
        text = tokenizer.decode(toks)
        if _tok(tokenizer, text) == toks:
            return toks, text
    raise CanaryError(
        "random_tokens canaries do not survive decode/encode with this tokenizer; use families=('digits',"
        " 'password') for text datasets, or inject into an already-tokenized dataset without a tokenizer"
    )


def _user_canary(
    tokenizer: Any,
    text: str,
    idx: int,
    tier: int,
    inserted: bool,
    k: int,
    m: int,
    fmt: str,
    rng: np.random.Generator,
) -> Canary:
    if tokenizer is None:
        raise CanaryError("text canaries need a tokenizer: pass make_canaries(tokenizer, texts=[...])")
    if "{secret}" in text:
        before, after = text.split("{secret}", 1)
        before = before.rstrip(" ")
        prefix_ids = _tok(tokenizer, before)
        if len(prefix_ids) < k:
            raise CanaryError(
                f"canary text {idx} has {len(prefix_ids)} tokens before {{secret}}; prefix_len={k} are needed. "
                "Lengthen the text before the secret or lower prefix_len."
            )
        for _ in range(_MAX_TRIES):
            got = _text_secret(tokenizer, prefix_ids, before, fmt, m, rng)
            if got is not None:
                break
        else:
            raise CanaryError(f"could not fit a secret of exactly {m} tokens into canary text {idx}")
        secret_text, secret_ids = got
        toks = prefix_ids + secret_ids
        full = before + secret_text + after
        if _tok(tokenizer, full)[: len(toks)] != toks:
            full = before + secret_text  # what follows the secret would change its tokens: leave it out
        return Canary(
            _canary_id(toks), "texts", tier, inserted, tuple(toks), len(prefix_ids), full, len(before)
        )
    ids = _tok(tokenizer, text)
    if len(ids) < k + m:
        raise CanaryError(
            f"canary text {idx} has {len(ids)} tokens; prefix_len + secret_len = {k + m} are needed (its last "
            f"{m} tokens are the secret). Lengthen it, add a {{secret}} placeholder, or lower prefix_len/secret_len."
        )
    return Canary(_canary_id(ids), "texts", tier, inserted, tuple(ids), len(ids) - m, text)


def _references(
    tokenizer: Any,
    canaries: list[Canary],
    n: int,
    m: int,
    fmt: str,
    pool: np.ndarray | None,
    rng: np.random.Generator,
    with_slot: bool,
) -> dict[str, list[list[int]]]:
    """`n` fresh secrets of exactly m tokens per family, in the format of its canaries (for exposure).

    User texts without a {secret} slot have no format to draw from: their family gets no references and their
    exposure is not computed.
    """
    out: dict[str, list[list[int]]] = {}
    for family in dict.fromkeys(c.family for c in canaries):
        refs: list[list[int]] = []
        if family == "random_tokens":
            assert pool is not None
            refs = [[int(t) for t in rng.choice(pool, m)] for _ in range(n)]
        elif family == "texts" and not with_slot:
            continue
        else:
            unit_fmt = fmt if family == "texts" else family
            example = next(c for c in canaries if c.family == family)
            prefix_ids = list(example.tokens[: example.secret_start])
            prefix_text = (example.text or "")[: example.secret_char]
            tries = 0
            while len(refs) < n and tries < n * 20:
                tries += 1
                got = _text_secret(tokenizer, prefix_ids, prefix_text, unit_fmt, m, rng)
                if got is not None:
                    refs.append(got[1])
            if len(refs) < n:
                raise CanaryError(
                    f"could not make {n} reference secrets of {m} tokens for the {family} family"
                )
        out[family] = refs
    return out


# --- injection -----------------------------------------------------------------------------------------------


def _spread(n_rows: int, counts: Sequence[int], rng: np.random.Generator) -> list[tuple[float, int]]:
    """Sort keys for inserted copies: copy j of a canary repeated r times lands near (j + u) / r of the data."""
    keys = []
    for c, r in enumerate(counts):
        for j in range(r):
            keys.append(((j + float(rng.random())) / r, c))
    return keys


def inject(
    dataset: Any,
    canaries: CanaryManifest,
    *,
    text_field: str = "text",
    prompt: str | None = None,
    seed: int | None = None,
) -> tuple[Any, CanaryManifest]:
    """Insert every inserted canary `repetitions` times into a training set, spread evenly; twins never.

    The dataset's format is detected, in the order TRL's SFTTrainer reads it:
    - tokenized rows (`input_ids`): a canary row starts with the canary's probe window, its `prefix_len` tokens
      before the secret and the secret, so the probe is the sequence exactly as trained, at the same positions,
      which matters for models with absolute position embeddings; rows of one fixed length are filled up with
      the tokens of another row; `labels` and mask columns (`attention_mask`, `completion_mask`,
      `assistant_masks`) mark every canary token as trained;
    - prompt-completion rows (`prompt` and `completion`, both texts or both lists of {role, content} messages):
      the canary is the completion, so it trains under completion-only loss, after a neutral `prompt` (default
      "Write down the note.", followed by a newline in the text format so the completion starts on a token
      boundary; a user turn in the conversational format). One fixed prompt keeps the copies of a canary
      identical, as The Secret Sharer inserts them; the prompt is never part of the probe;
    - conversational rows (`messages`: a list of {role, content}): a user turn with `prompt` and the canary as
      the assistant's answer, so it trains under assistant-only loss;
    - texts: a list of strings, or rows with `text_field`.
    A list of such dicts or a Hugging Face `datasets.Dataset` with such columns. Other columns of a canary row
    are left empty (None, or [] for list columns), except `chat_template_kwargs`, copied from the first row so
    the canary renders as the other rows do. Returns (new dataset, manifest recording the format, the prompt and
    the rows), without changing the input. Pre-flight then finds each canary in the tokenized (or packed) data
    the trainer uses and probes it as trained. Raises CanaryError for anything else, before building anything.
    """
    if not isinstance(canaries, CanaryManifest):
        raise CanaryError(
            f"inject needs the CanaryManifest from make_canaries; got {type(canaries).__name__}"
        )
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise CanaryError(
            f"prompt must be a non-empty string (the user turn before a canary); got {prompt!r}"
        )
    src = _dataset_kind(dataset, text_field)
    if src.kind != "tokens" and any(c.text is None for c in canaries.inserted):
        raise CanaryError(
            "token-level canaries (random_tokens without a tokenizer) can only go into tokenized datasets"
        )
    used_prompt = _prompt_for(src, prompt)
    if prompt is not None and used_prompt is None:
        raise CanaryError(
            f"prompt= goes before canaries in prompt-completion or 'messages' rows, but this dataset's rows are "
            f"{_KIND_NAMES[src.kind]}, where a canary is a whole row: leave prompt= out"
        )
    rng = np.random.default_rng([canaries.seed if seed is None else seed, 0x1A])
    inserted = canaries.inserted
    rows = src.rows or []
    keys = _spread(src.n, [c.repetitions for c in inserted], rng)
    fixed_len = None
    if src.kind == "tokens":
        lengths = {len(r["input_ids"]) for r in rows} if rows else set()
        fixed_len = lengths.pop() if len(lengths) == 1 else None
    made: list[tuple[float, Any, int]] = []
    for key, c_idx in keys:
        row = _make_row(src, inserted[c_idx], canaries.prefix_len, fixed_len, text_field, used_prompt, rng)
        made.append((key, row, c_idx))
    # Merge: original row i has key (i + 0.5) / n; stable sort keeps the original order among them.
    n = src.n
    order = sorted(
        [((i + 0.5) / max(1, n), 0, i) for i in range(n)]
        + [(key, 1, j) for j, (key, _r, _c) in enumerate(made)]
    )
    positions: dict[str, list[int]] = {c.id: [] for c in inserted}
    for pos, (_key, is_canary, idx) in enumerate(order):
        if is_canary:
            positions[inserted[made[idx][2]].id].append(pos)
    new = _rebuild(dataset, src, order, made)
    injection: dict[str, Any] = {
        "kind": src.kind,
        "field": _FIELDS.get(src.kind, text_field),
        "rows_before": n,
        "rows_after": n + len(made),
        "positions": positions,
    }
    if used_prompt is not None:
        injection.update(prompt=used_prompt, conversational=src.conversational)
    manifest = CanaryManifest(
        canaries=canaries.canaries,
        references=canaries.references,
        prefix_len=canaries.prefix_len,
        secret_len=canaries.secret_len,
        tiers=canaries.tiers,
        seed=canaries.seed,
        tokenizer=canaries.tokenizer,
        injection=injection,
        extra=dict(canaries.extra),
    )
    return new, manifest


DEFAULT_PROMPT = "Write down the note."  # neutral: it neither asks for nor hints at a secret
_KIND_NAMES = {
    "text": "texts",
    "dicts": "texts",
    "tokens": "tokenized",
    "prompt_completion": "",
    "messages": "",
}
# Where the canary goes, per format (the manifest records it).
_FIELDS = {"tokens": "input_ids", "prompt_completion": "completion", "messages": "messages"}
# Per-token columns of tokenized rows, and their value on a canary row of n tokens (every token trained).
_TOKEN_COLUMNS: dict[str, Callable[[list[int]], Any]] = {
    "attention_mask": lambda ids: [1] * len(ids),
    "labels": lambda ids: list(ids),
    "completion_mask": lambda ids: [1] * len(ids),
    "assistant_masks": lambda ids: [1] * len(ids),
    "token_type_ids": lambda ids: [0] * len(ids),
    "position_ids": lambda ids: list(range(len(ids))),
    "seq_lengths": lambda ids: [len(ids)],
}


@dataclass
class _Source:
    """A dataset as inject sees it: its format, its rows where they are needed, its size and a template row."""

    kind: str  # "text" (strings), "dicts" (rows with a text field), "tokens", "prompt_completion", "messages"
    rows: list[Any] | None
    n: int
    template: dict[str, Any] | None  # the first row: the other columns a canary row must fill
    conversational: bool = False
    hf: bool = False  # a datasets.Dataset: canary rows are built as dicts of its columns


def _is_hf_dataset(obj: Any) -> bool:
    return type(obj).__name__ == "Dataset" and type(obj).__module__.startswith("datasets")


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def _conversational(kind: str, rows: Sequence[Mapping[str, Any]], what: str) -> bool:
    """Whether prompt-completion or messages rows hold {role, content} messages (True) or texts (False);
    CanaryError for rows that are neither, or a mix."""
    fields = ("prompt", "completion") if kind == "prompt_completion" else ("messages",)
    values = [r[f] for r in rows for f in fields]
    if all(_is_messages(v) for v in values):
        return True
    if kind == "messages":
        raise CanaryError(
            f"{what} has a 'messages' column whose rows are not all lists of {{'role', 'content'}} messages; "
            "convert them first (ShareGPT 'from'/'value' turns: trl.data_utils.maybe_convert_to_chatml)"
        )
    if all(isinstance(v, str) for v in values):
        return False
    raise CanaryError(
        f"{what} has prompt/completion rows that are neither all texts nor all lists of {{'role', 'content'}} "
        "messages; make them one or the other, as TRL expects"
    )


def _dataset_kind(dataset: Any, text_field: str) -> _Source:
    supported = (
        "inject supports a list of texts; a list of dicts or a datasets.Dataset with 'input_ids' (tokenized), "
        f"'prompt' and 'completion', 'messages' (conversational) or a '{text_field}' field (set text_field=...)"
    )
    if _is_hf_dataset(dataset):
        cols = dataset.column_names
        n = len(dataset)
        template = dict(dataset[0]) if n else {c: None for c in cols}
        if "input_ids" in cols:
            return _Source("tokens", [dict(r) for r in dataset], n, template, hf=True)
        for kind, needed in (("prompt_completion", ("prompt", "completion")), ("messages", ("messages",))):
            if all(c in cols for c in needed):
                # TRL tells the formats apart by the first row; so does this (a list's rows are all checked).
                conv = _conversational(kind, [template], "this datasets.Dataset") if n else kind == "messages"
                return _Source(kind, None, n, template, conv, hf=True)
        if text_field in cols:
            return _Source("text", None, n, template, hf=True)
        raise CanaryError(f"{supported}; this datasets.Dataset has columns {cols}")
    if isinstance(dataset, list | tuple):
        n = len(dataset)
        if all(isinstance(r, str) for r in dataset):
            return _Source("text", list(dataset), n, None)
        if all(isinstance(r, Mapping) for r in dataset):
            rows = [dict(r) for r in dataset]
            template = rows[0] if rows else None
            if all("input_ids" in r for r in rows):
                return _Source("tokens", rows, n, template)
            for kind, needed in (
                ("prompt_completion", ("prompt", "completion")),
                ("messages", ("messages",)),
            ):
                if all(all(f in r for f in needed) for r in rows):
                    return _Source(kind, rows, n, template, _conversational(kind, rows, "the dataset"))
            if all(text_field in r for r in rows):
                return _Source("dicts", rows, n, template)
        raise CanaryError(f"{supported}; got a list whose rows are not all texts or all such dicts")
    raise CanaryError(f"{supported}; got {type(dataset).__name__}")


def _prompt_for(src: _Source, prompt: str | None) -> str | None:
    """The user text before a canary in prompt-completion and conversational rows (None for the others)."""
    if src.kind not in ("prompt_completion", "messages"):
        return None
    if prompt is not None:
        return prompt
    text_format = src.kind == "prompt_completion" and not src.conversational
    return DEFAULT_PROMPT + "\n" if text_format else DEFAULT_PROMPT


def _empty_like(column: str, value: Any) -> Any:
    """A canary row's value for a column it does not use: nothing, in the column's shape."""
    if column == "chat_template_kwargs":  # render the canary as the other rows are rendered
        return copy.deepcopy(value)
    if isinstance(value, list | tuple):
        return []
    return None


def _make_row(
    src: _Source,
    canary: Canary,
    k: int,
    fixed_len: int | None,
    text_field: str,
    prompt: str | None,
    rng: np.random.Generator,
) -> Any:
    row: dict[str, Any]
    if src.kind == "text" and not src.hf:
        return canary.text  # a list of strings
    if src.kind in ("text", "dicts"):
        row = {text_field: canary.text}
    elif src.kind == "prompt_completion":
        assert prompt is not None
        if src.conversational:
            row = {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": canary.text}],
            }
        else:
            row = {"prompt": prompt, "completion": canary.text}
    elif src.kind == "messages":
        assert prompt is not None
        row = {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": canary.text}]
        }
    else:
        rows = src.rows or []
        ids = list(canary.tokens[max(0, canary.secret_start - k) :])
        if fixed_len is not None and fixed_len > len(ids) and rows:
            filler = list(rows[int(rng.integers(len(rows)))]["input_ids"])
            ids = (ids + filler)[:fixed_len]
        row = {"input_ids": ids}
        for column in src.template or {}:
            if column in _TOKEN_COLUMNS:
                row[column] = _TOKEN_COLUMNS[column](ids)
    for column, value in (src.template or {}).items():
        if column not in row:
            row[column] = _empty_like(column, value)
    return row


def _rebuild(dataset: Any, src: _Source, order: list[Any], made: list[Any]) -> Any:
    if not _is_hf_dataset(dataset):
        rows = src.rows or []
        return [made[idx][1] if is_canary else rows[idx] for _key, is_canary, idx in order]
    from datasets import Dataset, concatenate_datasets

    add = Dataset.from_list([r for _k, r, _c in made], features=dataset.features)
    merged = concatenate_datasets([dataset, add])
    n = len(dataset)
    indices = [idx if not is_canary else n + idx for _key, is_canary, idx in order]
    return merged.select(indices)


# --- pre-flight ----------------------------------------------------------------------------------------------


@dataclass
class PreflightReport:
    """What the pre-flight found: occurrences per inserted canary, the probe windows as trained, twins seen."""

    found: dict[str, int]
    windows: dict[str, tuple[int, ...]]
    scanned_rows: int
    total_rows: int | None
    twins_found: list[str]
    warnings: list[str]


def _rows(dataset: Any, limit: int) -> tuple[Callable[[int], Any] | None, list[Any] | None, int | None]:
    try:
        n = len(dataset)
        return dataset.__getitem__, None, n
    except TypeError:
        rows = []
        for i, row in enumerate(dataset):
            if i >= limit:
                break
            rows.append(row)
        return None, rows, None


def preflight(
    manifest: CanaryManifest,
    dataset: Any,
    *,
    prefix_len: int,
    suffix_len: int,
    collator: Callable[[list[Any]], Any] | None = None,
    scan_limit: int = 200_000,
    tokenizer: Any = None,
) -> PreflightReport:
    """Check, before training, that the inserted canaries are in `dataset` (the one the trainer uses), that their
    secret tokens receive loss under `collator`, and that each has prefix_len tokens of context before it.

    The rows recorded by `inject` are checked first; if the dataset was transformed since (tokenized, filtered,
    packed), up to `scan_limit` rows are searched for each secret's token ids. In packed rows (`seq_lengths`,
    `position_ids`) the context is taken from the canary's own sequence only: the model never attends across. Raises CanaryError naming the
    canary and the fix; returns the probe window of each inserted canary as it appears in the data. `tokenizer`
    (the trainer's) lets a canary that is missing because it was tokenized otherwise be told as such.
    """
    from memwatch.probes import example_tokens, sequence_starts

    manifest.check_spec(prefix_len, suffix_len)
    if dataset is None:
        raise CanaryError("canaries were given but there is no training dataset to check them against")
    k, m = prefix_len, suffix_len
    get, cached, total = _rows(dataset, scan_limit)

    def row(i: int) -> Any:
        return get(i) if get is not None else cached[i]  # type: ignore[index]

    n_rows = total if total is not None else len(cached or [])
    secrets = {c.id: np.asarray(c.secret, dtype=np.int64) for c in manifest.canaries}
    by_pair: dict[tuple[int, int], list[str]] = {}
    for cid, sec in secrets.items():
        by_pair.setdefault((int(sec[0]), int(sec[1]) if m > 1 else -1), []).append(cid)
    occurrences: dict[str, list[tuple[int, int]]] = {cid: [] for cid in secrets}

    def search(i: int) -> None:
        parsed = example_tokens(row(i))
        if parsed is None:
            return
        arr = np.asarray(parsed[0], dtype=np.int64)
        if len(arr) < m:
            return
        if m > 1:
            starts = np.flatnonzero(np.isin(arr[:-1], [p[0] for p in by_pair]))
            candidates = [(int(h), (int(arr[h]), int(arr[h + 1]))) for h in starts if h + 1 < len(arr)]
        else:
            candidates = [(int(h), (int(arr[h]), -1)) for h in range(len(arr))]
        for h, pair in candidates:
            for cid in by_pair.get(pair, ()):
                if h + m <= len(arr) and np.array_equal(arr[h : h + m], secrets[cid]):
                    occurrences[cid].append((i, h))

    recorded = (manifest.injection or {}).get("positions", {})
    fast = bool(recorded) and (manifest.injection or {}).get("rows_after") == total
    if fast:
        for positions in recorded.values():
            for i in positions:
                if 0 <= i < n_rows:
                    search(i)
        # Every recorded row must hold its own canary: a dataset of the same length shuffled since would
        # otherwise give wrong counts.
        fast = all(
            {i for i, _h in occurrences.get(cid, [])} >= set(positions) for cid, positions in recorded.items()
        ) and all(occurrences.get(c.id) for c in manifest.inserted)
    scanned = sum(len(v) for v in recorded.values()) if fast else min(n_rows, scan_limit)
    if not fast:
        occurrences = {cid: [] for cid in secrets}
        for i in range(scanned):
            search(i)
    complete = fast or (total is not None and scanned >= total)
    report = PreflightReport({}, {}, scanned, total, [], [])
    for c in manifest.inserted:
        occ = occurrences[c.id]
        report.found[c.id] = len(occ)
        if not occ:
            where = (
                "the training dataset" if complete else f"the first {scanned} rows of the training dataset"
            )
            message = (
                f"inserted canary {c.id} ({c.repetitions}x, {c.family}) is not in {where}: "
                + _missing_hint(manifest, tokenizer)
            )
            if complete:
                raise CanaryError(message)
            report.warnings.append(message + "; the pre-flight scan was incomplete")
            continue
        window = None
        masked = short = 0
        for i, h in occ:
            example = row(i)
            ids, trained = example_tokens(example, collator)  # type: ignore[misc]
            # The context is what the model saw before the secret: within its own sequence when rows are packed
            # (TRL's packing keeps the sequences apart), never the end of the sequence packed before it.
            bounds = [*sequence_starts(example), len(ids)]
            start = max(b for b in bounds if b <= h)
            if h - start < k or any(h < b < h + m for b in bounds):
                short += 1
                continue
            if not all(trained[h : h + m]):
                masked += 1
                continue
            window = tuple(ids[h - k : h + m])
            break
        if window is None:
            if masked:
                raise CanaryError(
                    f"the secret of inserted canary {c.id} ({c.repetitions}x) receives no loss in training: its "
                    "labels are masked (-100) by the dataset or the data collator (completion-only SFT masks the "
                    "prompt). Put the canaries where the loss is computed, or they cannot be memorized."
                )
            raise CanaryError(
                f"inserted canary {c.id} has fewer than prefix_len={k} tokens before its secret in the training "
                "data; it was cut when rows were tokenized or packed. Lengthen the canary template, or lower "
                "MonitorConfig.prefix_len."
            )
        report.windows[c.id] = window
        if complete and len(occ) < c.repetitions:
            report.warnings.append(
                f"inserted canary {c.id} was found {len(occ)} times in the training data, not {c.repetitions}"
            )
    if not fast:
        report.twins_found = [c.id for c in manifest.twins if occurrences[c.id]]
        for cid in report.twins_found:
            report.warnings.append(
                f"the never-inserted twin {cid} occurs in the training data; it is no longer a control"
            )
    return report
