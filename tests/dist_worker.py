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
    if (
        kind == "zero3"
    ):  # DeepSpeed ZeRO-3 on CPU (DS_ACCELERATOR=cpu): parameters partitioned across the ranks
        import deepspeed

        config = {
            "train_batch_size": 4
            * torch.distributed.get_world_size(),  # explicit: no accelerator to infer from
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told: one process's SGD does not clip
        }
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine
    raise ValueError(kind)


def monitor_mode(kind, out):
    """kind: none, ddp, fsdp1, fsdp2; "<kind>-oom": every rank runs out of memory in forwards of more than 2 rows
    (a synced extraction must retry together, at a smaller batch)."""
    from _models import memorizing_panel, trained_model

    from memwatch import AlertConfig, Monitor, MonitorConfig
    from memwatch.bytetok import ByteTokenizer
    from memwatch.canaries import inject, make_canaries

    kind, _, variant = kind.partition("-")
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
    from memwatch.live.distributed import needs_synced_forward

    assert needs_synced_forward(wrapped) == kind.startswith(("fsdp", "zero3")), (
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
        train_probes=9,  # an odd panel: the last shard is padded
        heldout_probes=0,
        # every train probe is extracted: an alert whose action every rank must take
        alerts=AlertConfig(actions={"extraction_rate": ("stop_training",)}),
    )
    partial = [{"input_ids": r.tolist(), "group": "partial"} for r in panel[4:]]
    monitor = Monitor(cfg, probes=partial, canaries=man)
    if variant == "oom":

        def hook(module, args):
            if not module.training and args[0].shape[0] > 2:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.transformer.h[0].register_forward_pre_hook(hook)
    monitor.setup(wrapped, output_dir=out, train_data=data, run_name="dist")
    print(f"panel of {len(monitor.panel)} probes", flush=True)
    zero3 = kind == "zero3"
    opt = None if zero3 else torch.optim.SGD(wrapped.parameters(), lr=0.05)
    batch = torch.stack([torch.tensor(r["input_ids"][: K + M]) for r in data[:4]])
    rank = torch.distributed.get_rank() if kind != "none" else 0
    for step in range(3):
        record = monitor.evaluate(wrapped, step)
        assert record is not None, monitor.failures
        print(
            f"rank {rank} step {step} actions {sorted(record.actions)} batch {monitor.batch_size}", flush=True
        )
        wrapped.train()
        loss = wrapped(input_ids=batch, labels=batch).loss  # the same data on every rank: identical updates
        if (
            zero3
        ):  # the engine owns backward and the optimizer step (gradients reduce-scattered to their shards)
            wrapped.backward(loss)
            wrapped.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()
    monitor.finish(wrapped, 3)
    if kind != "none":
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def setup_error_mode(kind, out):
    """Only rank 0 opens the history; it cannot (the output directory is under a file): every rank must learn it."""
    from _models import tiny_model

    from memwatch import Monitor, MonitorConfig
    from memwatch.live.monitor import SetupError

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    blocker = os.path.join(out, "a_file")
    if rank == 0:
        with open(blocker, "w") as f:
            f.write("x")
    torch.distributed.barrier()
    cfg = MonitorConfig(
        prefix_len=K, suffix_len=M, console=False, output_dir=os.path.join(blocker, "memwatch")
    )
    monitor = Monitor(cfg, probes=[list(range(K + M))])
    try:
        monitor.setup(tiny_model("gpt2"), output_dir=out)
        print(f"rank {rank} set up", flush=True)
    except SetupError as exc:
        print(f"rank {rank} SetupError: {str(exc)[:60]}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def adaptive_mode(kind, out):
    """The adaptive interval: each rank times its own steps (rank 1's are slower), rank 0's interval rules."""
    import time

    from _models import memorizing_panel, trained_model

    from memwatch import Monitor, MonitorConfig

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    model = trained_model("gpt2", K, M)
    train, _ = memorizing_panel(K, M)
    cfg = MonitorConfig(prefix_len=K, suffix_len=M, entropy_window=8, console=False, max_overhead=0.5)
    monitor = Monitor(cfg)
    monitor.setup(model, output_dir=out, train_data=[{"input_ids": r.tolist()} for r in train])
    monitor.evaluate(model, 0)
    for step in range(1, 61):
        time.sleep(0.005 * (1 + 4 * rank))
        monitor.on_step(model, step)
    monitor.finish(model, 60)
    print(f"rank {rank} evaluated {monitor.evaluated_steps} interval {monitor.cadence.interval}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def trainer_mode(kind, out):
    """A Trainer under DDP ("ddp") or alone ("none"); "-frozen" trains with learning rate 0, so that the model at
    every evaluation is the same in both and the histories can be compared number for number."""
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
        learning_rate=0.0 if kind.endswith("frozen") else 3e-3,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo" if kind.startswith("ddp") else None,
    )
    cb = MemWatchCallback(MonitorConfig(every_n_steps=4, prefix_len=K, suffix_len=M, console=False))
    Trainer(
        model=tiny_model("gpt2"), args=args, train_dataset=rows, eval_dataset=rows[:4], callbacks=[cb]
    ).train()
    print(f"rank {os.environ.get('RANK', 0)} evaluated {cb.monitor.evaluated_steps}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, kind, out = sys.argv[1:4]
    modes = {"monitor": monitor_mode, "trainer": trainer_mode, "setup_error": setup_error_mode}
    modes["adaptive"] = adaptive_mode
    modes[mode](kind, out)
    # Skip interpreter finalization: gloo's worker threads can abort the process while Python tears
    # down (pytorch/pytorch#179291), a torch shutdown race that says nothing about what is tested here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
