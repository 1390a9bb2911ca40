import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from koff.cli import main
from koff.errors import KoffError
from koff.export import ExportError, export_run, load_run
from koff.masks import BinaryMask
from koff.model import UnknownMemoryError
from koff.runtime import MemoryLoadError, Sampling, load
from koff.training import DecomposeConfig, Decomposer
from recording import RecordingBatch
from tiny import save_tiny


def make_run(tmp_path, corpus, kind="llama", memory="lora+kv") -> str:
    """A finished tiny run whose memories are non-trivial and whose mask prunes FFN neurons and a KV group."""
    model_dir = save_tiny(tmp_path / f"model-{kind}", kind)
    out = tmp_path / f"run-{kind}-{memory}"
    config = DecomposeConfig(model=model_dir, domain=[f"eng={corpus['eng']}", f"code={corpus['code']}"], out=str(out),
                             block_len=32, batch_size=2, kv_slots=4, steps=3, memory=memory, sparsity=0.2, eval=False,
                             lr_lora=0.05, lr_kv=0.1)
    Decomposer(config).train()
    mask = BinaryMask.load(out / "mask.safetensors")
    mask.ffn[0][::3] = False
    mask.ffn[1][5:40] = False
    mask.attn[0] = torch.tensor([True, False])
    mask.attn[1] = torch.tensor([True, True])
    mask.save(out / "mask.safetensors")
    return str(out)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("uniform", [False, True])
def test_exported_backbone_and_memories_match_the_masked_model(tmp_path, corpus, kind, uniform):
    run_dir = make_run(tmp_path, corpus, kind)
    masked = load_run(run_dir).koff_model()
    export_run(run_dir, tmp_path / "export", uniform=uniform)
    runtime = load(tmp_path / "export")
    widths = runtime.meta["layer_widths"]
    assert widths["num_key_value_heads"] == ([2, 2] if uniform else [1, 2])
    assert widths["intermediate_size"][0] < 96 and (len(set(widths["intermediate_size"])) == 1) == uniform
    assert sorted(runtime.memories) == ["code", "eng"]
    ids = torch.randint(0, 300, (3, 12))
    for name in (None, "eng", "code"):
        expected = masked(ids, name)
        assert (runtime.model(ids, name) - expected).abs().max() <= 1e-4
    mixed = runtime.model(ids, ["eng", "code", None])
    assert (mixed[1] - masked(ids[1:2], "code")[0]).abs().max() <= 1e-4
    saved = [p.suffix for p in (tmp_path / "export").rglob("*") if p.is_file()]
    assert set(saved) <= {".safetensors", ".json", ".jinja"}  # no pickles anywhere


def test_uniform_export_loads_in_plain_transformers_and_peft(tmp_path, corpus):
    from peft import PeftModel

    run_dir = make_run(tmp_path, corpus, "qwen2", memory="lora")
    export_run(run_dir, tmp_path / "export", uniform=True)
    runtime = load(tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "backbone").eval()
    ids = torch.randint(0, 300, (2, 10))
    assert (plain(ids).logits - runtime.model(ids, None)).abs().max() <= 1e-4
    peft_model = PeftModel.from_pretrained(plain, tmp_path / "export" / "memories" / "eng").eval()
    assert (peft_model(ids).logits - runtime.model(ids, "eng")).abs().max() <= 1e-4


def test_uniform_layer_shape_exports_a_smaller_stock_model_that_transformers_and_peft_load(tmp_path, corpus):
    from peft import PeftModel

    out = tmp_path / "run"
    config = DecomposeConfig(model=save_tiny(tmp_path / "model", "qwen2"), domain=[f"eng={corpus['eng']}"], out=str(out),
                             block_len=32, batch_size=2, kv_slots=4, steps=4, memory="lora", sparsity=0.3, eval=False,
                             lr_lora=0.05, layer_shape="uniform", ffn_align=1)
    trainer = Decomposer(config)
    trainer.train()
    mask = BinaryMask.load(out / "mask.safetensors")
    assert len({int(m.sum()) for m in mask.ffn}) == 1 and len({int(m.sum()) for m in mask.attn}) == 1
    assert abs(mask.sparsity(trainer.model.costs) - 0.3) * trainer.model.costs.block_params <= trainer.model.costs.ffn_cost[0]
    summary = export_run(out, tmp_path / "export", uniform=True)
    assert summary["parameters"] < summary["dense_parameters"]  # really smaller, not padded back
    runtime = load(tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "backbone").eval()
    assert plain.config.intermediate_size == int(mask.ffn[0].sum())
    ids = torch.randint(0, 300, (2, 10))
    assert (plain(ids).logits - runtime.model(ids, None)).abs().max() <= 1e-4
    peft_model = PeftModel.from_pretrained(plain, tmp_path / "export" / "memories" / "eng").eval()
    assert (peft_model(ids).logits - runtime.model(ids, "eng")).abs().max() <= 1e-4


