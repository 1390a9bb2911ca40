"""`model: "auto"`: the export's router picks a memory from the prompt; a low-confidence prompt goes
to the fallback; a missing or corrupt router is one line and named memories keep working."""

import json
import shutil

import httpx
import pytest
import torch

from koff.cli import main
from koff.data import load_domain, parse_domain
from koff.routing import ROUTER_FILE, HiddenStateRouter, Router, spread
from koff.formats.exported_memory import MANIFEST
from koff.routing.router import token_counts
from koff.runtime import load
from koff.server import BackgroundServer, create_app
from test_server import export  # noqa: F401 - the module's export fixture
from tiny import CORPUS, tiny_model

PROMPTS = {"eng": CORPUS["eng"] * 3, "code": CORPUS["code"] * 3}


def copy_of(export_dir, tmp_path, change=None):
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    if change:
        change(copy / ROUTER_FILE)
    return copy


def test_export_writes_a_router_that_separates_its_domains(export):  # noqa: F811
    runtime = load(export[0])
    assert runtime.router is not None and runtime.router.names == ["code", "eng"]
    picks = runtime.route([PROMPTS["eng"], PROMPTS["code"], CORPUS["eng"][:20], CORPUS["code"][:16]])
    assert [name for name, _ in picks] == ["eng", "code", "eng", "code"]
    assert all(confidence > 0 for _, confidence in picks) and runtime.router.kind == "tokens"
    text = runtime.generate(PROMPTS["code"], memory="auto", max_new_tokens=6)
    assert text == runtime.generate(PROMPTS["code"], memory="code", max_new_tokens=6)


def test_a_prompt_below_the_threshold_goes_to_the_backbone(export):  # noqa: F811
    runtime = load(export[0])
    runtime.router.threshold = 3.0  # no margin of two cosines reaches 3
    assert runtime.route(PROMPTS["eng"])[0][0] is None
    assert runtime.generate(PROMPTS["eng"], memory="auto", max_new_tokens=5) == \
        runtime.generate(PROMPTS["eng"], memory=None, max_new_tokens=5)


