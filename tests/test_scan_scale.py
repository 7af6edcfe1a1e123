"""`memwatch scan` on PEFT adapter checkpoints, with --device-map, and under torchrun (2 gloo processes on CPU).

Run as a script (by torchrun, from the tests below) it is the worker: each process runs `memwatch scan` for every
command line given, the first time with no process group yet (the scan starts and ends its own), then inside one
started here, as a training script's launcher would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

K = M = 16
STEPS = (10, 20, 30)
FIELDS_EQUAL = ("exact", "generated", "prefix_match_len", "match_ratio", "edit_similarity")
FIELDS_CLOSE = ("suffix_nll", "entropy")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny GPT-2 base, three LoRA adapters of it saved as a Trainer run's checkpoint-* folders (random, nonzero
    adapter weights: each checkpoint is another model), the same three merged into full models, and probes."""
    import torch
    from _models import memorizing_panel, tiny_model
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from memwatch.bytetok import ByteTokenizer
    from memwatch.canaries import make_canaries

    root = tmp_path_factory.mktemp("peft")
    tiny_model("gpt2", seed=1).save_pretrained(root / "base")
    for i, step in enumerate(STEPS):
        torch.manual_seed(100 + i)
        lora = LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, init_lora_weights=False
        )
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), lora)
        model.save_pretrained(root / "lora" / f"checkpoint-{step}")
        # The same weights as a full model: what the adapter scan must equal.
        merged = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(root / "base"), root / "lora" / f"checkpoint-{step}"
        ).merge_and_unload()
        merged.save_pretrained(root / "merged" / f"checkpoint-{step}")
    _, panel = memorizing_panel(K, M)
    (root / "probes.jsonl").write_text("\n".join(json.dumps({"input_ids": row}) for row in panel.tolist()))
    (root / "data.jsonl").write_text(
        "\n".join(json.dumps({"input_ids": [(7 * i + j) % 250 for j in range(48)]}) for i in range(20))
    )
    manifest = make_canaries(
        ByteTokenizer(), tiers=(2,), per_tier=1, prefix_len=K, secret_len=M, references=8
    )
    manifest.save(root / "canaries.json")
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on shared cores: torch's thread pool costs more than it gives (10x here under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scan_args(source, history, probes) -> list[str]:
    lengths = ["--prefix-len", str(K), "--suffix-len", str(M)]
    return [
        "scan",
        str(source),
        "--probes",
        str(probes),
        "--history",
        str(history),
        "--run-name",
        "r",
        *lengths,
    ]


def read(history, name: str = "r"):
    from memwatch.store.runs import History

    with History(history) as h:
        return h.run(name)


def assert_same_numbers(a, b, exposure: bool = False) -> None:
    assert a.ids == b.ids and a.steps.tolist() == b.steps.tolist()
    for name in FIELDS_EQUAL:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in FIELDS_CLOSE:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-4, rtol=0, err_msg=name)
    if exposure:
        np.testing.assert_allclose(a.exposure, b.exposure, atol=1e-3)


