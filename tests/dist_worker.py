"""A worker for tests/test_distributed.py, launched with torchrun (or run alone for the one-process reference).

python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py monitor ddp OUT
python tests/dist_worker.py monitor none OUT
python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py trainer ddp OUT
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

K, M = 16, 16


def wrap(model, kind):
    if kind == "none":
        return model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(kind)


def monitor_mode(kind, out):
    from _models import memorizing_panel, trained_model

    from memwatch import Monitor, MonitorConfig
    from memwatch.bytetok import ByteTokenizer
    from memwatch.canaries import inject, make_canaries

    if kind != "none":
        torch.distributed.init_process_group("gloo")
    import copy

    model = copy.deepcopy(trained_model("gpt2", K, M))  # identical on every rank (deterministic CPU training)
    train, panel = memorizing_panel(K, M)
    man = make_canaries(ByteTokenizer(), tiers=(2, 8), per_tier=1, prefix_len=K, secret_len=M, references=24)
    rows = [{"input_ids": r.tolist()} for r in train] + [
        {"input_ids": list(range(i, i + 40))} for i in range(20)
    ]
    data, man = inject(rows, man)
    wrapped = wrap(model, kind)
    from memwatch.distributed import needs_synced_forward

    assert needs_synced_forward(wrapped) == kind.startswith("fsdp"), (
        kind
    )  # sharded parameters: synced forwards
    cfg = MonitorConfig(
        every_n_steps=1,
        prefix_len=K,
        suffix_len=M,
        entropy_window=8,
        console=False,
        batch_size=3,
        exposure_references=24,
        train_probes=10,
        heldout_probes=0,
    )
    monitor = Monitor(
        cfg, probes=[{"input_ids": r.tolist(), "group": "partial"} for r in panel[4:]], canaries=man
    )
    monitor.setup(wrapped, output_dir=out, train_data=data, run_name="dist")
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.05)
    batch = torch.stack([torch.tensor(r["input_ids"][: K + M]) for r in data[:4]])
    for step in range(3):
        record = monitor.evaluate(wrapped, step)
        assert record is not None, monitor.failures
        wrapped.train()
        loss = wrapped(input_ids=batch, labels=batch).loss  # the same data on every rank: identical updates
        loss.backward()
        opt.step()
        opt.zero_grad()
    monitor.finish(wrapped, 3)
    if kind != "none":
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def trainer_mode(kind, out):
    from _models import VOCAB, tiny_model
    from transformers import Trainer, TrainingArguments

    from memwatch import MemWatchCallback, MonitorConfig

    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": r.tolist(), "labels": r.tolist()}
        for r in torch.randint(0, VOCAB, (16, 48), generator=g)
    ]
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        max_steps=12,
        learning_rate=3e-3,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo",
    )
    cb = MemWatchCallback(MonitorConfig(every_n_steps=4, prefix_len=K, suffix_len=M, console=False))
    Trainer(
        model=tiny_model("gpt2"), args=args, train_dataset=rows, eval_dataset=rows[:4], callbacks=[cb]
    ).train()
    print(f"rank {os.environ.get('RANK', 0)} evaluated {cb.monitor.evaluated_steps}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, kind, out = sys.argv[1:4]
    (monitor_mode if mode == "monitor" else trainer_mode)(kind, out)
    # Skip interpreter finalization: gloo's worker threads can abort the process while Python tears
    # down (pytorch/pytorch#179291), a torch shutdown race that says nothing about what is tested here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
