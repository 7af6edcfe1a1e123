"""memwatch in a custom Accelerate training loop, with its state saved and restored by Accelerate.

    python examples/accelerate_loop.py --steps 300 --out runs/accelerate
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --cpu   # the same on two CPU processes

(`accelerate launch --num_processes 2` starts one process on a machine without GPUs; torchrun with
Accelerator(cpu=True) starts two.) Every rank runs watch.step(); rank 0 writes
runs/accelerate/memwatch/{history.sqlite,tb} and prints the loss every --log-every steps.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from memwatch.integrations.accelerate import MemWatch

from memwatch import AlertConfig, MonitorConfig
from memwatch.demo import demo_model, stdlib_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/accelerate")
    ap.add_argument("--log-every", type=int, default=25, help="print the loss every N steps (default: 25)")
    ap.add_argument(
        "--cpu", action="store_true", help="Accelerator(cpu=True): processes on CPU, e.g. torchrun"
    )
    args = ap.parse_args()

    accelerator = Accelerator(project_dir=args.out, cpu=args.cpu)
    text, held = stdlib_corpus(60_000)
    rows = torch.tensor([list(text[i : i + 128]) for i in range(0, len(text) - 127, 128)])
    loader = torch.utils.data.DataLoader(rows, batch_size=16, shuffle=True)
    model = demo_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    watch = MemWatch(
        MonitorConfig(
            every_n_steps=50,
            prefix_len=32,
            suffix_len=16,
            train_probes=128,
            heldout_probes=32,
            alerts=AlertConfig(
                extraction_rate={"train": 0.5}, actions={"extraction_rate": ("stop_training",)}
            ),
        ),
        train_data=[{"input_ids": r.tolist()} for r in rows],
        eval_data=[{"input_ids": list(held[i : i + 128])} for i in range(0, 32 * 128, 128)],
    )
    accelerator.register_for_checkpointing(watch)  # memwatch's state travels with accelerator.save_state
    watch.start(accelerator, model, 0)  # the baseline before training

    step = 0
    while step < args.steps:
        for batch in loader:
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % args.log_every == 0:  # progress between evaluations (rank 0 prints)
                accelerator.print(f"step {step}/{args.steps}  loss {loss.item():.3f}")
            record = watch.step(accelerator, model, step)
            if record is not None and "stop_training" in record.actions:
                accelerator.print(f"memwatch asked to stop at step {step}")
                step = args.steps
            if step >= args.steps:
                break
    watch.finish(accelerator, model, step)  # prints where the history and TensorBoard went


if __name__ == "__main__":
    main()