def test_a_peft_adapter_scans_like_its_merged_model_and_is_recorded(saved, tmp_path, capsys):
    from memwatch.cli import main
    from memwatch.store.history import HistoryStore

    probes = saved / "probes.jsonl"
    assert main([*scan_args(saved / "lora", tmp_path / "a.sqlite", probes)]) == 0
    assert main([*scan_args(saved / "merged", tmp_path / "m.sqlite", probes)]) == 0
    assert "scanned 3 checkpoint(s)" in capsys.readouterr().err
    adapter, merged = read(tmp_path / "a.sqlite"), read(tmp_path / "m.sqlite")
    assert adapter.steps.tolist() == list(STEPS)
    assert_same_numbers(adapter, merged)  # three adapters, each swapped into the one base loaded
    assert not np.allclose(adapter.suffix_nll[0], adapter.suffix_nll[-1])  # the checkpoints differ
    assert adapter.config["adapter"] == {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["c_attn", "c_fc"],
        "base_model": str(saved / "base"),
    }
    assert "adapter" not in merged.config or merged.config["adapter"] is None
    # The base (adapters off) calibrates the membership signals of an adapter scan; a full model has none.
    with HistoryStore(tmp_path / "a.sqlite", readonly=True) as h:
        (ev, *_) = h.evals(h.runs()[0]["run_id"])
        assert np.isfinite(h.signal_values(ev["eval_id"])["loss_calibrated"]).all()

    # One adapter directory, its base given with --base-model where adapter_config.json's has moved away.
    moved = tmp_path / "moved"
    moved.mkdir()
    config = json.loads((saved / "lora" / "checkpoint-20" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    (moved / "adapter_model.safetensors").write_bytes(
        (saved / "lora" / "checkpoint-20" / "adapter_model.safetensors").read_bytes()
    )
    base = [*scan_args(moved, tmp_path / "b.sqlite", probes)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert f"the base model {tmp_path / 'gone'}" in err and "--base-model PATH" in err
    assert not os.path.exists(tmp_path / "b.sqlite")
    assert main([*base, "--base-model", str(saved / "base")]) == 0
    single = read(tmp_path / "b.sqlite")
    assert single.config["adapter"]["base_model"] == str(saved / "base")
    at_20 = int(np.flatnonzero(merged.steps == 20)[0])
    np.testing.assert_array_equal(single.generated[0], merged.generated[at_20])
    np.testing.assert_allclose(single.suffix_nll[0], merged.suffix_nll[at_20], atol=1e-4)


def test_adapter_and_empty_directories_are_told_apart(saved, tmp_path, monkeypatch, capsys):
    from memwatch.cli import main
    from memwatch.posthoc.scan import ScanError, find_checkpoints

    ckpts = find_checkpoints([str(saved / "lora")])
    assert [(c.step, c.adapter) for c in ckpts] == [(s, True) for s in STEPS]
    assert find_checkpoints([str(saved / "lora" / "checkpoint-10")])[0].adapter
    assert not find_checkpoints([str(saved / "merged")])[0].adapter
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError, match=r"no adapter_config.json .* and no checkpoint-\* folders"):
        find_checkpoints([str(tmp_path / "empty")])
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)  # optimizer state only, say
    with pytest.raises(ScanError, match=r"none of its 1 checkpoint-\* folders has a config\.json"):
        find_checkpoints([str(tmp_path / "run")])
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    (nameless / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    args = [*scan_args(nameless, tmp_path / "h.sqlite", saved / "probes.jsonl")]
    assert main(args) == 2
    assert "names no base model" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "peft", None)  # peft not installed
    args = [*scan_args(saved / "lora", tmp_path / "h.sqlite", saved / "probes.jsonl")]
    assert main(args) == 2
    assert "pip install peft" in capsys.readouterr().err


def test_device_map_auto_loads_through_accelerate(saved, tmp_path):
    from memwatch.cli import main
    from memwatch.posthoc.scan import ScanError, _my_gpus

    one = saved / "merged" / "checkpoint-30"
    probes = saved / "probes.jsonl"
    assert main([*scan_args(one, tmp_path / "d.sqlite", probes)]) == 0
    assert main([*scan_args(one, tmp_path / "e.sqlite", probes), "--device-map", "auto"]) == 0
    assert_same_numbers(read(tmp_path / "e.sqlite"), read(tmp_path / "d.sqlite"))
    # Under torchrun each process spreads its model over its own share of the machine's GPUs.
    assert [_my_gpus(8, r, 2) for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [_my_gpus(3, r, 3) for r in (0, 1, 2)] == [[0], [1], [2]]
    with pytest.raises(ScanError, match="--nproc_per_node"):
        _my_gpus(1, 0, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run torchrun in a session of its own: on a timeout its workers go too, not only the launcher."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.slow
def test_two_processes_write_the_one_process_history(saved, tmp_path):
    """Checkpoints split across 2 ranks (full models with canaries and sampled windows: exposure too; adapters:
    the base's reference measured by both ranks together) and one checkpoint's probes split: the same numbers."""
    from memwatch.cli import main

    canaries = ["--probes", str(saved / "canaries.json"), "--sample-from", str(saved / "data.jsonl")]
    canaries += ["--samples", "7", "--exposure-references", "8"]  # 2 canaries + 2 twins + 7 windows: odd

    def calls(out):
        full = [
            "scan",
            str(saved / "merged"),
            "--history",
            str(out / "full.sqlite"),
            "--run-name",
            "r",
            *canaries,
        ]
        lora = [*scan_args(saved / "lora", out / "lora.sqlite", saved / "probes.jsonl")]
        one = [
            "scan",
            str(saved / "merged" / "checkpoint-20"),
            "--history",
            str(out / "one.sqlite"),
            *canaries,
        ]
        return [full, lora, [*one, "--run-name", "r"]]

    (tmp_path / "1").mkdir()
    for argv in calls(tmp_path / "1"):
        assert main(argv) == 0
    (tmp_path / "2").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += [
        "--master_port",
        str(free_port()),
        __file__,
        str(free_port()),
        json.dumps(calls(tmp_path / "2")),
    ]
    run = launch(command, env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: 0 0 0" in run.stdout, run.stdout
    # Rank 0 alone printed progress and the summary.
    err = " ".join(run.stderr.split())  # rich wraps long lines
    assert err.count("scanned 3 checkpoint(s) on 2 processes, each measuring whole checkpoints") == 2, err[
        -3000:
    ]
    assert err.count("scanned 1 checkpoint(s) on 2 processes, each measuring a share of the probes") == 1
    for name in ("full", "lora", "one"):
        one, two = read(tmp_path / "1" / f"{name}.sqlite"), read(tmp_path / "2" / f"{name}.sqlite")
        assert_same_numbers(two, one, exposure=name != "lora")
        assert two.labels == one.labels
    full = read(tmp_path / "2" / "full.sqlite")
    assert full.group_names() == ["canary", "canary_heldout", "train"]
    assert np.isfinite(full.exposure[:, np.isin(full.groups, ["canary", "canary_heldout"])]).all()
    from memwatch.store.history import HistoryStore

    with (
        HistoryStore(tmp_path / "2" / "lora.sqlite", readonly=True) as h,
        HistoryStore(tmp_path / "1" / "lora.sqlite", readonly=True) as g,
    ):
        (run_two,), (run_one,) = h.runs(), g.runs()
        assert run_two["config"]["adapter"] == run_one["config"]["adapter"]
        for e2, e1 in zip(h.evals(run_two["run_id"]), g.evals(run_one["run_id"]), strict=True):
            np.testing.assert_allclose(
                h.signal_values(e2["eval_id"])["loss_calibrated"],
                g.signal_values(e1["eval_id"])["loss_calibrated"],
                atol=1e-4,
            )
            assert e2["duration"] > 0.001  # the measurement's own time, not rank 0's bookkeeping


if __name__ == "__main__":
    import torch.distributed as dist

    from memwatch.cli import main

    rank = os.environ["RANK"]
    codes = []
    for i, argv in enumerate(json.loads(sys.argv[2])):
        if i == 1:  # from here on the script has started the process group itself (on a store of its own:
            # torchrun's cannot host a second default group in the same processes)
            world = int(os.environ["WORLD_SIZE"])
            store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), world, is_master=rank == "0")
            dist.init_process_group("gloo", store=store, rank=int(rank), world_size=world)
        codes.append(main(argv))
    print(f"rank {rank}: {' '.join(map(str, codes))}", flush=True)
    dist.destroy_process_group()
