"""The server under bad requests: a bad request fails alone, admin calls do not wait for a free
batch slot, and a client that goes away stops its generation, streamed or not."""

import json
import math
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from koff.runtime import DecodeBatch, load
from koff.server import BackgroundServer, create_app
from koff.server.limits import ConnectionLimits
from test_server import export  # noqa: F401 - the module's export fixture

KEY = "sk-faults"
LONG = 200  # tokens a long request asks for; at PACE per step it would take 10 s


class PacedBatch(DecodeBatch):
    """A decode batch that waits ``pace["s"]`` per step, so a test can act while requests run."""

    pace = {"s": 0.0}

    def step(self):
        time.sleep(self.pace["s"])
        return super().step()


@pytest.fixture(scope="module")
def served(export):  # noqa: F811
    runtime = load(export[0])
    runtime.add_memory(export[0] / "memories" / "eng", name="bad")
    runtime.model.memories["bad"].prefix_keys[0].data.fill_(math.nan)  # a memory gone bad at run time
    runtime.new_batch = lambda: PacedBatch(runtime.model, runtime.tokenizer.pad_token_id, runtime.eos_ids)
    app = create_app(runtime, api_key=KEY, max_batch=4, batch_wait_ms=300)
    with BackgroundServer(app) as server:
        server.batcher = app.state.batcher
        yield server


@pytest.fixture(autouse=True)
def _no_pace():
    PacedBatch.pace["s"] = 0.0
    yield
    PacedBatch.pace["s"] = 0.0


def post(server, path, timeout=60, **body):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=timeout)


def complete(server, prompt, model, **extra):
    return post(server, "/v1/completions", model=model, prompt=prompt, **({"max_tokens": 8, "temperature": 0} | extra))


def wait_for(condition, seconds=15.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_bad_requests_in_a_batch_fail_alone(served):
    good = [("the cat", "eng"), ("def f(x):", "code"), ("the dog", "backbone")]
    alone = [complete(served, p, m).json()["choices"][0]["text"] for p, m in good]
    surrogate = b'{"model": "eng", "prompt": "a\\ud800b", "max_tokens": 4}'
    bad = [
        lambda: complete(served, "the cat", "bad"),  # its KV prefix holds NaN
        lambda: complete(served, "the cat", "eng", temperature=1e-45),  # overflowed the softmax once
        lambda: httpx.post(served.url + "/v1/completions", content=surrogate, timeout=60,
                           headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}),
        lambda: post(served, "/v1/completions", model="eng", prompt="the cat", max_tokens=10_000),
    ]
    before = dict(served.batcher.stats)
    with ThreadPoolExecutor(len(good) + len(bad)) as pool:
        goods = [pool.submit(complete, served, p, m) for p, m in good]
        bads = [pool.submit(call) for call in bad]
        together = [f.result().json()["choices"][0]["text"] for f in goods]
        nan_memory, tiny_temperature, lone_surrogate, too_long = (f.result() for f in bads)
    assert together == alone
    assert nan_memory.status_code == 500 and nan_memory.json()["error"]["code"] == "generation_failed"
    assert tiny_temperature.status_code == 200 and tiny_temperature.json()["choices"][0]["text"] == alone[0]
    assert lone_surrogate.status_code == 400 and lone_surrogate.json()["error"]["param"] == "prompt"
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    stats = served.batcher.stats
    assert stats["failed_requests"] == before["failed_requests"] + 1 and stats["failed_steps"] == before["failed_steps"]
    assert stats["largest_batch"] >= 3  # they really ran together


def test_out_of_range_seed_names_its_field(served):
    answer = complete(served, "the cat", "eng", seed=2**64)
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "seed"
    assert complete(served, "the cat", "eng", seed=2**64 - 1, temperature=1.0).status_code == 200


def generated_so_far(server) -> int:
    return server.batcher.stats["completion_tokens"]


