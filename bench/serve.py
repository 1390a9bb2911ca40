"""Load benchmark for `koff serve` on loopback: latency, throughput and errors, mixed vs single memory.

Starts `koff serve` on an exported folder (a subprocess by default, so clients and server do not
share a GIL; --in-process runs it in a thread), warms it up, then for each scenario sends a fixed
number of streamed completions from N concurrent clients:

* ``serial``: one client, one memory (what batching is measured against);
* ``single``: N clients, every request names the same memory;
* ``mixed``: N clients, requests cycle over every memory and the bare backbone, so batches mix memories.

    python bench/serve.py [--export bench/out/export] [--requests 48] [--concurrency 8] [--max-tokens 32]

Writes bench/results/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from common import command_line, git_commit
from koff.io import write_json, write_text

PROMPTS = [
    "The history of the city begins",
    "def fibonacci(n):",
    "In the morning the market was",
    "Die Geschichte der Stadt beginnt",
    "The main reason for the change was",
    "for (int i = 0; i < n; i++) {",
    "She opened the letter and read",
    "A good way to learn a language is",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`koff serve` as a subprocess (or an in-process thread); stopped on exit."""

    def __init__(self, export: str, max_batch: int, batch_wait_ms: float, in_process: bool):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = self.background = None
        if in_process:
            from koff.runtime import load
            from koff.server import BackgroundServer, create_app

            app = create_app(load(export), max_batch=max_batch, batch_wait_ms=batch_wait_ms)
            self.background = BackgroundServer(app, port=self.port).start()
        else:
            command = [sys.executable, "-m", "koff", "-q", "serve", export, "--port", str(self.port),
                       "--max-batch", str(max_batch), "--batch-wait-ms", str(batch_wait_ms)]
            self.process = subprocess.Popen(command, env=os.environ.copy())
            self._wait()

    def _wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"koff serve exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("koff serve did not come up")

    def stats(self) -> dict:
        return httpx.get(self.url + "/health", timeout=30).json()["batcher"]

    def models(self) -> list[str]:
        return [m["id"] for m in httpx.get(self.url + "/v1/models", timeout=30).json()["data"]]

    def stop(self) -> None:
        if self.background is not None:
            self.background.stop()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """A streamed completion: latency, time to first token, completion tokens (from usage), or the error."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    try:
        with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                return {"error": f"{response.status_code}: {response.text[:200]}"}
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - t0
    except httpx.HTTPError as err:
        return {"error": f"{type(err).__name__}: {err}"}
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def scenario(server: Server, models: list[str], requests: int, concurrency: int, max_tokens: int) -> dict:
    before = server.stats()
    jobs = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda job: one_request(client, server.url, job[0], job[1], max_tokens), jobs))
        wall = time.perf_counter() - t0
    after = server.stats()
    ok = [r for r in results if "latency" in r]
    errors = [r["error"] for r in results if "error" in r]
    latencies, ttfts = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    steps = after["steps"] - before["steps"]
    return {
        "models": models, "requests": requests, "concurrency": concurrency, "errors": len(errors),
        "error_examples": sorted(set(errors))[:3], "wall_seconds": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95),
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
        "decode_steps": steps, "mean_batch": round((after["step_rows"] - before["step_rows"]) / steps, 2) if steps else None,
        "mixed_steps": after["mixed_steps"] - before["mixed_steps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", default="bench/out/export", help="a `koff export` folder")
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--requests", type=int, default=48, help="requests per scenario")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients (single and mixed)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--scenarios", default="serial,single,mixed")
    parser.add_argument("--in-process", action="store_true", help="run the server in a thread of this process")
    parser.add_argument("--rounds", type=int, default=3,
                        help="single/mixed pairs run back to back for the throughput ratio (median); the machine's "
                        "speed drifts, so one pair is not enough (default: 3, the table's pair included)")
    args = parser.parse_args()
    command = command_line()
    commit = git_commit()  # the code this run uses: taken before it starts
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - {"serial", "single", "mixed"}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if not (Path(args.export) / "backbone").is_dir():
        parser.error(f"{args.export} is not a `koff export` folder (run bench/export.py first)")

    server = Server(args.export, args.max_batch, args.batch_wait_ms, args.in_process)
    try:
        models = server.models()
        memories = [m for m in models if m != "backbone"] or models
        with httpx.Client(timeout=600) as client:  # warm-up: every model once
            for model in models:
                one_request(client, server.url, model, PROMPTS[0], 4)
        results = {}
        for name in scenarios:
            chosen = models if name == "mixed" else memories[:1]
            concurrency = 1 if name == "serial" else args.concurrency
            results[name] = scenario(server, chosen, args.requests, concurrency, args.max_tokens)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
        ratios = []
        if "single" in results and "mixed" in results:
            ratios.append(results["mixed"]["tokens_per_s"] / results["single"]["tokens_per_s"])
            for _ in range(args.rounds - 1):
                single = scenario(server, memories[:1], args.requests, args.concurrency, args.max_tokens)
                mixed = scenario(server, models, args.requests, args.concurrency, args.max_tokens)
                ratios.append(mixed["tokens_per_s"] / single["tokens_per_s"])
                print(f"round {len(ratios)}: single {single['tokens_per_s']} tok/s, mixed {mixed['tokens_per_s']} tok/s, "
                      f"errors {single['errors'] + mixed['errors']}", flush=True)
                if single["errors"] or mixed["errors"]:
                    results["single"]["errors"] += single["errors"]
                    results["mixed"]["errors"] += mixed["errors"]
    finally:
        server.stop()

    import torch

    summary = {
        "command": command,
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "export": args.export,
        "settings": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                     "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms, "server": "in-process" if args.in_process else "subprocess"},
        "scenarios": results,
    }
    if ratios:
        summary["mixed_vs_single_rounds"] = [round(r, 3) for r in ratios]
        summary["mixed_vs_single_throughput"] = round(statistics.median(ratios), 3)
    if "single" in results and "serial" in results and results["serial"]["tokens_per_s"]:
        summary["batched_vs_serial_throughput"] = round(results["single"]["tokens_per_s"] / results["serial"]["tokens_per_s"], 3)
    write_json(Path(args.results) / "serve.json", summary)
    text = report(summary)
    write_text(Path(args.results) / "serve.md", text)
    print(text)


def report(summary: dict) -> str:
    def ms(x):
        return f"{x * 1000:.0f}" if x is not None else "-"

    s = summary["settings"]
    lines = [
        f"# koff serve load benchmark ({summary['export']})", "", f"Command: `{summary['command']}`  ", f"Commit: {summary['commit']}", "",
        f"Machine: {summary['machine']}. Server: {s['server']}, max batch {s['max_batch']}, batch wait {s['batch_wait_ms']} ms; "
        f"{s['requests']} streamed greedy completions of up to {s['max_tokens']} tokens per scenario.", "",
        "| scenario | models | clients | errors | req/s | tokens/s | p50 latency ms | p95 latency ms | p50 TTFT ms | p95 TTFT ms | mean batch | mixed steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["scenarios"].items():
        lines.append(f"| {name} | {', '.join(r['models'])} | {r['concurrency']} | {r['errors']} | {r['requests_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {ms(r['latency_p50_s'])} | {ms(r['latency_p95_s'])} | {ms(r['ttft_p50_s'])} | "
                     f"{ms(r['ttft_p95_s'])} | {r['mean_batch']} | {r['mixed_steps']} |")
    lines.append("")
    if "mixed_vs_single_throughput" in summary:
        rounds = ", ".join(f"{r:.2f}" for r in summary["mixed_vs_single_rounds"])
        lines.append(f"Mixed-memory traffic reaches {summary['mixed_vs_single_throughput']:.2f}x the throughput of "
                     f"single-memory traffic (median of {len(summary['mixed_vs_single_rounds'])} back-to-back pairs: {rounds}).")
    if "batched_vs_serial_throughput" in summary:
        lines.append(f"Batched single-memory traffic reaches {summary['batched_vs_serial_throughput']:.2f}x the throughput of one client at a time.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
