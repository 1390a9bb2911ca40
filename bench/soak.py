"""Soak test for `koff serve` on loopback: mixed-memory clients, a share of bad requests and client
disconnects, and admin load/unload, for a fixed time (and at most a fixed number of requests); in
its second half, hundreds of slow or idle connections held open as well.

It serves a *copy* of the export (so nothing of the original can be harmed), with memories planted
in it that must not load: one whose tensors were made NaN, and three that do not fit the backbone (a
KV prefix with the wrong head size, one with a layer too many, a LoRA alpha of 1e308). The server
must start anyway and report them; the admin thread tries to load them again every round. Greedy good
requests must return exactly the text they return alone; each bad request must get the 4xx its
fault deserves; a disconnected client must not fail anybody else. Reported: requests by outcome,
errors by kind (expected 4xx vs anything else), good requests that failed or changed, the
server's resident memory after warm-up and at the end, and whether every file of the export is
unchanged. The first half runs without slow connections, the second with ``--slow-connections``
of them (a third idle, a third dribbling their headers a byte a second, a third dribbling a body),
each reopened as soon as the server drops it: the median latency of good requests in the two
halves is compared, and the server's open file descriptors are sampled.

    python bench/soak.py [--export bench/out/soak-export] [--seconds 120] [--clients 6]

Without --export, a small export of the embedded model is made first (a 4-step decomposition: the
memories are barely trained, which does not matter here). Writes bench/results/soak.json and soak.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from safetensors.torch import load_file, save_file

from common import command_line, git_commit, machine
from koff.io import read_json, write_json, write_text
from serve import PROMPTS, Server

STABLE = ("eng", "deu", "python", "backbone")  # memories the admin thread never touches
SWAP = "swap"  # loaded and unloaded all the time: 404 while it is away is expected


def make_export(folder: Path) -> None:
    run = folder.parent / "soak-run"
    koff = [sys.executable, "-m", "koff", "-q"]
    subprocess.run([*koff, "decompose", "--model", "smollm2-135m", "--domain", "eng=bundled:eng", "--domain",
                    "deu=bundled:deu", "--domain", "python=bundled:code/python", "--steps", "4", "--batch-size", "2",
                    "--block-len", "128", "--no-eval", "--checkpoint-every", "4", "--out", str(run)], check=True)
    subprocess.run([*koff, "export", str(run), str(folder)], check=True)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def plant_misfit_memories(export: Path) -> list[str]:
    """Copies of eng that do not fit the backbone (the server must skip and report each)."""
    planted = []
    for name, change in MISFITS.items():
        folder = export / "memories" / name
        shutil.copytree(export / "memories" / "eng", folder)
        manifest = read_json(folder / "manifest.json") | {"name": name}
        kv = load_file(str(folder / "kv_prefix.safetensors"))
        change(manifest, kv)
        write_json(folder / "manifest.json", manifest)
        save_file(kv, str(folder / "kv_prefix.safetensors"))
        planted.append(name)
    return planted


def _one_layer_too_many(manifest: dict, kv: dict) -> None:
    layers = len(kv) // 2
    kv[f"layers.{layers}.keys"], kv[f"layers.{layers}.values"] = kv["layers.0.keys"].clone(), kv["layers.0.values"].clone()


MISFITS = {
    "misfit_head_dim": lambda manifest, kv: kv.update({k: v[..., :-1].contiguous() for k, v in kv.items()}),
    "misfit_layers": _one_layer_too_many,
    "misfit_alpha": lambda manifest, kv: manifest.update(lora_alpha=1e308),
}


def plant_nan_memory(export: Path) -> None:
    """memories/nan: a copy of eng whose KV prefix holds NaN (the server must skip and report it)."""
    folder = export / "memories" / "nan"
    shutil.copytree(export / "memories" / "eng", folder)
    write_json(folder / "manifest.json", read_json(folder / "manifest.json") | {"name": "nan"})
    path = folder / "kv_prefix.safetensors"
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first][0] = float("nan")
    save_file(tensors, str(path))


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class SlowConnections:
    """``count`` connections to the server held open in the slowest ways a client can: idle (nothing
    sent), headers dribbled a byte a second, a body dribbled a byte a second after complete headers.
    Each one the server closes is counted and opened again, so ``count`` stand open at all times."""

    KINDS = ("idle", "headers", "body")

    def __init__(self, host: str, port: int, count: int):
        self.address, self.count = (host, port), count
        self.open: list[tuple[socket.socket, str]] = []
        self.dropped: Counter = Counter()
        self.failed_opens = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def start(self) -> "SlowConnections":
        self.thread.start()
        return self

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        for sock, _ in self.open:
            sock.close()
        return {"held": self.count, "dropped_by_server": dict(self.dropped), "failed_opens": self.failed_opens}

    def _connect(self, kind: str) -> None:
        try:
            sock = socket.create_connection(self.address, timeout=5)
            if kind == "body":
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n{")
            elif kind == "headers":
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            sock.setblocking(False)
            self.open.append((sock, kind))
        except OSError:
            self.failed_opens += 1

    def _hold(self) -> None:
        for i in range(self.count):
            self._connect(self.KINDS[i % 3])
        while not self.stop.wait(1.0):
            kept, lost = [], []
            for sock, kind in self.open:
                if self._closed(sock) or not self._dribble(sock, kind):
                    sock.close()
                    self.dropped[kind] += 1
                    lost.append(kind)
                else:
                    kept.append((sock, kind))
            self.open = kept
            for kind in lost:
                self._connect(kind)

    @staticmethod
    def _closed(sock: socket.socket) -> bool:
        try:
            sock.recv(65536)
            return True  # b"" (closed) or an answer (408): either way the server let it go
        except BlockingIOError:
            return False
        except OSError:
            return True

    @staticmethod
    def _dribble(sock: socket.socket, kind: str) -> bool:
        try:
            if kind == "headers":
                sock.send(b"X")
            elif kind == "body":
                sock.send(b" ")
            return True
        except OSError:
            return False


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ----- the requests -----------------------------------------------------------------------------
def body(model: str, prompt: str, max_tokens: int, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


BAD = {  # kind -> (request body or raw bytes, the status it must get)
    "temperature_out_of_range": (lambda m, p, n: body(m, p, n, temperature=5), 422),
    "unknown_model": (lambda m, p, n: body("klingon", p, n), 404),
    "lone_surrogate": (lambda m, p, n: b'{"model": "eng", "prompt": "a\\ud800b", "max_tokens": 4}', 400),
    "too_long": (lambda m, p, n: body(m, p, 100_000), 400),
    "malformed_json": (lambda m, p, n: b'{"model": "eng", "prompt": ', 400),
    "seed_out_of_range": (lambda m, p, n: body(m, p, n, seed=2**64), 422),
    "tiny_temperature": (lambda m, p, n: body(m, p, n, temperature=1e-45), 200),  # greedy: must equal the reference
}


class Soak:
    def __init__(self, server: Server, args: argparse.Namespace, references: dict):
        self.server, self.args, self.references = server, args, references
        self.deadline = time.monotonic() + args.seconds
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()
        self.unexpected: list[str] = []
        self.sent = 0
        self.rss: list[tuple[float, float]] = []  # (seconds into the soak, server MB), each admin round
        self.descriptors: list[int] = []  # the server's open file descriptors, each admin round
        self.phase = "calm"  # "slow" once the slow connections are held open
        self.latency: dict[str, list[float]] = {"calm": [], "slow": []}  # good requests' seconds, by phase

    def running(self) -> bool:
        with self.lock:
            if time.monotonic() > self.deadline or self.sent >= self.args.max_requests:
                return False
            self.sent += 1
            return True

    def record(self, outcome: str, problem: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if problem:
                self.unexpected.append(problem)

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=300) as http:
            while self.running():
                model, prompt = rng.choice(STABLE + (SWAP,)), rng.choice(PROMPTS)
                draw = rng.random()
                if draw < self.args.bad_share:
                    self.bad(http, rng.choice(sorted(BAD)), model if model != SWAP else "eng", prompt)
                elif draw < self.args.bad_share + self.args.disconnect_share:
                    self.disconnect(model, prompt, streamed=rng.random() < 0.5)
                else:
                    self.good(http, model, prompt, streamed=rng.random() < 0.5)

    def good(self, http: httpx.Client, model: str, prompt: str, streamed: bool) -> None:
        payload = body(model, prompt, self.args.max_tokens, stream=streamed)
        phase, start = self.phase, time.perf_counter()
        try:
            text, status = self._text(http, payload)
        except httpx.HTTPError as err:
            return self.record("good_failed", f"good {model}: {type(err).__name__}: {err}")
        if model == SWAP and status == 404:
            return self.record("swap_unloaded_404")
        if status != 200:
            return self.record("good_failed", f"good {model}: HTTP {status}: {text[:200]}")
        expected = self.references[("eng" if model == SWAP else model, prompt)]
        if text != expected:
            return self.record("good_changed", f"good {model} {prompt!r}: {text!r} != alone {expected!r}")
        if model != SWAP and phase == self.phase:  # a request that straddles the change of phase counts in neither
            self.latency[phase].append(time.perf_counter() - start)
        self.record("good_ok")

    def _text(self, http: httpx.Client, payload: dict) -> tuple[str, int]:
        url = self.server.url + "/v1/completions"
        if not payload.get("stream"):
            answer = http.post(url, json=payload)
            return (answer.json()["choices"][0]["text"] if answer.status_code == 200 else answer.text), answer.status_code
        import json

        parts = []
        with http.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                return response.read().decode(), response.status_code
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return str(chunk["error"]), 500
                    parts.append(chunk["choices"][0]["text"] if chunk["choices"] else "")
        return "".join(parts), 200

    def bad(self, http: httpx.Client, kind: str, model: str, prompt: str) -> None:
        make, expected = BAD[kind]
        payload = make(model, prompt, self.args.max_tokens)
        url = self.server.url + "/v1/completions"
        try:
            if isinstance(payload, bytes):
                answer = http.post(url, content=payload, headers={"Content-Type": "application/json"})
            else:
                answer = http.post(url, json=payload)
        except httpx.HTTPError as err:
            return self.record("bad_unexpected", f"{kind}: {type(err).__name__}: {err}")
        if answer.status_code != expected:
            return self.record("bad_unexpected", f"{kind}: HTTP {answer.status_code} (expected {expected}): {answer.text[:200]}")
        if kind == "tiny_temperature" and answer.json()["choices"][0]["text"] != self.references[(model, prompt)]:
            return self.record("bad_unexpected", f"{kind}: not the greedy text")
        self.record(f"bad_{expected}")

    def disconnect(self, model: str, prompt: str, streamed: bool) -> None:
        """A long request whose client goes away: after 0.3 s (non-streamed) or its first chunk (streamed)."""
        payload = body(model, prompt, 4 * self.args.max_tokens, stream=streamed)
        url = self.server.url + "/v1/completions"
        try:
            if streamed:
                with httpx.stream("POST", url, json=payload, timeout=300) as response:
                    next(response.iter_lines(), None)
            else:
                httpx.post(url, json=payload, timeout=0.3)
        except httpx.TimeoutException:
            pass
        except httpx.HTTPError as err:
            return self.record("disconnect_unexpected", f"disconnect: {type(err).__name__}: {err}")
        self.record("disconnected")

    def admin(self) -> None:
        """Every --admin-every seconds: list memories, load the NaN memory (must be refused), load or
        unload the swap memory."""
        loaded, start = False, time.monotonic()
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < self.deadline:
                time.sleep(self.args.admin_every)
                self.rss.append((round(time.monotonic() - start, 1), round(resident_mb(self.server.process.pid), 1)))
                self.descriptors.append(open_descriptors(self.server.process.pid))
                url = self.server.url + "/v1/memories"
                misfit = sorted(MISFITS)[len(self.rss) % len(MISFITS)]
                calls = [("list", http.get(url), 200), ("load_nan", http.post(url + "/load", json={"path": "nan", "name": "nan"}), 400),
                         ("load_misfit", http.post(url + "/load", json={"path": misfit}), 400)]
                if loaded:
                    calls.append(("unload_swap", http.delete(f"{url}/{SWAP}"), 200))
                else:
                    calls.append(("load_swap", http.post(url + "/load", json={"path": "eng", "name": SWAP}), 200))
                loaded = not loaded
                for name, answer, expected in calls:
                    if answer.status_code == expected:
                        self.record(f"admin_{name}")
                    else:
                        self.record("admin_unexpected", f"admin {name}: HTTP {answer.status_code}: {answer.text[:200]}")


def references(server: Server, max_tokens: int) -> dict:
    """The greedy text of every (model, prompt) pair, each asked alone before the soak."""
    result = {}
    with httpx.Client(timeout=300) as http:
        for model in STABLE:
            for prompt in PROMPTS:
                answer = http.post(server.url + "/v1/completions", json=body(model, prompt, max_tokens))
                answer.raise_for_status()
                result[(model, prompt)] = answer.json()["choices"][0]["text"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", default="bench/out/soak-export", help="a `koff export` folder (made if missing)")
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the clients run")
    parser.add_argument("--max-requests", type=int, default=5000, help="stop after this many requests in all")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--bad-share", type=float, default=0.25)
    parser.add_argument("--disconnect-share", type=float, default=0.1)
    parser.add_argument("--admin-every", type=float, default=2.0, help="seconds between admin rounds")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--slow-connections", type=int, default=500,
                        help="slow or idle connections held open during the second half")
    args = parser.parse_args()
    command = command_line()
    commit = git_commit()  # the code this run uses: taken before it starts
    source = Path(args.export)
    if not (source / "backbone").is_dir():
        print(f"making {source} (a 4-step decomposition of the embedded model)", flush=True)
        make_export(source)

    with tempfile.TemporaryDirectory(prefix="koff-soak-") as tmp:
        export = Path(tmp) / "export"
        shutil.copytree(source, export)
        plant_nan_memory(export)
        planted = ["nan", *plant_misfit_memories(export)]
        files_before = digest(export)
        server = Server(str(export), args.max_batch, 5.0, in_process=False)
        try:
            broken = httpx.get(server.url + "/v1/memories", timeout=60).json()["broken"]
            refs = references(server, args.max_tokens)
            rss_warm = resident_mb(server.process.pid)
            soak = Soak(server, args, refs)
            t0 = time.perf_counter()
            threads = [threading.Thread(target=soak.client, args=(seed,)) for seed in range(args.clients)]
            threads.append(threading.Thread(target=soak.admin))
            for thread in threads:
                thread.start()
            time.sleep(args.seconds / 2)
            slow = SlowConnections("127.0.0.1", server.port, args.slow_connections).start()
            soak.phase = "slow"
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - t0
            slow_stats = slow.finish()
            time.sleep(1.0)  # let cancelled samples leave the batch
            rss_end = resident_mb(server.process.pid)
            stats = server.stats()
            alive = httpx.get(server.url + "/health", timeout=30).status_code == 200
        finally:
            server.stop()
        files_after = digest(export)

    lost = sorted(set(files_before) - set(files_after))
    changed = sorted(k for k in files_before if k in files_after and files_before[k] != files_after[k])
    outcomes = dict(sorted(soak.outcomes.items()))
    # Memory is judged from a quarter into the soak, when every batch shape and memory has been seen
    # (the allocator keeps what it grew to until then), to the end.
    settled = next((mb for t, mb in soak.rss if t >= args.seconds / 4), rss_warm)
    unexpected = sum(outcomes.get(k, 0) for k in ("bad_unexpected", "disconnect_unexpected", "admin_unexpected"))
    good_failed = outcomes.get("good_failed", 0) + outcomes.get("good_changed", 0)
    medians = {phase: round(statistics.median(times), 3) if times else None for phase, times in soak.latency.items()}
    slowdown = medians["slow"] / medians["calm"] if medians["calm"] and medians["slow"] else None
    summary = {
        "command": command, "commit": commit, "machine": machine(), "export": str(source),
        "settings": {k: v for k, v in vars(args).items() if k not in ("export", "results")},
        "wall_seconds": round(wall, 1), "requests": soak.sent, "outcomes": outcomes,
        "unexpected_errors": unexpected, "good_failed_or_changed": good_failed,
        "problem_examples": soak.unexpected[:10],
        "broken_at_start": broken, "server_alive_at_end": alive, "batcher": stats,
        "rss_mb_after_references": round(rss_warm, 1), "rss_mb_a_quarter_in": settled, "rss_mb_at_end": round(rss_end, 1),
        "rss_mb_series": soak.rss,
        "files_lost": lost, "files_changed": changed,
        "slow_connections": slow_stats, "good_latency_median_s": medians,
        "good_requests_by_phase": {phase: len(times) for phase, times in soak.latency.items()},
        "latency_ratio_slow_to_calm": round(slowdown, 3) if slowdown else None,
        "server_descriptors_series": soak.descriptors,
        "goals": {"no unexpected errors": unexpected == 0, "no good request failed or changed": good_failed == 0,
                  "no file lost or changed": not lost and not changed, "server alive": alive,
                  "memory growth under 5% from a quarter in to the end": rss_end <= 1.05 * settled,
                  "every planted bad memory reported broken": set(planted) <= set(broken),
                  "median latency with slow connections within 1.5x": slowdown is not None and slowdown <= 1.5},
    }
    write_json(Path(args.results) / "soak.json", summary)
    text = report(summary)
    write_text(Path(args.results) / "soak.md", text)
    print(text)


def report(s: dict) -> str:
    lines = [
        "# koff serve soak test", "", f"Command: `{s['command']}`  ", f"Commit: {s['commit']}  ", f"Machine: {s['machine']}", "",
        f"{s['settings']['clients']} clients for {s['wall_seconds']} s ({s['requests']} requests; "
        f"{s['settings']['bad_share']:.0%} bad, {s['settings']['disconnect_share']:.0%} disconnecting), admin load/unload "
        f"every {s['settings']['admin_every']} s, on a copy of `{s['export']}` with a NaN memory planted "
        f"(skipped at start: {', '.join(s['broken_at_start']) or 'none'}).", "",
        f"Second half: {s['slow_connections']['held']} slow or idle connections held open (dropped by the server and "
        f"reopened: {s['slow_connections']['dropped_by_server']}; failed opens: {s['slow_connections']['failed_opens']}). "
        f"Median latency of good requests: {s['good_latency_median_s']['calm']} s without them "
        f"({s['good_requests_by_phase']['calm']} requests), {s['good_latency_median_s']['slow']} s with them "
        f"({s['good_requests_by_phase']['slow']} requests): ratio {s['latency_ratio_slow_to_calm']}. Server file "
        f"descriptors, each admin round: {s['server_descriptors_series']}.", "",
        "| outcome | count |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in s["outcomes"].items()], "",
        f"Server memory (resident): {s['rss_mb_after_references']} MB after the reference requests, "
        f"{s['rss_mb_a_quarter_in']} MB a quarter into the soak, {s['rss_mb_at_end']} MB at the end "
        f"(peak {max([mb for _, mb in s['rss_mb_series']] + [s['rss_mb_at_end']])} MB). "
        f"Batcher: {s['batcher']['steps']} decode steps, largest batch {s['batcher']['largest_batch']}, "
        f"{s['batcher']['failed_steps']} failed steps, {s['batcher']['cancelled']} samples cancelled by disconnects.", "",
        "| goal | met |", "|---|---|", *[f"| {k} | {'yes' if v else 'NO'} |" for k, v in s["goals"].items()],
    ]
    if s["problem_examples"]:
        lines += ["", "Problems:", *[f"- {p}" for p in s["problem_examples"]]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