def test_a_non_streamed_request_stops_when_its_client_leaves(served):
    PacedBatch.pace["s"] = 0.05
    before, cancelled = generated_so_far(served), served.batcher.stats["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        post(served, "/v1/completions", timeout=0.5, model="eng", prompt="the cat", max_tokens=LONG, temperature=0)
    wait_for(lambda: served.batcher.stats["cancelled"] == cancelled + 1)
    assert generated_so_far(served) - before < LONG // 4


def test_a_streamed_request_stops_when_its_client_leaves(served):
    PacedBatch.pace["s"] = 0.05
    before, cancelled = generated_so_far(served), served.batcher.stats["cancelled"]
    body = {"model": "code", "prompt": "def f(x):", "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    wait_for(lambda: served.batcher.stats["cancelled"] == cancelled + 1)
    assert generated_so_far(served) - before < LONG // 4


def test_admin_calls_run_within_a_step_of_a_full_batch(served, monkeypatch):
    PacedBatch.pace["s"] = 0.05
    batcher, stats = served.batcher, served.batcher.stats
    admitted, ran = stats["requests"], []
    queue_call = batcher.call

    async def timed_call(fn):  # the steps between the call's queueing and its run on the worker
        queued = stats["steps"]

        def timed():
            ran.append((stats["steps"] - queued, stats["completion_tokens"]))
            return fn()

        return await queue_call(timed)

    monkeypatch.setattr(batcher, "call", timed_call)
    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):  # fill the batch (max_batch 4) with long generations that time out after 3 s
            pool.submit(lambda: pytest.raises(httpx.ReadTimeout, post, served, "/v1/completions", timeout=3,
                                              model="code", prompt="def f(x):", max_tokens=LONG, temperature=0))
        wait_for(lambda: stats["requests"] == admitted + 4)
        running = stats["completion_tokens"]  # counted as each request ends
        for method, path, kwargs in [("GET", "/v1/memories", {}), ("DELETE", "/v1/memories/code", {}),
                                     ("POST", "/v1/memories/load", {"json": {"path": "code"}})]:
            answer = httpx.request(method, served.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=5,
                                   **kwargs)
            assert answer.status_code == 200, answer.text
    # Each ran at the end of the step in progress (counted, not timed: how long the HTTP round trip
    # takes on a busy machine is not the server's doing), while all four long generations still ran.
    assert [steps <= 1 for steps, _ in ran] == [True] * 3, ran
    assert [tokens == running for _, tokens in ran] == [True] * 3, (running, ran)
    assert "code" in served.batcher.memory_names
    assert complete(served, "def f(x):", "code").status_code == 200  # the running ones were unharmed by the swap


def test_a_memory_with_non_finite_weights_is_refused_by_admin_load(served, export):  # noqa: F811
    folder = export[0] / "memories" / "nanmem"
    shutil.copytree(export[0] / "memories" / "code", folder)
    (folder / "manifest.json").write_text(json.dumps(json.loads((folder / "manifest.json").read_text()) | {"name": "nanmem"}))
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors[sorted(tensors)[0]][0, 0] = math.inf
    save_file(tensors, str(weights))
    answer = httpx.post(served.url + "/v1/memories/load", json={"path": "nanmem"}, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=30)
    assert answer.status_code == 400 and "NaN or infinite" in answer.json()["error"]["message"]
    assert "nanmem" not in served.batcher.memory_names
    shutil.rmtree(folder)


def test_the_server_starts_without_its_bad_memory_folders(export, tmp_path):  # noqa: F811
    copy = tmp_path / "export"
    shutil.copytree(export[0], copy)
    corrupt = copy / "memories" / "corrupt"
    shutil.copytree(copy / "memories" / "eng", corrupt)
    (corrupt / "kv_prefix.safetensors").write_bytes(b"\x00" * 20)
    outside = tmp_path / "outside"
    shutil.copytree(copy / "memories" / "code", outside)
    (outside / "manifest.json").write_text(json.dumps(json.loads((outside / "manifest.json").read_text()) | {"name": "evil"}))
    (copy / "memories" / "evil").symlink_to(outside, target_is_directory=True)
    app = create_app(load(copy), api_key=KEY)
    with BackgroundServer(app) as server:
        listed = httpx.get(server.url + "/v1/memories", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert sorted(listed["memories"]) == ["code", "eng"]
    assert set(listed["broken"]) == {"corrupt", "evil"} and "leads outside" in listed["broken"]["evil"]
    assert str(tmp_path) not in json.dumps(listed)  # clients see paths inside the export only


# ----- memories that would break the batches they join ------------------------------------------
def _variant(export_dir, name, change):
    """A copy of the export's ``code`` memory under ``name``, changed by ``change(manifest, adapter, kv)``."""
    folder = export_dir / "memories" / name
    shutil.copytree(export_dir / "memories" / "code", folder)
    manifest = json.loads((folder / "manifest.json").read_text()) | {"name": name}
    adapter, kv = load_file(str(folder / "adapter_model.safetensors")), load_file(str(folder / "kv_prefix.safetensors"))
    change(manifest, adapter, kv)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    save_file(adapter, str(folder / "adapter_model.safetensors"))
    save_file(kv, str(folder / "kv_prefix.safetensors"))
    return folder


def _wrong_head_dim(manifest, adapter, kv):
    for key in list(kv):
        kv[key] = kv[key][..., :-1].contiguous()


def _fewer_layers(manifest, adapter, kv):
    for key in [k for k in kv if k.startswith("layers.1.")]:
        del kv[key]


def _one_layer_too_many(manifest, adapter, kv):
    kv["layers.2.keys"], kv["layers.2.values"] = kv["layers.1.keys"].clone(), kv["layers.1.values"].clone()


def _huge_alpha(manifest, adapter, kv):
    manifest["lora_alpha"] = 1e308


def _wrong_rank(manifest, adapter, kv):
    name = sorted(k for k in adapter if "lora_A" in k)[0]
    adapter[name] = adapter[name][:-1].contiguous()


def _integer_factor(manifest, adapter, kv):
    name = sorted(adapter)[0]
    adapter[name] = adapter[name].to(torch.int32)


def _huge_values(manifest, adapter, kv):
    kv["layers.0.values"][0, 0, 0] = 1e30


def _too_many_slots(manifest, adapter, kv):
    for key in list(kv):
        kv[key] = kv[key].repeat(1, 200, 1).contiguous()  # 4 slots x 200 = 800, past half of the 512 context
    manifest["kv_slots"] = 800


BROKEN_MEMORIES = {"headdim": (_wrong_head_dim, "shape"), "fewer": (_fewer_layers, "layers"),
                   "toomany": (_one_layer_too_many, "layers"), "alpha": (_huge_alpha, "LoRA scale"),
                   "rank": (_wrong_rank, "shape"), "integer": (_integer_factor, "float tensor"),
                   "huge": (_huge_values, "values beyond"), "slots": (_too_many_slots, "kv_slots")}


def test_memories_that_do_not_fit_the_backbone_are_broken_and_the_rest_serves(export, tmp_path):  # noqa: F811
    copy = tmp_path / "export"
    shutil.copytree(export[0], copy)
    for name, (change, _) in BROKEN_MEMORIES.items():
        _variant(copy, name, change)
    runtime = load(copy)
    assert sorted(runtime.memories) == ["code", "eng"]
    for name, (_, reason) in BROKEN_MEMORIES.items():
        assert reason in runtime.broken[name], (name, runtime.broken[name])
    with BackgroundServer(create_app(runtime, api_key=KEY, max_batch=8, batch_wait_ms=200)) as server:
        requests = [("the cat", m) for m in ("eng", "code", "backbone", *BROKEN_MEMORIES)]
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: complete(server, *r), requests))
        assert [a.status_code for a in answers[:3]] == [200, 200, 200]
        assert {a.status_code for a in answers[3:]} == {404}