def test_mixed_memory_batched_generation_equals_one_by_one(tmp_path, corpus):
    export_run(make_run(tmp_path, corpus, "llama"), tmp_path / "export")
    runtime = load(tmp_path / "export")
    prompts = ["the cat sat", "def f(x):", "the dog ran over the hill"]
    memories = ["eng", "code", None]
    batched = runtime.generate(prompts, memory=memories, max_new_tokens=8)
    alone = [runtime.generate(p, memory=m, max_new_tokens=8) for p, m in zip(prompts, memories)]
    assert batched == alone
    assert "".join(runtime.generate(prompts[0], memory="eng", max_new_tokens=8, stream=True)) == alone[0]
    sampled = [runtime.generate(prompts[0], memory="eng", max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible


def test_samples_joining_and_leaving_a_running_batch_get_the_same_logits(tmp_path, corpus):
    # Continuous batching: prompts join a running batch between steps (their caches merged with
    # left padding) and finished ones leave it; each sample sees what it would see alone.
    export_run(make_run(tmp_path, corpus, "llama"), tmp_path / "export")
    runtime = load(tmp_path / "export")
    pad = runtime.tokenizer.pad_token_id
    requests = [("the cat sat", "eng", 9), ("def f(x):", "code", 3), ("the dog ran over the hill", None, 6),
                ("a", "code", 5), ("import os", "eng", 4)]
    joins = {0: [0, 1], 2: [2], 3: [3, 4]}  # step -> requests that join before it

    def alone(prompt, memory, n):
        batch = RecordingBatch(runtime.model, pad, set())
        batch.add(runtime.encode(prompt), memory, Sampling(n))
        while len(batch):
            batch.step()
        return batch.logits[0]

    batch = RecordingBatch(runtime.model, pad, set())
    keys, step, widths = {}, 0, []
    while step in joins or len(batch):
        for r in joins.get(step, []):
            prompt, memory, n = requests[r]
            keys[r] = batch.add(runtime.encode(prompt), memory, Sampling(n))
        batch.step()
        widths.append(len(batch.rows))
        step += 1
    assert max(widths) == 4 and widths[-1] == 1  # request 1 left before 3 and 4 joined; the longest ends alone
    for r, (prompt, memory, n) in enumerate(requests):
        got, expected = batch.logits[keys[r]], alone(prompt, memory, n)
        assert len(got) == len(expected) == n
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, atol=1e-4), r


def test_stop_strings_and_perplexity(tmp_path, corpus):
    export_run(make_run(tmp_path, corpus, "llama"), tmp_path / "export")
    runtime = load(tmp_path / "export")
    text = runtime.generate("the cat", memory="eng", max_new_tokens=12)
    if len(text) > 2:
        stop = text[1:3]
        assert stop not in runtime.generate("the cat", memory="eng", max_new_tokens=12, stop=[stop])
    ppl_eng = runtime.perplexity(["the cat sat on the mat"], memory="eng")
    ids = torch.tensor([runtime.encode("the cat sat on the mat")])
    logits = runtime.model(ids, "eng")
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert ppl_eng == pytest.approx(torch.exp(nll).item(), rel=1e-5)


def test_memories_swap_without_reloading_the_backbone(tmp_path, corpus):
    export_run(make_run(tmp_path, corpus, "llama"), tmp_path / "export")
    runtime = load(tmp_path / "export")
    backbone = runtime.model.base
    runtime.remove_memory("code")
    assert runtime.memories == ["eng"]
    assert runtime.add_memory(tmp_path / "export" / "memories" / "code") == "code"
    assert runtime.add_memory(tmp_path / "export" / "memories" / "code", name="code2") == "code2"
    assert runtime.model.base is backbone
    with pytest.raises(UnknownMemoryError, match="unknown memory 'deu'"):
        runtime.generate("x", memory="deu")


def test_refusals_leave_nothing_half_loaded(tmp_path, corpus):
    export_run(make_run(tmp_path, corpus, "llama"), tmp_path / "export")
    runtime = load(tmp_path / "export")
    source = tmp_path / "export" / "memories" / "eng"

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        change(folder)
        return folder

    def foreign(folder):
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["backbone_fingerprint"] = "0" * 64
        (folder / "manifest.json").write_text(json.dumps(manifest))

    cases = {
        "another backbone": variant("foreign", foreign),
        "not a koff memory": variant("no-manifest", lambda f: (f / "manifest.json").unlink()),
        "not a safetensors file": variant("corrupt", lambda f: (f / "adapter_model.safetensors").write_bytes(b"garbage")),
        "already loaded": source,
    }
    for message, folder in cases.items():
        with pytest.raises(MemoryLoadError, match=message):
            runtime.add_memory(folder, name="eng" if message == "already loaded" else "new")
        assert sorted(runtime.memories) == ["code", "eng"]


def test_export_refuses_a_mask_that_empties_a_layer(tmp_path, corpus):
    run_dir = make_run(tmp_path, corpus, "llama")
    mask = BinaryMask.load(f"{run_dir}/mask.safetensors")
    mask.attn[1][:] = False
    mask.save(f"{run_dir}/mask.safetensors")
    with pytest.raises(ExportError, match="layer 1 keeps no attention group"):
        export_run(run_dir, tmp_path / "export")


def test_cli_export_info_generate(tmp_path, corpus, capsys):
    run_dir = make_run(tmp_path, corpus, "qwen2")
    out = tmp_path / "export"
    assert main(["export", run_dir, str(out)]) == 0
    assert "memory eng" in capsys.readouterr().out
    assert main(["export", run_dir, str(out)]) == 2  # not empty: refuse without --force
    assert "--force" in capsys.readouterr().err
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| layer | FFN neurons | KV groups |" in printed and "| eng |" in printed
    assert main(["generate", str(out), "the cat", "--memory", "eng", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == load(out).generate("the cat", memory="eng", max_new_tokens=5).strip()
    assert main(["generate", str(out), "x", "--memory", "nope"]) == 2
    assert "unknown memory 'nope'" in capsys.readouterr().err


def test_text_stream_never_half_sends_a_stop_string(tokenizer):
    from koff.runtime import TextStream

    ids = tokenizer("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=["fox jumps"])
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    assert "".join(pieces) == "the quick brown " and not any("fox" in p for p in pieces)
    assert stream.flush() == ""

    # A tail that only looks like a stop string is held back, then released.
    stream = TextStream(tokenizer, stop=["over the top"])
    pieces = [stream.push(token) for token in ids]
    assert not stream.stopped
    assert "".join(pieces) + stream.flush() == "the quick brown fox jumps over the lazy dog"


def test_text_stream_decodes_a_window_and_gives_the_whole_text(tokenizer):
    from koff.runtime import TextStream

    text = "Grüße aus Köln – 東京 😀 the cat\n\tdef f(x): return x"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = []
    tokenizer_decode = tokenizer.decode
    tokenizer.decode = lambda i, **kw: decoded.append(len(i)) or tokenizer_decode(i, **kw)
    try:
        stream = TextStream(tokenizer)
        pieces = [stream.push(t) for t in ids] + [stream.flush()]
    finally:
        tokenizer.decode = tokenizer_decode
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert max(decoded[:-1]) < 8 < len(ids)  # windows, not the whole text (flush decodes it once)


@pytest.mark.parametrize("uniform", [False, True])
def test_a_backbone_written_in_shards_loads_as_one(tmp_path, corpus, uniform):
    run_dir = make_run(tmp_path, corpus)
    export_run(run_dir, tmp_path / "whole", uniform=uniform)
    export_run(run_dir, tmp_path / "sharded", uniform=uniform, max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded" / "backbone").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "backbone" / "model.safetensors.index.json").is_file()
    whole, sharded = load(tmp_path / "whole"), load(tmp_path / "sharded")
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(whole.model(ids, "eng"), sharded.model(ids, "eng"))


def test_export_streams_the_base_a_shard_at_a_time_without_building_the_model(tmp_path, corpus, monkeypatch):
    import koff.export.weights as weights

    run_dir = make_run(tmp_path, corpus, "qwen2")
    masked = load_run(run_dir).koff_model()

    def refuse(*args, **kwargs):
        raise AssertionError("export loaded the whole base model")

    written = []

    def save_tensors(tensors, path, metadata=None):
        written.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return real_save_tensors(tensors, path, metadata=metadata)

    real_save_tensors = weights.save_tensors
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(weights, "save_tensors", save_tensors)
    export_run(run_dir, tmp_path / "export", max_shard_size="40KB")
    monkeypatch.undo()
    largest_tensor = 300 * 64 * 4  # the embedding
    assert len(written) > 2 and max(written) <= max(40_000, largest_tensor)  # one shard in memory at a time
    runtime = load(tmp_path / "export")
    ids = torch.randint(0, 300, (2, 10))
    for name in (None, "eng"):
        assert (runtime.model(ids, name) - masked(ids, name)).abs().max() <= 1e-4


def test_export_refuses_a_base_whose_weights_are_gone(tmp_path, corpus):
    run_dir = make_run(tmp_path, corpus)
    for path in (tmp_path / "model-llama").glob("*.safetensors"):
        path.unlink()
    with pytest.raises(KoffError, match="holds no model.safetensors"):
        export_run(run_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()
