"""Paper scale (issue 12): memory and speed of a KOFF step at 1B-8B, beside a PEFT LoRA step.

Random weights built from the shapes koff ships (``koff/models/shapes``; speed and memory do not
depend on the values, and nothing is downloaded). Per shape:

* a KOFF step (learned mask + LoRA + KV memories over 5 domains, the default distillation every
  2nd step) and a PEFT LoRA step (one adapter, same rank, targets, dtype, checkpointing, batch):
  training tokens/s and peak memory (``torch.cuda.max_memory_allocated``);
* ``koff plan``'s prediction beside the measured peak;
* (``--parts export``) export time and size, and greedy tokens/s of the exported backbone with a
  memory against the dense base.

    python bench/scale.py                                   # on a GPU: every shape, bf16
    python bench/scale.py --shapes llama-3.2-1b --device cpu --steps 2 --batch-size 1 --block-len 128

Writes bench/results/scale.json and scale.md (``--name`` changes the file names). On a CPU run it
is a smoke test: it shows the code runs at that size, not how fast a GPU is.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from common import git_commit, machine
from koff.config import DecomposeConfig
from koff.data.blocks import DomainData
from koff.io import markdown_table, write_json, write_text
from koff.models import resolve_dtype
from koff.plan import GiB, plan_decomposition, read_model_config
from koff.training import Decomposer

SHAPES = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-7b"]
DOMAINS = 5


def random_model(shape: str, dtype: torch.dtype, device: str):
    config = read_model_config("shape:" + shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False), config


def random_domains(vocab: int, block_len: int, blocks: int = 64) -> list[DomainData]:
    g = torch.Generator().manual_seed(0)
    return [DomainData(f"d{i}", "random", torch.randint(0, vocab, (blocks, block_len), generator=g),
                       torch.randint(0, vocab, (4, block_len), generator=g)) for i in range(DOMAINS)]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def timed_steps(step, steps: int, device: str) -> float:
    """Seconds per step over ``steps`` steps (after the caller's warm-up)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def koff_step(shape: str, args, settings: DecomposeConfig) -> dict:
    dtype = resolve_dtype(settings.dtype, args.device)
    base, config = random_model(shape, dtype, args.device)
    domains = random_domains(config.vocab_size, args.block_len)
    reset_peak(args.device)
    decomposer = Decomposer(settings, base=base, tokenizer=None, domains=domains)
    for _ in range(args.warmup):
        decomposer.train_step()
    seconds = timed_steps(decomposer.train_step, args.steps, args.device)
    result = {"seconds_per_step": seconds, "tokens_per_s": args.batch_size * args.block_len / seconds,
              "peak_bytes": peak_bytes(args.device), "gradient_checkpointing": decomposer.model.gradient_checkpointing}
    del decomposer, base
    return result


def peft_step(shape: str, args, settings: DecomposeConfig, checkpointing: bool) -> dict:
    """One LoRA adapter through PEFT on the same base: what a user of the field runs today."""
    from peft import LoraConfig, get_peft_model

    dtype = resolve_dtype(settings.dtype, args.device)
    base, config = random_model(shape, dtype, args.device)
    reset_peak(args.device)
    model = get_peft_model(base, LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha,
                                            target_modules=list(settings.lora_targets)))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = args.device.startswith("cuda")
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused, foreach=not fused)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.block_len), device=args.device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    seconds = timed_steps(step, args.steps, args.device)
    result = {"seconds_per_step": seconds, "tokens_per_s": args.batch_size * args.block_len / seconds,
              "peak_bytes": peak_bytes(args.device), "gradient_checkpointing": checkpointing}
    del model, base, optimizer
    return result


def measure(shape: str, args) -> dict:
    settings = DecomposeConfig(model="shape:" + shape, out=tempfile.mkdtemp(prefix="koff-scale-"), device=args.device,
                               batch_size=args.batch_size, block_len=args.block_len, steps=1000, calib_blocks=DOMAINS,
                               gradient_checkpointing=args.gradient_checkpointing, eval=False, checkpoint_every=10**9)
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / GiB if args.device.startswith("cuda") else None
    plan = plan_decomposition(read_model_config(settings.model), settings, DOMAINS, 1,
                              gpu_gb, args.device)
    print(f"{shape}: plan {plan.training_peak / GiB:.1f} GiB (checkpointing {plan.checkpointing})", flush=True)
    koff = koff_step(shape, args, settings)
    print(f"{shape}: koff {koff}", flush=True)
    peft = peft_step(shape, args, settings, koff["gradient_checkpointing"])
    print(f"{shape}: peft {peft}", flush=True)
    return {"shape": shape, "plan_peak_bytes": plan.training_peak, "plan": plan.training, "koff": koff, "peft": peft,
            "koff_over_peft_step": koff["seconds_per_step"] / peft["seconds_per_step"],
            "plan_over_measured": None if koff["peak_bytes"] is None else plan.training_peak / koff["peak_bytes"]}


def table(results: list[dict]) -> str:
    def gib(n):
        return "–" if n is None else f"{n / GiB:.1f}"

    rows = [[r["shape"], f"{r['koff']['tokens_per_s']:.0f}", f"{r['peft']['tokens_per_s']:.0f}",
             f"{r['koff_over_peft_step']:.2f}x", gib(r["koff"]["peak_bytes"]), gib(r["plan_peak_bytes"]),
             gib(r["peft"]["peak_bytes"]), "on" if r["koff"]["gradient_checkpointing"] else "off"] for r in results]
    return markdown_table(["shape", "KOFF tokens/s", "PEFT LoRA tokens/s", "KOFF step / PEFT step", "KOFF peak GiB",
                           "koff plan GiB", "PEFT peak GiB", "checkpointing"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, choices=SHAPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (an even number: half of them distil)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and table")
    parser.add_argument("--name", default="scale")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    commit = git_commit()  # before the runs: the tree they ran on
    results = []
    for shape in args.shapes:
        results.append(measure(shape, args))
        reset_peak(args.device)
    report = {"command": command, "machine": machine(args.device), "commit": commit,
              "batch": [args.batch_size, args.block_len], "domains": DOMAINS, "results": results}
    out = Path(args.out)
    write_json(out / f"{args.name}.json", report)
    text = f"# {args.name}\n\n`{command}`\n\n{report['machine']}, commit {report['commit']}\n\n{table(results)}\n"
    write_text(out / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