def load_memory(server, path):
    return httpx.post(server.url + "/v1/memories/load", json={"path": path}, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30)


def test_admin_load_refuses_a_misfit_memory_in_one_line_without_server_paths(served, export):  # noqa: F811
    folder = _variant(export[0], "misfit", _wrong_head_dim)
    try:
        answer = load_memory(served, "misfit")
        message = answer.json()["error"]["message"]
        assert answer.status_code == 400 and "shape" in message
        assert str(export[0]) not in message and message.startswith("memories/misfit")
        assert complete(served, "the cat", "eng").status_code == 200
        nul = load_memory(served, "mis\x00fit")
        assert nul.status_code == 422 and "NUL" in nul.json()["error"]["message"]
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("field", [{"best_of": 2}, {"top_logprobs": 3}])
def test_fields_koff_cannot_honour_are_refused_not_ignored(served, field):
    answer = complete(served, "the cat", "eng", **field)
    assert answer.status_code == 422 and next(iter(field)) in answer.json()["error"]["message"]


# ----- slow and idle clients ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict(export):  # noqa: F811
    limits = ConnectionLimits(header_timeout_s=0.5, body_timeout_s=0.5, max_connections=20)
    app = create_app(load(export[0]), api_key=KEY, limits=limits)
    with BackgroundServer(app) as server:
        yield server


def _connect(server) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=5)


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing ``sock``; fails if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server held the connection for more than {seconds} s")
    return received


def test_idle_and_half_sent_headers_are_dropped(strict):
    idle = _connect(strict)
    half = _connect(strict)
    half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode())
    assert _closed_within(idle, 5) == b""
    assert _closed_within(half, 5) == b""


def test_a_half_sent_body_gets_408(strict):
    sock = _connect(strict)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\": ")
    assert b" 408 " in _closed_within(sock, 5).split(b"\r\n")[0]


def test_connections_beyond_the_cap_are_closed_and_good_requests_still_served(strict):
    held = [_connect(strict) for _ in range(20)]
    try:
        extra = _connect(strict)
        assert _closed_within(extra, 5) == b""
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    answer = httpx.post(strict.url + "/v1/completions", json={"model": "eng", "prompt": "the cat", "max_tokens": 4},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert answer.status_code == 200


def test_a_request_that_generates_longer_than_the_timeouts_is_not_cut(strict):
    PacedBatch.pace["s"] = 0.1
    answer = httpx.post(strict.url + "/v1/completions", json={"model": "eng", "prompt": "the cat", "max_tokens": 12,
                                                              "temperature": 0}, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=30)
    assert answer.status_code == 200
