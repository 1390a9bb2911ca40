"""Benchmark for `koff export` and the runtime on the embedded SmolLM2-135M (issue 4).

Needs a finished decomposition run (bench/decompose.py writes bench/out/decompose). Measures size on
disk and parameter count of the exported backbone vs the dense base; forward tokens/s and greedy
generation tokens/s of both (same code path, batch and lengths, CPU) beside the ideal speed-up implied
by the removed FLOPs; time to add a memory from disk and to switch memory.

    python bench/export.py [--run bench/out/decompose]

Writes bench/results/export.json and export.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import add_speed_options, command_line, folder_bytes, git_commit, machine
from koff.export import export_run
from koff.formats.run import read_config
from koff.io import write_json, write_text
from koff.model import KoffModel
from koff.models import load_model
from koff.runtime import BatchGeneration, Sampling, load


def linear_flops_per_token(model, context: int) -> float:
    """2 x parameters of every matmul (lm_head included) + attention scores/values over ``context`` keys."""
    flops = sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # lm_head is a Linear
    for layer in model.model.layers:
        q_width = layer.self_attn.q_proj.out_features
        flops += 2 * 2 * q_width * context
    return flops


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_tokens_per_s(model: KoffModel, batch: int, length: int, repeats: int) -> float:
    ids = torch.randint(0, 1000, (batch, length))
    with torch.no_grad():
        seconds = timed(lambda: model(ids, None), repeats)
    return batch * length / seconds


def generation_tokens_per_s(model: KoffModel, pad: int, batch: int, prompt: int, new: int, repeats: int) -> float:
    prompts = [torch.randint(0, 1000, (prompt,)).tolist() for _ in range(batch)]

    def run():
        for _ in BatchGeneration(model, prompts, [None] * batch, [Sampling(new)] * batch, pad, set()):
            pass

    return batch * new / timed(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="bench/out/decompose")
    parser.add_argument("--out", default="bench/out/export")
    add_speed_options(parser)
    args = parser.parse_args()
    command = command_line()
    commit = git_commit()  # the code this run uses: taken before it starts
    torch.manual_seed(0)

    exports = {}
    for uniform in (False, True):
        out = Path(args.out + ("-uniform" if uniform else ""))
        t0 = time.perf_counter()
        exports[uniform] = export_run(args.run, out, uniform=uniform, force=True)
        exports[uniform]["seconds"] = round(time.perf_counter() - t0, 1)
        exports[uniform]["backbone_bytes"] = folder_bytes(out / "backbone", "*")

    dense_loaded = load_model(_base_spec(args.run))
    dense = KoffModel(dense_loaded.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        dense_loaded.model.save_pretrained(tmp)
        dense_bytes = folder_bytes(Path(tmp), "*")
    runtime = load(args.out)
    pruned = runtime.model
    pad = runtime.tokenizer.pad_token_id
    measurements = {}
    for name, model in (("dense", dense), ("exported", pruned)):
        measurements[name] = {
            "forward_tokens_per_s": forward_tokens_per_s(model, args.batch, args.length, args.repeats),
            "generate_tokens_per_s": generation_tokens_per_s(model, pad, args.batch, 64, args.new_tokens, args.repeats),
            "flops_per_token_forward": linear_flops_per_token(model.base, args.length),
            "flops_per_token_generate": linear_flops_per_token(model.base, 64 + args.new_tokens // 2),
        }
    dense_m, pruned_m = measurements["dense"], measurements["exported"]
    ideal_forward = dense_m["flops_per_token_forward"] / pruned_m["flops_per_token_forward"]
    ideal_generate = dense_m["flops_per_token_generate"] / pruned_m["flops_per_token_generate"]
    speedup_forward = pruned_m["forward_tokens_per_s"] / dense_m["forward_tokens_per_s"]
    speedup_generate = pruned_m["generate_tokens_per_s"] / dense_m["generate_tokens_per_s"]

    names = runtime.memories
    memory_dir = Path(args.out) / "memories" / names[0]
    t0 = time.perf_counter()
    runtime.add_memory(memory_dir, name="bench-copy")
    add_seconds = time.perf_counter() - t0
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        same = timed(lambda: runtime.model(ids, names[0]), args.repeats)
        switching = timed(lambda: [runtime.model(ids, n) for n in (names[0], names[-1])], args.repeats) / 2
    runtime.remove_memory("bench-copy")

    result = {
        "command": command,
        "commit": commit,
        "machine": machine(),
        "run": args.run,
        "parameters": {"dense": exports[False]["dense_parameters"], "exported": exports[False]["parameters"],
                       "exported_uniform": exports[True]["parameters"]},
        "bytes_on_disk": {"dense": dense_bytes, "exported": exports[False]["backbone_bytes"],
                          "exported_uniform": exports[True]["backbone_bytes"]},
        "memory_bytes": {n: m["bytes"] for n, m in exports[False]["memories"].items()},
        "export_seconds": {"per_layer": exports[False]["seconds"], "uniform": exports[True]["seconds"]},
        "throughput": measurements,
        "speedup": {"forward": speedup_forward, "forward_ideal": ideal_forward, "forward_fraction_of_ideal": speedup_forward / ideal_forward,
                    "generate": speedup_generate, "generate_ideal": ideal_generate, "generate_fraction_of_ideal": speedup_generate / ideal_generate},
        "memory_ops_seconds": {"add_memory_from_disk": add_seconds, "forward_16_tokens_same_memory": same,
                               "forward_16_tokens_switching_memory": switching},
        "settings": {"batch": args.batch, "forward_length": args.length, "prompt": 64, "new_tokens": args.new_tokens, "repeats": args.repeats},
        "goals_met": {"forward_at_least_0.9_of_ideal": speedup_forward / ideal_forward >= 0.9,
                      "generate_at_least_0.9_of_ideal": speedup_generate / ideal_generate >= 0.9},
    }
    write_json(Path(args.results) / "export.json", result)
    p, b = result["parameters"], result["bytes_on_disk"]
    lines = [
        f"# koff export benchmark ({args.run})", "", f"Command: `{command}`  ", f"Commit: {commit}", "", f"Machine: {result['machine']}", "",
        "| | dense | exported (per-layer) | exported (uniform) |", "|---|---|---|---|",
        f"| parameters | {p['dense']:,} | {p['exported']:,} ({p['exported'] / p['dense']:.3f}) | {p['exported_uniform']:,} ({p['exported_uniform'] / p['dense']:.3f}) |",
        f"| bytes on disk | {b['dense']:,} | {b['exported']:,} ({b['exported'] / b['dense']:.3f}) | {b['exported_uniform']:,} ({b['exported_uniform'] / b['dense']:.3f}) |",
        f"| forward tokens/s (batch {args.batch} x {args.length}) | {dense_m['forward_tokens_per_s']:.0f} | {pruned_m['forward_tokens_per_s']:.0f} | |",
        f"| greedy generation tokens/s (batch {args.batch}, 64 + {args.new_tokens}) | {dense_m['generate_tokens_per_s']:.1f} | {pruned_m['generate_tokens_per_s']:.1f} | |",
        "", f"Forward speed-up {speedup_forward:.3f}x vs ideal {ideal_forward:.3f}x from FLOPs ({speedup_forward / ideal_forward:.2f} of ideal); "
        f"generation {speedup_generate:.3f}x vs ideal {ideal_generate:.3f}x ({speedup_generate / ideal_generate:.2f} of ideal).", "",
        "Memories on disk: " + ", ".join(f"{n} {v / 1e6:.2f} MB" for n, v in result["memory_bytes"].items()) + ".", "",
        f"Add a memory from disk: {add_seconds * 1000:.0f} ms. A 16-token forward: {same * 1000:.1f} ms with the same memory, "
        f"{switching * 1000:.1f} ms when every call switches memory (switching is choosing a loaded memory; nothing reloads).", "",
        "Goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in result["goals_met"].items()), "",
    ]
    text = "\n".join(lines)
    write_text(Path(args.results) / "export.md", text)
    print(text)


def _base_spec(run: str) -> str:
    return read_config(Path(run)).model


if __name__ == "__main__":
    main()
