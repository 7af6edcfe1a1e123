"""The checks that need a GPU, in one script (well under 8 minutes on one H100/H200):

    PYTHONPATH=. python benchmarks/gpu_checks.py                     # CUDA: the real run
    PYTHONPATH=. python benchmarks/gpu_checks.py --device cpu --quick  # smoke run of the same code, small sizes

(a) correctness of memwatch.extract on CUDA against per-row HF generate (greedy, no EOS, explicit all-ones mask),
    on a ~160M GPT-NeoX built from a config: fp32 must be equal token for token; bf16 disagreements are listed,
    each with its near-tie flag and generate's top-1/top-2 margin at the first differing step;
(b) the GPU rows of benchmarks/extraction.py (N=1024, bf16): memwatch vs two-pass vs the floor, and the peak
    extra GPU memory of an extraction;
(c) a short Trainer overhead run: benchmarks/overhead.py's two runs (without, then with memwatch) on the device.

Results go to stdout and, when $OUT is set, to $OUT/gpu_checks.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import extraction as bench  # benchmarks/extraction.py (this script's folder is on sys.path)
import numpy as np
import overhead  # benchmarks/overhead.py
import torch

import memwatch
from memwatch.engine.extraction import tie_threshold


class Report:
    """Prints each line and keeps it for $OUT/gpu_checks.txt."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> None:
        out = os.environ.get("OUT")
        if out:
            with open(os.path.join(out, "gpu_checks.txt"), "w") as f:
                f.write("\n".join(self.lines) + "\n")


def sharpen(model: torch.nn.Module, spread: float = 4.0, offset: float = 30.0) -> None:
    """Give random weights a trained LM's logit scale: a spread of `spread` across the vocabulary on top of a
    per-position offset of about `offset` shared by all tokens (random init gives near-uniform, all-tie logits)."""
    head = model.get_output_embeddings().weight
    hidden = head.shape[1]
    g = torch.Generator(device="cpu").manual_seed(0)
    shared = torch.randn(hidden, generator=g).to(head.device, head.dtype)
    with torch.no_grad():
        head.mul_(spread / (head.float().std() * hidden**0.5))
        head.add_(offset * shared / shared.float().norm())


def mixed_panel(model, n: int, k: int, m: int, device: str) -> torch.Tensor:
    """Rows that follow the model's own greedy continuation up to a first miss at d (cycling over 0 .. m, m
    meaning exact), then depart from it: divergence points differ within each batch."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(2)
    prefixes = torch.randint(0, vocab, (n, k), generator=g).to(device)
    greedy = bench.greedy(model, prefixes, m, 64)
    points = [0, 1, m // 4, m // 2, 3 * m // 4, m - 2, m - 1, m]
    suffix = greedy.clone()
    for i in range(n):
        d = points[i % len(points)]
        if d < m:
            suffix[i, d] = (suffix[i, d] + 1) % vocab
            suffix[i, d + 1 :] = torch.randint(0, vocab, (m - d - 1,), generator=g).to(device)
    return torch.cat([prefixes, suffix], 1)


@torch.no_grad()
def per_row_generate(model, x: torch.Tensor, k: int, m: int) -> tuple[np.ndarray, list[torch.Tensor]]:
    tokens, logits = [], []
    for row in x:
        p = row[None, :k]
        out = model.generate(
            p,
            attention_mask=torch.ones_like(p),
            max_new_tokens=m,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens.append(out.sequences[0, k:].cpu())
        logits.append(torch.stack([step[0].float().cpu() for step in out.logits]))  # [m, V]
    return torch.stack(tokens).numpy(), logits


def check_correctness(say: Report, name: str, device: str, n: int, k: int, m: int) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        label = "fp32" if dtype == torch.float32 else "bf16"
        model = bench.build_model(name, device, dtype)
        sharpen(model)
        x = mixed_panel(model, n, k, m, device)
        t0 = time.perf_counter()
        res = memwatch.extract(model, x, prefix_len=k, suffix_len=m)
        took = time.perf_counter() - t0
        ref, step_logits = per_row_generate(model, x, k, m)
        differ = np.flatnonzero((res.generated != ref).any(axis=1))
        say(
            f"(a) {label}: {n} rows, decoding {res.decoding}, exact {res.exact.mean():.0%}, first misses "
            f"{sorted(set(res.prefix_match_len.tolist()))}, extract {took:.2f}s; rows differing from per-row "
            f"generate: {len(differ)}; near-tie rows: {res.near_tie.sum()}"
        )
        for i in differ:
            j = int(np.argmax(res.generated[i] != ref[i]))
            top2 = step_logits[i][j].topk(2).values
            limit = float(tie_threshold(top2[:1], dtype)[0])
            say(
                f"    row {i}: first differs at suffix position {j} (ours {res.generated[i, j]}, generate "
                f"{ref[i, j]}); near_tie={bool(res.near_tie[i])}; generate's top-1 {top2[0]:.3f}, margin "
                f"{top2[0] - top2[1]:.4f}, tie threshold {limit:.4f}"
            )
        verdict = "PASS" if (len(differ) == 0 if label == "fp32" else res.near_tie[differ].all()) else "FAIL"
        want = "equal to generate" if label == "fp32" else "every disagreement on a near-tie row"
        say(f"    {verdict}: {want}")
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def check_speed(say: Report, name: str, device: str, n: int, k: int, m: int, repeats: int) -> None:
    model = bench.build_model(name, device, torch.bfloat16)
    panels = bench.make_panels(model, n, k, m, model.config.vocab_size, n, device)
    w = min(16, k - 1)
    say(f"(b) benchmarks/extraction.py rows: {name}, bf16, N={n}, k={k}, m={m}, w={w}, batch {n}, {device}")
    say(bench.table(bench.measure(model, panels, k, m, w, n, repeats, device)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small model and sizes: a smoke run of the script")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --quick for a smoke run")
    say = Report()
    name = "neox-tiny" if args.quick else "neox160m"
    k = m = 16 if args.quick else 32
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    say(f"memwatch GPU checks: {gpu}, torch {torch.__version__}, {'quick' if args.quick else 'full'} run")
    t0 = time.perf_counter()
    check_correctness(say, name, args.device, 16 if args.quick else 96, k, m)
    check_speed(say, name, args.device, 32 if args.quick else 1024, k, m, 1 if args.quick else 3)
    # The final evaluation counts inside the window: as many steps as overhead.py's default amortize it.
    steps = 60 if args.quick else 2000
    say(
        f"(c) benchmarks/overhead.py on {args.device}: {steps} steps without, then with MemWatchCallback defaults"
    )
    share, ratio = overhead.compare(steps, 20, 0, args.device, say)
    say(
        f"    memwatch's share of the steady window {share:.2%} (goal <= 2%); steps/s with / without {ratio:.3f}"
    )
    say(f"total {time.perf_counter() - t0:.0f}s")
    say.save()


if __name__ == "__main__":
    sys.exit(main())
