"""Host memory and time of `koff export` at model scale (issue 12, point 7).

Per shape: a random base saved in bf16 as a model folder, and a finished run on it made without
training (export reads only the run's mask and memories): a random mask at 12% and ``--memories``
memories of random LoRA factors and KV prefixes, shaped as the defaults say. Then `koff export`
runs in a child process that samples its own memory every 10 ms, once per ``--max-shard-size``.
``--baseline PATH`` runs the same export with the koff package of PATH (a checkout of an older
commit: ``git worktree add PATH REV``) beside it.

Two numbers per export: *peak anonymous memory* (RssAnon, what the export itself holds) and
*peak RSS* (VmHWM, which also counts the pages of the base's files mapped while they are read;
the kernel drops those whenever it needs the memory).

    python bench/export_memory.py [--shapes llama-3.2-1b] [--max-shard-size 5GB 1GB] [--baseline /tmp/old]

Writes bench/results/NAME.json and NAME.md (``--name``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from common import command_line, folder_bytes, git_commit, machine
from random_base import random_model, word_tokenizer
from koff.config import DecomposeConfig
from koff.formats.run import CONFIG, write_outputs
from koff.io import markdown_table, write_json, write_text, write_yaml
from koff.masks.binary import select_units
from koff.masks.units import UnitCosts
from koff.memories.memory import DomainMemory
from koff.memories.parts import lora_key
from koff.models.architecture import decoder_layout
from koff.plan import GiB

# Run in the child: export, sampling /proc/self/status; prints one JSON line.
CHILD = r"""
import json, sys, threading, time
from pathlib import Path

def field(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024

peak = {"anon": 0}
done = threading.Event()

def sample():
    while not done.is_set():
        peak["anon"] = max(peak["anon"], field("RssAnon"))
        time.sleep(0.01)

threading.Thread(target=sample, daemon=True).start()
from koff.export import export_run
start = time.perf_counter()
export_run(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3])
seconds = time.perf_counter() - start
done.set()
peak["anon"] = max(peak["anon"], field("RssAnon"))
print(json.dumps({"seconds": seconds, "peak_anon_bytes": peak["anon"], "peak_rss_bytes": field("VmHWM")}))
"""


def make_run(shape: str, work: Path, memories: int, seed: int = 0) -> Path:
    """A random bf16 base folder and a finished run on it (random mask at 12%, random memories)."""
    base = work / "base"
    model, config = random_model(shape, torch.bfloat16, "cpu")
    model.save_pretrained(base)
    word_tokenizer(config.vocab_size, config.eos_token_id).save_pretrained(base)
    del model
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    layout = decoder_layout(meta)
    costs = UnitCosts.of(meta, layout)
    settings = DecomposeConfig(model=str(base), out=str(work / "run"), domain=[f"d{i}=bundled:eng" for i in range(memories)])
    g = torch.Generator().manual_seed(seed)
    mask = select_units([torch.rand(n, generator=g) for n in costs.ffn_units],
                        [torch.rand(n, generator=g) for n in costs.attn_units], costs, 0.12)
    lora_shapes = {lora_key(p.index, proj): (p.projection(proj).in_features, p.projection(proj).out_features)
                   for p in layout.layers for proj in settings.lora_targets}
    prefix_shapes = [(layout.num_kv_heads, layout.head_dim)] * layout.num_layers
    made = {}
    for i in range(memories):
        memory = DomainMemory(f"d{i}", lora_shapes, settings.lora_rank, settings.lora_alpha, prefix_shapes,
                              settings.kv_slots)
        with torch.no_grad():
            for p in memory.parameters():
                p.normal_(0, 0.02, generator=g)
        made[memory.name] = memory
    run = Path(settings.out)
    run.mkdir(parents=True)
    write_yaml(run / CONFIG, settings.to_dict())
    write_outputs(run, mask, costs, made, {name: {"memory_kind": settings.memory} for name in made}, {})
    return run


def export_in_child(koff_root: Path | None, run: Path, out: Path, shard_size: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    if koff_root is not None:  # an older checkout's koff comes first on the path
        env["PYTHONPATH"] = f"{koff_root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = subprocess.run([sys.executable, "-c", CHILD, str(run), str(out), shard_size], env=env, cwd=tempfile.gettempdir(),
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"export failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def table(rows: list[dict]) -> str:
    return markdown_table(
        ["shape", "base GiB (bf16)", "koff", "--max-shard-size", "export s", "peak anonymous GiB", "peak RSS GiB"],
        [[r["shape"], f"{r['base_bytes'] / GiB:.2f}", r["koff"], r["max_shard_size"], f"{r['seconds']:.1f}",
          f"{r['peak_anon_bytes'] / GiB:.2f}", f"{r['peak_rss_bytes'] / GiB:.2f}"] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b"])
    parser.add_argument("--max-shard-size", nargs="+", default=["5GB", "1GB"])
    parser.add_argument("--memories", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="a checkout of an older koff to export with beside this one")
    parser.add_argument("--baseline-name", default="baseline")
    parser.add_argument("--work", type=Path, help="keep the base and run here (default: a temporary folder)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", default="export-memory")
    args = parser.parse_args()
    command = command_line()
    commit = git_commit()
    kinds = [("this tree", None)] + ([(args.baseline_name, args.baseline.resolve())] if args.baseline else [])
    rows = []
    for shape in args.shapes:
        work = (args.work or Path(tempfile.mkdtemp(prefix="koff-export-memory-"))) / shape
        try:
            run = work / "run" if (work / "run" / "mask.safetensors").is_file() else make_run(shape, work, args.memories)
            for size in args.max_shard_size:
                for name, root in kinds:
                    measured = export_in_child(root, run, work / "export", size)
                    rows.append({"shape": shape, "base_bytes": folder_bytes(work / "base"), "koff": name,
                                 "max_shard_size": size, **measured})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            if args.work is None:
                shutil.rmtree(work.parent, ignore_errors=True)
    report = {"command": command, "commit": commit, "machine": machine("cpu"), "baseline": str(args.baseline),
              "memories": args.memories, "rows": rows}
    out = Path(args.out)
    write_json(out / f"{args.name}.json", report)
    text = "\n".join([
        "# Host memory of `koff export` (issue 12, point 7)", "",
        f"Command: `{command}`  ", f"Commit: {commit}  ", f"Machine: {report['machine']}", "",
        f"Random bf16 base per shape, a run with a random 12% mask and {args.memories} memories (rank and KV "
        "slots as the defaults), exported in a child process sampling itself every 10 ms. Peak anonymous: what the "
        "export holds. Peak RSS adds the base's file pages mapped while read (the kernel drops them when it needs "
        "the memory).", "", table(rows), ""])
    write_text(out / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
