"""Host memory of reading a corpus: how much a domain's text costs while it is tokenised and split.

For each shape of corpus (one enormous line, ordinary lines, a .jsonl of records, one enormous HTML
page), a fresh process
loads the embedded model's tokenizer and runs ``load_domain`` (read, tokenise, pack, split, write
the block cache) on ``--megabytes`` MB of text, and another fresh process does the same on a corpus
of the same shape a thousand times smaller. The difference of their peak resident memory (the
kernel's high-water mark, which nothing the allocator keeps or reuses can hide) is what the text
cost, set against the file's size (the goal: at most twice it).

    python bench/corpus_memory.py [--megabytes 50]

Writes bench/results/corpus-memory.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, git_commit, machine  # noqa: E402

SHAPES = ("one-line.txt", "lines.txt", "records.jsonl", "page.html")
GOAL = 2.0


def child(path: Path) -> dict:
    """Run in a fresh process: one ``load_domain`` of ``path``, its time and the process's peak memory."""
    from koff.data import DomainSpec, load_domain
    from koff.models.loader import load_tokenizer, model_folder

    tokenizer = load_tokenizer(model_folder("smollm2-135m")[0])
    started = time.perf_counter()
    data = load_domain(DomainSpec("big", str(path)), tokenizer)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_bytes": peak, "tokens": int(data.train.numel() + data.val.numel()), "seconds": round(seconds, 1)}


def run_child(path: Path, env: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """``megabytes`` of English-like text in the shape the file name says, written a line at a time."""
    rng = random.Random(seed)
    words = [w for w in Path(__file__).read_text().split() if w.isalpha()] or ["word"]
    target = int(megabytes * 1e6)
    with path.open("w") as f:
        written = 0
        while written < target:
            line = " ".join(rng.choices(words, k=rng.randint(8, 40)))
            if path.suffix == ".jsonl":
                text = json.dumps({"text": line}) + "\n"
            elif path.suffix == ".html":  # one enormous page of paragraphs
                text = f"<p>{line}</p>\n"
            else:
                text = line + (" " if path.name.startswith("one-line") else "\n")
            f.write(text)
            written += len(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=50.0, help="size of each corpus")
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--name", default="corpus-memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child))))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "KOFF_CACHE_DIR": str(Path(tmp) / "cache")}
        warm = Path(tmp) / "warm.txt"
        make_corpus(warm, args.megabytes / 1000)
        run_child(warm, env)  # converts the embedded model into this cache, once
        for shape in SHAPES:
            small, big = Path(tmp) / f"small-{shape}", Path(tmp) / shape
            make_corpus(small, args.megabytes / 1000)
            make_corpus(big, args.megabytes)
            base, measured = run_child(small, env), run_child(big, env)
            row = {"corpus": shape, "file_bytes": big.stat().st_size, "tokens": measured["tokens"],
                   "seconds": measured["seconds"], "peak_bytes": measured["peak_bytes"],
                   "small_peak_bytes": base["peak_bytes"], "above_small_bytes": measured["peak_bytes"] - base["peak_bytes"]}
            row["times_file_size"] = round(row["above_small_bytes"] / row["file_bytes"], 2)
            print(f"{shape}: {row['file_bytes'] / 1e6:.1f} MB, {row['tokens']:,} tokens, peak "
                  f"{row['above_small_bytes'] / 1e6:.1f} MB above the small corpus's "
                  f"({row['times_file_size']}x the file) in {row['seconds']} s", flush=True)
            rows.append(row)
            big.unlink()
    write(args, rows)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    result = {"command": command_line(), "machine": machine(), "commit": git_commit(), "goal_times_file": GOAL,
              "rows": rows}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {args.name}", "", f"`{result['command']}`", "", f"{result['machine']}, commit {result['commit']}", "",
             "Peak resident memory (ru_maxrss) of a fresh process that loads the tokenizer and runs `load_domain` "
             "(read, tokenise, pack, split, write the block cache), less the same for a corpus of the same shape "
             "1,000 times smaller.", "",
             "| corpus | file MB | tokens | seconds | peak above the small corpus's, MB | x file size | goal <= 2x met |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['corpus']} | {r['file_bytes'] / 1e6:.1f} | {r['tokens']:,} | {r['seconds']} | "
                     f"{r['above_small_bytes'] / 1e6:.1f} | {r['times_file_size']} | "
                     f"{'yes' if r['times_file_size'] <= GOAL else 'no'} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
