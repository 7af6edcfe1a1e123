"""Attach memwatch to a Hugging Face Trainer: the demo's setup, spelled out.

    python examples/trainer_callback.py --steps 600 --out runs/example

A tiny GPT-2 (built from a config, byte-level vocabulary) learns Python's standard library; a few canaries are
inserted 64 times and their twins never. memwatch evaluates every 100 steps and writes
runs/example/memwatch/{history.sqlite,tb}; the Trainer's own TensorBoard run lands in runs/example/runs and its
checkpoints (every --save-every steps) in runs/example/checkpoint-*, which examples/scan_checkpoints.py scans.
"""

from __future__ import annotations

import argparse
import random

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from memwatch import MemWatchCallback, MonitorConfig, Probe
from memwatch.demo import stdlib_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default="runs/example")
    ap.add_argument(
        "--save-every",
        type=int,
        default=100,
        help="checkpoint interval (0: none); scan_checkpoints.py reads them",
    )
    args = ap.parse_args()

    # 1. Data: 128-byte chunks of standard-library source, tokenized as bytes (ids 0..255).
    train_text, held_text = stdlib_corpus(200_000)
    chunk = lambda b: [list(b[i : i + 128]) for i in range(0, len(b) - 127, 128)]  # noqa: E731
    train_rows, held_rows = chunk(train_text), chunk(held_text)

    # 2. Canaries: a 32-byte sentence + a 16-character secret. Inserted ones start their own training row,
    #    64 times each; twins come from the same distribution and are never inserted.
    rng = random.Random(0)
    secret = lambda: "".join(rng.choice("0123456789abcdef") for _ in range(16))  # noqa: E731
    canaries = []
    for i, who in enumerate(["ada", "ben", "cy", "dee"]):
        text = f"# {who}'s vpn token is: ".rjust(32, "#") + secret()
        tokens = list(text.encode())
        inserted = i < 2
        canaries.append(Probe(tokens, "canary" if inserted else "canary_heldout", {"repetitions": 64}))
        if inserted:
            for _ in range(64):
                train_rows.insert(rng.randrange(len(train_rows)), (tokens + rng.choice(train_rows))[:128])

    # 3. The model, built from a config: no download.
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=257,
            n_positions=128,
            n_embd=128,
            n_layer=4,
            n_head=4,
            bos_token_id=256,
            eos_token_id=256,
        )
    )

    # 4. memwatch: one callback. Everything else is an ordinary Trainer setup.
    memwatch = MemWatchCallback(
        MonitorConfig(every_n_steps=100, prefix_len=32, suffix_len=16, train_probes=128, heldout_probes=64),
        canaries=canaries,
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=16,
            learning_rate=2e-3,
            lr_scheduler_type="cosine",
            logging_steps=50,
            save_strategy="steps" if args.save_every else "no",
            save_steps=args.save_every or 500,
            report_to=["tensorboard"],
            use_cpu=True,
            seed=0,
        ),
        train_dataset=[{"input_ids": r, "labels": r} for r in train_rows],
        eval_dataset=[{"input_ids": r, "labels": r} for r in held_rows],
        callbacks=[memwatch],
    )
    trainer.train()
    print(f"\ntensorboard --logdir {args.out}\nmemwatch report {args.out} --format json")


if __name__ == "__main__":
    main()
