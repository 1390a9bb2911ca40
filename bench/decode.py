"""Greedy decoding speed of an exported backbone (issue 12): where koff's runtime spends its time.

Random weights at a shape koff ships (nothing is downloaded). A 2-step run through ``koff
decompose``'s own path is exported, then one prompt is decoded greedily at batch 1 four ways:

* ``koff + memory``: ``koff.load(...).generate(prompt, memory="d0")`` (LoRA + KV prefix);
* ``koff, no memory``: the same runtime with no memory (the bare backbone through koff's loop);
* ``HF generate, backbone``: ``transformers``' own ``generate`` on the exported backbone module;
* ``HF generate, dense``: ``transformers``' own ``generate`` on the dense base.

The steps between them say what costs what: the loop (koff's vs transformers'), the backbone's
shapes, the memory. ``--profile`` adds torch.profiler's table of the ``koff + memory`` decoding.

    python bench/decode.py                                   # on a GPU: Llama-3.2-1B and 3.1-8B shapes
    python bench/decode.py --shapes tiny-30 --device cpu --dtype bfloat16 --name decode-ops

``tiny-30`` is SmolLM2's depth (30 layers, the same projections) at width 64: on a CPU it counts
the operations a decoded token dispatches in seconds (each one a kernel launch on a GPU, where
decoding at batch 1 is bound by launches); its speeds mean nothing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import command_line, git_commit, machine, top_level_aten_ops
from koff.config import DecomposeConfig
from koff.io import markdown_table, write_json, write_text
from koff.models import resolve_dtype
from random_base import DOMAINS, greedy_tokens_per_s, random_domains, random_model, reset_peak, word_tokenizer
from koff.training import Decomposer

PROMPT_TOKENS = 32
TINY = "tiny-30"


def base_model(shape: str, dtype: torch.dtype, device: str):
    """A shipped shape, or ``tiny-30``: SmolLM2's 30 layers at width 64 (for counting operations)."""
    if shape != TINY:
        return random_model(shape, dtype, device)
    return random_model("smollm2-135m", dtype, device, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=512)


def export_random(shape: str, settings: DecomposeConfig, work: Path):
    """The random base saved as a model folder, a 2-step run on it and its export under ``work``.

    Returns (model config, domains, export seconds, export summary)."""
    from koff.export import export_run

    dtype = resolve_dtype(settings.dtype, settings.device)
    base, config = base_model(shape, dtype, settings.device)
    base.save_pretrained(work / "base")
    word_tokenizer(config.vocab_size, config.eos_token_id).save_pretrained(work / "base")
    del base
    domains = random_domains(config.vocab_size, settings.block_len)
    run = replace(settings, model=str(work / "base"), out=str(work / "run"), steps=2, checkpoint_every=2)
    reset_peak(settings.device)
    Decomposer(run, domains=domains).train()
    reset_peak(settings.device)
    start = time.perf_counter()
    summary = export_run(work / "run", work / "export")
    return config, domains, time.perf_counter() - start, summary


def decode_speeds(shape: str, work: Path, config, prompt_ids: torch.Tensor, device: str, dtype_name: str,
                  new_tokens: int, profile: bool = False) -> tuple[dict, str | None]:
    """Greedy tokens/s four ways (see the module's docstring), and the profiler's table if asked."""
    from koff.runtime import load

    dtype = resolve_dtype(dtype_name, device)
    runtime = load(work / "export", device=device, dtype=dtype_name)
    # transformers 5 rebuilds a Qwen2 tokenizer from the saved vocabulary as byte-level BPE, which
    # encodes the word-level "t123" prompt to nothing: the runtime gets the benchmark's own tokenizer.
    runtime.tokenizer = word_tokenizer(config.vocab_size, config.eos_token_id)
    prompt = " ".join(f"t{i}" for i in prompt_ids.tolist())
    ids = prompt_ids[None].to(device)

    def koff(memory):
        return lambda n: runtime.generate(prompt, memory=memory, max_new_tokens=n)

    def hf(model):
        return lambda n: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                        min_new_tokens=n, do_sample=False, pad_token_id=0)

    ways = {"koff_memory": koff("d0"), "koff_no_memory": koff(None), "hf_backbone": hf(runtime.model.base)}
    speeds = {name: greedy_tokens_per_s(generate, new_tokens, device) for name, generate in ways.items()}
    counts = {name: ops_per_token(generate) for name, generate in ways.items()}
    table = profile_table(koff("d0"), device) if profile else None
    del runtime, ways
    reset_peak(device)
    dense, _ = base_model(shape, dtype, device)
    speeds["hf_dense"], counts["hf_dense"] = greedy_tokens_per_s(hf(dense), new_tokens, device), ops_per_token(hf(dense))
    del dense
    return {"tokens_per_s": speeds, "ops_per_token": {k: c[0] for k, c in counts.items()},
            "host_reads_per_token": {k: c[1] for k, c in counts.items()}}, table


