"""Paper scale (issue 12): memory and speed of a KOFF step at 1B-8B, beside a PEFT LoRA step.

Random weights built from the shapes koff ships (``koff/models/shapes``; speed and memory do not
depend on the values, and nothing is downloaded). Per shape:

* a KOFF step (learned mask + LoRA + KV memories over 5 domains, the default distillation every
  2nd step) and a PEFT LoRA step (one adapter, same rank, targets, dtype, checkpointing, batch):
  training tokens/s and peak memory (``torch.cuda.max_memory_allocated``);
* ``koff plan``'s prediction beside the measured peak;
* export time and size of a short run (2 steps, through ``koff decompose``'s own path on the
  random base saved as a model folder), and greedy tokens/s of the exported backbone with a
  memory against the dense base (``--no-export`` skips this part, which writes the base to disk).

    python bench/scale.py                                   # on a GPU: every shape, bf16
    python bench/scale.py --shapes llama-3.2-1b --device cpu --steps 2 --batch-size 1 --block-len 128

Writes bench/results/scale.json and scale.md (``--name`` changes the file names) after every shape;
``--resume`` keeps the shapes a cut-off run of the same command measured. On a CPU run it
is a smoke test: it shows the code runs at that size, not how fast a GPU is.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import folder_bytes, git_commit, machine
from decode import PROMPT_TOKENS, batch_one_speeds, export_model
from random_base import DOMAINS, peak_bytes, random_domains, random_model, reset_peak, synchronize
from koff.config import DecomposeConfig
from koff.io import markdown_table, write_json, write_text
from koff.models import resolve_dtype
from koff.plan import GiB, plan_decomposition, read_model_config
from koff.training import Decomposer

SHAPES = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-7b"]
SMOKE_SHAPES = ["smollm2-135m"]  # for a quick check of the export part on a CPU


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


def export_and_generate(shape: str, args, settings: DecomposeConfig) -> dict:
    """A short run through `koff decompose`'s own path on the random base saved as a model folder,
    then `koff export` (time, size) and greedy decoding: exported backbone + a memory vs dense base
    (``bench/decode.py`` breaks the decoding down further)."""
    work = Path(tempfile.mkdtemp(prefix="koff-scale-export-"))
    try:
        base, blocks, export_seconds, summary = export_model("shape:" + shape, settings, work)
        speeds = batch_one_speeds(work, base, blocks[0][:1, :PROMPT_TOKENS], args.device, settings.dtype, args.new_tokens)
        return {"export_seconds": export_seconds, "backbone_bytes": folder_bytes(work / "export" / "backbone"),
                "dense_bytes": folder_bytes(work / "base"), "memory_bytes": folder_bytes(work / "export" / "memories" / "d0"),
                "parameters": summary["parameters"], "dense_parameters": summary["dense_parameters"],
                "greedy_tokens_per_s_koff_with_memory": speeds["koff_memory"],
                "greedy_tokens_per_s_koff_no_memory": speeds["koff_backbone"],
                "greedy_tokens_per_s_hf_backbone": speeds["hf_backbone"],
                "greedy_tokens_per_s_dense": speeds["hf_dense"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
    result = {"shape": shape, "plan_peak_bytes": plan.training_peak, "plan": plan.training, "koff": koff, "peft": peft,
              "koff_over_peft_step": koff["seconds_per_step"] / peft["seconds_per_step"],
              "plan_over_measured": None if koff["peak_bytes"] is None else plan.training_peak / koff["peak_bytes"]}
    if args.export:
        result["export"] = export_and_generate(shape, args, settings)
        print(f"{shape}: export {result['export']}", flush=True)
    return result


def table(results: list[dict]) -> str:
    def gib(n):
        return "–" if n is None else f"{n / GiB:.1f}"

    rows = [[r["shape"], f"{r['koff']['tokens_per_s']:.0f}", f"{r['peft']['tokens_per_s']:.0f}",
             f"{r['koff_over_peft_step']:.2f}x", gib(r["koff"]["peak_bytes"]), gib(r["plan_peak_bytes"]),
             gib(r["peft"]["peak_bytes"]), "on" if r["koff"]["gradient_checkpointing"] else "off"] for r in results]
    text = markdown_table(["shape", "KOFF tokens/s", "PEFT LoRA tokens/s", "KOFF step / PEFT step", "KOFF peak GiB",
                           "koff plan GiB", "PEFT peak GiB", "checkpointing"], rows)
    exported = [r for r in results if "export" in r]
    if exported:
        rows = [[r["shape"], f"{r['export']['export_seconds']:.1f}", gib(r["export"]["backbone_bytes"]),
                 gib(r["export"]["dense_bytes"]), f"{r['export']['memory_bytes'] / 1e6:.1f}",
                 f"{r['export']['greedy_tokens_per_s_koff_with_memory']:.1f}", f"{r['export']['greedy_tokens_per_s_dense']:.1f}"]
                for r in exported]
        text += "\n\n" + markdown_table(["shape", "export s", "backbone GiB", "dense GiB", "memory MB",
                                          "greedy tokens/s, backbone + memory", "greedy tokens/s, dense"], rows)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, choices=SHAPES + SMOKE_SHAPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (an even number: half of them distil)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                        help="also export a short run and time greedy decoding (saves the random base: disk!)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens timed per generation")
    parser.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and table")
    parser.add_argument("--name", default="scale")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the shapes that a cut-off run of the same command, machine and commit measured")
    args = parser.parse_args()
    # --resume is left out of the recorded command: a resumed run is the same request
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv if a != "--resume")
    out = Path(args.out)
    report = {"command": command, "machine": machine(args.device), "commit": git_commit(),  # the tree the runs use
              "batch": [args.batch_size, args.block_len], "domains": DOMAINS, "results": []}
    done = finished_shapes(out / f"{args.name}.json", report) if args.resume else {}
    for shape in args.shapes:
        if shape in done:
            print(f"{shape}: measured earlier by this request, reused", flush=True)
            report["results"].append(done[shape])
        else:
            report["results"].append(measure(shape, args))
            reset_peak(args.device)
        write_report(out, args.name, report)  # after every shape: a run cut off keeps what it measured
    print(write_report(out, args.name, report))


def finished_shapes(path: Path, report: dict) -> dict[str, dict]:
    """Shapes an earlier, cut-off run of the same request (command, machine, commit, batch) measured."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    same = all(earlier.get(k) == report[k] for k in ("command", "machine", "commit", "batch"))
    return {r["shape"]: r for r in earlier["results"]} if same else {}


def write_report(out: Path, name: str, report: dict) -> str:
    write_json(out / f"{name}.json", report)
    text = f"# {name}\n\n`{report['command']}`\n\n{report['machine']}, commit {report['commit']}\n\n{table(report['results'])}\n"
    write_text(out / f"{name}.md", text)
    return text


if __name__ == "__main__":
    main()
