"""``koff serve`` through the official ``openai`` client, on a tiny exported model served on 127.0.0.1."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from koff.cli import main
from koff.export import export_run
from koff.runtime import load
from koff.server import BackgroundServer, create_app
from test_export import make_run
from tiny import write_corpus

KEY = "sk-test"
MAX_BODY = 32_000
@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    corpus = write_corpus(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KOFF_CACHE_DIR", str(root / "koff-cache"))
        export_run(make_run(root, corpus, "llama"), root / "export")
    return root / "export", corpus


@pytest.fixture(scope="module")
def server(export):
    app = create_app(load(export[0]), api_key=KEY, max_body_bytes=MAX_BODY, max_batch=8, batch_wait_ms=50)
    with BackgroundServer(app) as running:
        running.runtime = app.state.runtime
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def admin(server, method, path, headers=None, **kwargs):
    headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **kwargs)


def test_models_health_and_greedy_completion_equal_the_runtime(export, server, client):
    assert {m.id for m in client.models.list().data} == {"backbone", "eng", "code", "auto"}  # auto: the router
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed
    reference = load(export[0])
    for model, memory in (("eng", "eng"), ("backbone", None)):
        answer = client.completions.create(model=model, prompt="the cat", max_tokens=8, temperature=0)
        assert answer.choices[0].text == reference.generate("the cat", memory=memory, max_new_tokens=8)
        usage = answer.usage
        assert usage.prompt_tokens == len(reference.encode("the cat"))
        assert 1 <= usage.completion_tokens <= 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert answer.choices[0].finish_reason in ("stop", "length")


def test_chat_streaming_and_stop_strings(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog"}]
    whole = client.chat.completions.create(model="eng", messages=messages, max_tokens=10, temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens <= 10
    chunks = list(client.chat.completions.create(model="eng", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens and chunks[-2].choices[0].finish_reason

    plain = client.completions.create(model="code", prompt="def f(x):", max_tokens=12, temperature=0).choices[0].text
    streamed = client.completions.create(model="code", prompt="def f(x):", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain
    if len(plain) >= 4:
        stop = plain[2:4]
        cut = client.completions.create(model="code", prompt="def f(x):", max_tokens=12, temperature=0, stop=[stop, "\x00"])
        assert cut.choices[0].text == plain[: plain.find(stop)] and cut.choices[0].finish_reason == "stop"
        pieces = client.completions.create(model="code", prompt="def f(x):", max_tokens=12, temperature=0, stop=stop,
                                           stream=True)
        assert "".join(c.choices[0].text for c in pieces) == cut.choices[0].text
    with client.completions.create(model="eng", prompt="the", max_tokens=400, temperature=1.0, stream=True) as left:
        next(iter(left))  # the client goes away after one chunk; its sample stops, the server keeps serving
    seeded = [client.completions.create(model="eng", prompt="the", max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_errors_are_openai_shaped_and_leave_the_server_up(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.post(server.url + "/v1/completions", json={"model": "eng", "prompt": "x"}).status_code == 401
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.completions.create(model="eng", prompt="x", max_tokens=2, temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="eng", messages=[], max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):  # koff answers one choice per prompt
        client.completions.create(model="eng", prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError) as err:  # 512 positions; the prompt alone takes more
        client.completions.create(model="eng", prompt="the cat sat on the mat " * 150, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="eng", prompt="", max_tokens=2)
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="eng", prompt="x" * (MAX_BODY + 1), max_tokens=2)
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
    broken = admin(server, "POST", "/v1/completions", content=b'{"model": "eng", "prompt": ',
                   headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    base = server.runtime.model.base

    def failing_forward(*args, **kwargs):
        raise RuntimeError("simulated fault")

    base.forward = failing_forward  # a fault inside the running batch: its requests fail, the server stays up
    try:
        with pytest.raises(openai.InternalServerError, match="simulated fault"):
            client.completions.create(model="eng", prompt="BOOM", max_tokens=2)
    finally:
        del base.forward
    assert client.completions.create(model="eng", prompt="the", max_tokens=2, temperature=0).usage.completion_tokens >= 1


def test_concurrent_mixed_memory_requests_are_batched_and_match_one_by_one(server, client):
    cases = [(p, m) for p in ("the cat", "def f(x):", "the dog ran over") for m in ("eng", "code", "backbone")]

    def complete(case):
        prompt, model = case
        return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    alone = [complete(case) for case in cases]
    before = httpx.get(server.url + "/health").json()["batcher"]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(complete, cases))
    after = httpx.get(server.url + "/health").json()["batcher"]
    assert together == alone
    assert after["mixed_steps"] > before["mixed_steps"] and after["largest_batch"] >= 2


def test_add_domain_then_load_while_serving(export, server, client, capsys, monkeypatch):
    folder, corpus = export
    monkeypatch.chdir(folder.parent)  # a relative export path: the server must still find the new memory
    args = ["add-domain", folder.name, f"deu={corpus['deu']}", "--steps", "2", "--block-len", "32", "--batch-size", "2"]
    assert main([*args, "--server", server.url, "--api-key", KEY]) == 0
    assert "loaded into" in capsys.readouterr().out
    manifest = json.loads((folder / "memories" / "deu" / "manifest.json").read_text())
    assert manifest["backbone_fingerprint"] == load(folder).fingerprint and manifest["kv_slots"] == 4
    assert manifest["training"]["distill_weight"] == 0.0  # no teacher but the backbone itself: LM loss only
    assert main(args) == 2 and "already in this export" in capsys.readouterr().err
    assert "deu" in {m.id for m in client.models.list().data}
    assert client.completions.create(model="deu", prompt="der hund", max_tokens=4, temperature=0).usage.completion_tokens >= 1

    for outside in ("../backbone", "/etc", "deu/../../backbone", str(folder)):
        answer = admin(server, "POST", "/v1/memories/load", json={"path": outside, "name": "evil"})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "path_outside_memories"
    assert admin(server, "POST", "/v1/memories/load", json={"path": "deu"}).status_code == 409
    assert admin(server, "POST", "/v1/memories/load", json={"path": "nothing-here"}).status_code == 400
    loaded = admin(server, "POST", "/v1/memories/load", json={"path": str(folder / "memories" / "deu"), "name": "deu2"})
    assert loaded.status_code == 200 and "deu2" in loaded.json()["models"]
    assert admin(server, "DELETE", "/v1/memories/deu2").json()["deleted"] is True
    assert admin(server, "DELETE", "/v1/memories/deu2").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="deu2", prompt="der", max_tokens=2)