def test_the_server_routes_auto_and_says_where(export):  # noqa: F811
    app = create_app(load(export[0]), api_key="k")
    with BackgroundServer(app) as server:
        def ask(model, prompt):
            return httpx.post(server.url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                              json={"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0})

        auto, named = ask("auto", PROMPTS["code"]), ask("code", PROMPTS["code"])
        assert auto.status_code == 200 and auto.json()["model"] == "code" and auto.headers["x-koff-memory"] == "code"
        assert auto.json()["choices"][0]["text"] == named.json()["choices"][0]["text"]
        both = httpx.post(server.url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                          json={"model": "auto", "prompt": [PROMPTS["eng"], PROMPTS["code"]], "max_tokens": 2})
        assert both.headers["x-koff-memory"] == "eng,code"
        chat = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                          json={"model": "auto", "messages": [{"role": "user", "content": PROMPTS["eng"]}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["model"] == "eng" and chat.headers["x-koff-memory"] == "eng"
        assert "auto" in {m["id"] for m in httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer k"}).json()["data"]}


def test_low_confidence_requests_go_to_the_configured_fallback(export):  # noqa: F811
    runtime = load(export[0])
    runtime.router.threshold = 3.0
    app = create_app(runtime, auto_fallback="eng")
    with BackgroundServer(app) as server:
        answer = httpx.post(server.url + "/v1/completions", timeout=60,
                            json={"model": "auto", "prompt": PROMPTS["code"], "max_tokens": 2})
    assert answer.json()["model"] == "eng" and answer.headers["x-koff-memory"] == "eng"


def corrupt(path):
    path.write_bytes(b"\x00" * 40)


def for_other_memories(path):
    router = Router.load(path, tiny_model())
    router.add("deu", tiny_model(), [torch.tensor([1, 2, 3])], 0).save(path)


def with_negative_counts(path):
    router = Router.load(path, tiny_model())
    router.counts[0, 0] = -5
    router.save(path)


@pytest.mark.parametrize("change, reason", [(lambda p: p.unlink(), "has no router.safetensors"),
                                            (corrupt, "not a readable koff router"),
                                            (for_other_memories, "does not fit"),
                                            (with_negative_counts, "no router makes")])
def test_a_missing_or_bad_router_is_one_line_and_named_memories_still_serve(export, tmp_path, capsys, change, reason):  # noqa: F811
    copy = copy_of(export[0], tmp_path, change)
    runtime = load(copy)
    assert runtime.router is None and reason in runtime.router_problem
    assert runtime.generate("the cat", memory="eng", max_new_tokens=2) is not None
    capsys.readouterr()
    assert main(["generate", str(copy), "the cat", "--memory", "auto", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and "needs a router" in err[-1]
    with BackgroundServer(create_app(runtime)) as server:
        named = httpx.post(server.url + "/v1/completions", json={"model": "eng", "prompt": "the cat", "max_tokens": 2}, timeout=60)
        auto = httpx.post(server.url + "/v1/completions", json={"model": "auto", "prompt": "the cat", "max_tokens": 2}, timeout=60)
    assert named.status_code == 200
    assert auto.status_code == 400 and auto.json()["error"]["code"] == "no_router"


def test_eval_routing_reports_accuracy_confusion_and_the_cost_of_a_wrong_memory(export, tmp_path, capsys):  # noqa: F811
    folder, corpus = export
    out = tmp_path / "eval"
    assert main(["eval", str(folder), "--routing", "--max-blocks", "2", "--out", str(out),
                 "--transfer", f"eng={corpus['eng']}", "--transfer-max-blocks", "2"]) == 0
    table = json.loads((out / "routing.json").read_text())
    assert list(table["sets"]) == ["validation", "eng"]  # a transfer set is named by its source
    for result in table["sets"].values():
        assert set(result["accuracy"]) == {"16", "64", "256"}
        assert set(result["perplexity"]["eng"]) == {"code", "eng", "(backbone)"}
        assert result["mean_routed_to_best"] >= 1.0  # no router beats each block's best memory
    validation = table["sets"]["validation"]
    assert validation["accuracy"]["64"]["mean"] == 1.0  # two clearly different domains
    assert validation["routed_to_oracle"] == pytest.approx({"code": 1.0, "eng": 1.0})
    best = validation["best_memory"]
    assert validation["agreement_with_best"]["eng"] == sum(b == "eng" for b in best["eng"]) / len(best["eng"])
    assert "routed / best memory" in (out / "routing.md").read_text()


def test_eval_routing_keeps_one_domain_from_two_sources_apart(export, tmp_path, capsys):  # noqa: F811
    folder, corpus = export
    text = corpus["eng"].read_text()
    (tmp_path / "manual.txt").write_text(text)
    (tmp_path / "history.txt").write_text(text[len(text) // 2:] + text[:len(text) // 2])
    out = tmp_path / "eval"
    assert main(["eval", str(folder), "--routing", "--max-blocks", "2", "--out", str(out), "--transfer-max-blocks", "1",
                 "--transfer", f"eng={tmp_path / 'manual.txt'}", "--transfer", f"eng={tmp_path / 'history.txt'}"]) == 0
    sets = json.loads((out / "routing.json").read_text())["sets"]
    assert list(sets) == ["validation", "manual", "history"]  # the second no longer overwrites the first
    assert all(list(sets[s]["perplexity"]) == ["eng"] for s in ("manual", "history"))
    capsys.readouterr()
    assert main(["eval", str(folder), "--routing", "--out", str(out), "--transfer", f"eng={tmp_path / 'manual.txt'}",
                 "--transfer", f"eng={tmp_path / 'manual.txt'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--transfer gives eng twice from manual")


def test_add_domain_adds_the_new_memory_to_the_router(export, tmp_path):  # noqa: F811
    folder, corpus = export
    copy = copy_of(folder, tmp_path)
    assert main(["add-domain", str(copy), f"deu={corpus['deu']}", "--steps", "1", "--block-len", "32", "--kv-slots", "4"]) == 0
    runtime = load(copy)
    assert runtime.router.names == ["code", "eng", "deu"]
    assert [name for name, _ in runtime.route([CORPUS["deu"] * 3, PROMPTS["eng"], PROMPTS["code"]])] == ["deu", "eng", "code"]
    train = load_domain(parse_domain(f"deu={corpus['deu']}"), runtime.tokenizer, block_len=32).train
    assert runtime.router.counts[2].sum() == train.numel()  # the token router counts every training block


def test_add_domain_rebuilds_a_missing_router_from_the_split_each_memory_was_trained_on(export, tmp_path):  # noqa: F811
    folder, corpus = export
    copy = copy_of(folder, tmp_path)
    (copy / ROUTER_FILE).unlink()
    manifest = copy / "memories" / "eng" / MANIFEST
    record = json.loads(manifest.read_text())
    assert (record["data"]["val_fraction"], record["data"]["seed"]) == (0.1, 0)  # the run's split, recorded
    record["data"]["seed"] = 3  # as if the run had used seed 3
    manifest.write_text(json.dumps(record))
    assert main(["add-domain", str(copy), f"deu={corpus['deu']}", "--steps", "1", "--block-len", "32", "--kv-slots", "4"]) == 0
    runtime = load(copy)
    eng = runtime.router.names.index("eng")
    split = {seed: load_domain(parse_domain(f"eng={corpus['eng']}"), runtime.tokenizer, block_len=32, seed=seed).train
             for seed in (0, 3)}
    vocabulary = runtime.router.counts.shape[1]
    assert not torch.equal(token_counts(list(split[0]), vocabulary), token_counts(list(split[3]), vocabulary))
    assert torch.equal(runtime.router.counts[eng], token_counts(list(split[3]), vocabulary))


def test_the_hidden_state_router_separates_the_domains_and_round_trips(export, tmp_path):  # noqa: F811
    folder, corpus = export
    runtime = load(folder)
    pad = runtime.tokenizer.pad_token_id
    texts = {name: spread(load_domain(parse_domain(f"{name}={corpus[name]}"), runtime.tokenizer, block_len=32).train, 8)
             for name in ("eng", "code")}
    router = HiddenStateRouter.build(runtime.model.base, texts, pad)
    router.save(tmp_path / ROUTER_FILE)
    again = Router.load(tmp_path / ROUTER_FILE, runtime.model.base)
    assert isinstance(again, HiddenStateRouter) and again.layer == router.layer and torch.equal(again.means, router.means)
    prompts = [torch.tensor(runtime.encode(PROMPTS[name])) for name in ("eng", "code")]
    assert [name for name, _ in again.choose(runtime.model.base, prompts, pad)] == ["eng", "code"]