def counted_ops(generate, tokens: int) -> tuple[int, int]:
    """(PyTorch operations ``generate(tokens)`` dispatches, each a kernel launch or more on a GPU;
    reads of one value back to the host, each a wait for the GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(tokens)
    return top_level_aten_ops(prof), sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense")


def ops_per_token(generate, short: int = 4, long: int = 12) -> tuple[float, float]:
    """Operations and host reads per decoding step: the difference of two generations, so the
    prefill cancels out."""
    (ops_long, waits_long), (ops_short, waits_short) = counted_ops(generate, long), counted_ops(generate, short)
    return (ops_long - ops_short) / (long - short), (waits_long - waits_short) / (long - short)


def profile_table(generate, device: str, tokens: int = 16) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        generate(tokens)
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return (f"torch.profiler, koff + memory, {tokens} greedy tokens, sorted by self CPU time:\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            + (f"\n\nsorted by {sort}:\n" + prof.key_averages().table(sort_by=sort, row_limit=20) if sort != "self_cpu_time_total" else ""))


def measure(shape: str, args) -> tuple[dict, str | None]:
    settings = DecomposeConfig(model="shape:" + shape, out="unused", device=args.device, dtype=args.dtype,
                               batch_size=1, block_len=128, calib_blocks=DOMAINS, eval=False)
    work = Path(tempfile.mkdtemp(prefix="koff-decode-"))
    try:
        config, domains, _, _ = export_random(shape, settings, work)
        measured, table = decode_speeds(shape, work, config, domains[0].val[0, :PROMPT_TOKENS], args.device,
                                        args.dtype, args.new_tokens, args.profile)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{shape}: {measured}", flush=True)
    return {"shape": shape, **measured}, table


COLUMNS = [("koff_memory", "koff + memory"), ("koff_no_memory", "koff, no memory"),
           ("hf_backbone", "HF generate, backbone"), ("hf_dense", "HF generate, dense")]


def table(results: list[dict]) -> str:
    speed = [[r["shape"]] + [f"{r['tokens_per_s'][k]:.1f}" for k, _ in COLUMNS]
             + [f"{r['tokens_per_s']['hf_dense'] / r['tokens_per_s']['koff_memory']:.2f}x"] for r in results]
    ops = [[r["shape"]] + [f"{r['ops_per_token'][k]:.0f} / {r['host_reads_per_token'][k]:.0f}" for k, _ in COLUMNS]
           for r in results]
    return (markdown_table(["shape"] + [title + " tok/s" for _, title in COLUMNS] + ["dense / koff + memory"], speed)
            + "\n\nPer decoded token: PyTorch operations dispatched (each one kernel launch or more on a GPU) / "
            "single values read back to the host (each a wait for the GPU; koff also copies the batch's tokens "
            "once per step):\n\n"
            + markdown_table(["shape"] + [title for _, title in COLUMNS], ops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens timed per generation")
    parser.add_argument("--profile", action="store_true", help="also write torch.profiler's table (NAME-profile.txt)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="decode")
    args = parser.parse_args()
    report = {"command": command_line(), "machine": machine(args.device),
              "commit": git_commit(), "new_tokens": args.new_tokens, "prompt_tokens": PROMPT_TOKENS, "results": []}
    out, profiles = Path(args.out), []
    for shape in args.shapes:
        result, profile = measure(shape, args)
        report["results"].append(result)
        if profile:
            profiles.append(f"## {shape}\n\n{profile}")
        write_json(out / f"{args.name}.json", report)
        text = (f"# {args.name}\n\n`{report['command']}`\n\n{report['machine']}, commit {report['commit']}\n\n"
                f"Greedy decoding at batch 1, {PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens.\n\n"
                f"{table(report['results'])}\n")
        write_text(out / f"{args.name}.md", text)
        if profiles:
            write_text(out / f"{args.name}-profile.txt", "\n\n".join(profiles) + "\n")
    print(text)


if __name__ == "__main__":
    main()
