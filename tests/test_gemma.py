"""Gemma 2 and Gemma 3 (text) through the whole pipeline on tiny random models: GeGLU MLPs,
sliding-window layers (a window of 8, shorter than the sequences here), soft-capped logits, tied
embeddings, head_dim apart from hidden / heads. Nothing in koff is Gemma-specific: the same
layout, hooks, cache and export serve them."""

import httpx
import pytest
import torch

from koff.cli import main
from koff.config import DecomposeConfig
from koff.export import export_run
from koff.formats.run import load_run
from koff.runtime import load
from koff.server import BackgroundServer, create_app
from koff.training import Decomposer
from tiny import save_tiny, write_corpus

KINDS = ["gemma2", "gemma3_text"]


def config(tmp_path, model, corpus, out="run", **extra):
    return DecomposeConfig(model=model, domain=[f"eng={corpus['eng']}", f"code={corpus['code']}"], out=str(tmp_path / out),
                           block_len=32, batch_size=2, kv_slots=4, steps=4, sparsity=0.2, eval=False,
                           checkpoint_every=2, **extra)


@pytest.mark.parametrize("kind", KINDS)
def test_a_gemma_decomposes_resumes_exports_and_serves(tmp_path, kind):
    model, corpus = save_tiny(tmp_path / "model", kind), write_corpus(tmp_path)
    whole = Decomposer(config(tmp_path, model, corpus, "whole"))
    whole.train()
    killed = Decomposer(config(tmp_path, model, corpus))
    killed.train(stop_after=2)  # as a kill right after the first checkpoint would
    resumed = Decomposer(config(tmp_path, model, corpus))
    resumed.train(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(whole.final_mask().ffn, resumed.final_mask().ffn))
    masked = load_run(tmp_path / "run").koff_model()
    ids = torch.randint(0, 300, (2, 24))  # three windows long
    for uniform in (False, True):
        export = tmp_path / f"export-{uniform}"
        export_run(tmp_path / "run", export, uniform=uniform)
        runtime = load(export)
        for memory in (None, "eng"):
            assert (runtime.model(ids, memory) - masked(ids, memory)).abs().max() <= 1e-4
    prompts = ["the cat sat on the mat and the dog ran", "def f(x):"]
    together = runtime.generate(prompts, memory=["eng", None], max_new_tokens=12)
    assert together == [runtime.generate(prompts[0], memory="eng", max_new_tokens=12),
                        runtime.generate(prompts[1], max_new_tokens=12)]
    with BackgroundServer(create_app(runtime)) as server:
        answer = httpx.post(server.url + "/v1/completions", json={"model": "eng", "prompt": prompts[0], "max_tokens": 6,
                                                                  "temperature": 0}, timeout=60)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == together[0][: len(answer.json()["choices"][0]["text"])]


@pytest.mark.parametrize("kind", KINDS)
def test_koff_plan_reads_a_gemma(tmp_path, kind, capsys):
    model = save_tiny(tmp_path / "model", kind)
    assert main(["plan", "--model", model, "--batch-size", "2", "--block-len", "32"]) == 0
    assert "GiB" in capsys.readouterr().out


def test_gguf_export_of_a_gemma_is_refused_in_one_line(tmp_path, capsys):
    model, corpus = save_tiny(tmp_path / "model", "gemma2"), write_corpus(tmp_path)
    Decomposer(config(tmp_path, model, corpus)).train()
    capsys.readouterr()
    code = main(["export", str(tmp_path / "run"), str(tmp_path / "export"), "--format", "gguf"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "not 'gemma2'" in err.strip().splitlines()[-1]
