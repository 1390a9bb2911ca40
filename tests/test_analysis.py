import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from koff.analysis import (
    activation_probabilities,
    adjusted_enrichment,
    classify,
    language_rates,
    lape_scores,
    outlier_neurons,
    removal_rates,
    spread_blocks,
)
from koff.cli import main
from koff.data import DomainData
from koff.masks import BinaryMask
from koff.models import decoder_layout
from koff.training import DecomposeConfig, Decomposer
from tiny import save_tiny, tiny_model

# The constructed case: token ids 10..49 are "language 1", 50..99 "language 2".
LANG1, LANG2 = range(10, 50), range(50, 100)
A, B, C, E = 5, 17, 40, 60  # neurons of layer 0: lang-1 only, every token, lang 1 + half of lang 2, one rare token


def constructed_model():
    """A tiny Llama whose layer-0 gate_proj reads hand-set embedding features, so that which neuron
    fires on which token is known exactly; every other neuron (and all of layer 1) never fires."""
    model = tiny_model("llama")
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.zero_()
        ids = torch.arange(emb.shape[0])
        lang1 = (ids >= 10) & (ids < 50)
        sign = lambda flags: flags.float() * 2 - 1  # noqa: E731
        emb[:, 0] = sign(lang1)
        emb[:, 1] = 1.0
        emb[:, 2] = sign(lang1 | ((ids >= 50) & (ids < 75)))
        emb[:, 3] = sign(ids == 10)
        layer0, layer1 = model.model.layers
        layer0.self_attn.o_proj.weight.zero_()  # the MLP then reads the (normalised) embedding itself
        gate = layer0.mlp.gate_proj.weight
        gate.zero_()  # act_fn(0) = silu(0) = 0: never "> 0", so these neurons are dead
        for neuron, feature in ((A, 0), (B, 1), (C, 2), (E, 3)):
            gate[neuron, feature] = 10.0
        layer1.mlp.gate_proj.weight.zero_()
    return model


def language(name: str, ids: range, blocks: int = 4) -> DomainData:
    data = torch.tensor(list(ids)).repeat(blocks, 1)  # every id once per block
    return DomainData(name, f"test:{name}", data, data[:1])


def test_lape_finds_the_constructed_specific_and_general_neurons():
    model = constructed_model()
    layout = decoder_layout(model)
    domains = [language("one", LANG1), language("two", LANG2)]
    probs = activation_probabilities(model, layout, domains, batch_size=3, progress=False)
    assert probs.shape == (2, 2, 96)
    assert probs[:, 0, A].tolist() == [1.0, 0.0]
    assert probs[:, 0, B].tolist() == [1.0, 1.0]
    assert probs[:, 0, C].tolist() == [1.0, 0.5]
    assert probs[:, 0, E].tolist() == pytest.approx([1 / 40, 0.0])
    assert int((probs > 0).sum()) == 6  # nothing else ever fires
    assert all(not parts.projection("gate_proj")._forward_hooks for parts in layout.layers)  # hooks removed

    entropy = lape_scores(probs)
    assert entropy[0, A] == 0.0
    assert entropy[0, B] == pytest.approx(math.log(2))
    assert entropy[0, C] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert entropy[1, 0] == pytest.approx(math.log(2))  # dead: no language preference

    # Active = A, B, C (E fires on 2.5% of language 1 only: entropy 0, yet below min_probability).
    classes = classify(entropy, probs, specific_fraction=1 / 3, general_fraction=1 / 3, min_probability=0.05)
    assert classes.active.sum() == 3
    assert classes.specific.nonzero().tolist() == [[0, A]]
    assert classes.general.nonzero().tolist() == [[0, B]]
    assert classes.summary()["specific_max_entropy"] == 0.0
    # With a floor under E's probability, E (entropy 0, after A by position) joins the specific side.
    loose = classify(entropy, probs, specific_fraction=0.5, general_fraction=0.25, min_probability=0.01)
    assert loose.specific.nonzero().tolist() == [[0, A], [0, E]]
    assert loose.general.nonzero().tolist() == [[0, B]]


def test_activation_probabilities_do_not_depend_on_batching_or_architecture():
    model = tiny_model("qwen2")
    torch.manual_seed(0)
    domains = [DomainData(n, n, torch.randint(0, 300, (5, 16)), torch.randint(0, 300, (1, 16))) for n in ("a", "b")]
    layout = decoder_layout(model)
    one = activation_probabilities(model, layout, domains, batch_size=1, progress=False)
    many = activation_probabilities(model, layout, domains, batch_size=4, progress=False)
    assert torch.allclose(one, many)
    assert 0.2 < float(one.mean()) < 0.8  # random weights: SiLU fires on about half the tokens
    val = activation_probabilities(model, layout, domains, split="val", progress=False)
    assert not torch.equal(val, one)


def test_spread_blocks_covers_the_whole_corpus():
    blocks = torch.arange(10).unsqueeze(1)
    assert spread_blocks(blocks, 4).flatten().tolist() == [0, 3, 6, 9]
    assert spread_blocks(blocks, None) is blocks and spread_blocks(blocks, 20) is blocks


def test_classify_refuses_overlapping_fractions():
    with pytest.raises(ValueError, match="add up to more than 1"):
        classify(torch.zeros(1, 4), torch.ones(2, 1, 4), 0.6, 0.6)


def hand_made():
    keep = [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    mask = BinaryMask([torch.tensor(k, dtype=torch.bool) for k in keep], [torch.ones(2, dtype=torch.bool)] * 3)
    specific = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    general = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    return mask, specific, general


def test_removal_rates_on_a_hand_made_mask():
    mask, specific, general = hand_made()
    r = removal_rates(mask, specific, general)
    assert (r["n_specific"], r["n_general"], r["n_all"]) == (2, 5, 12)
    assert r["all"] == 3 / 12
    assert r["specific"] == 1.0 and r["specific_enrichment"] == 4.0
    assert r["general"] == 1 / 5 and r["general_enrichment"] == pytest.approx(0.8)
    # expected if each layer removed the class at its own rate: specific 1*1/4 + 1*1/2, general 2/4 + 2/2 + 0
    assert r["specific_layer_adjusted_enrichment"] == pytest.approx(2 / 0.75)
    assert r["general_layer_adjusted_enrichment"] == pytest.approx(1 / 1.5)
    layer0, layer1, layer2 = r["per_layer"]
    assert (layer0["all"], layer0["specific"], layer0["general"]) == (0.25, 1.0, 0.0)
    assert (layer0["specific_enrichment"], layer0["general_enrichment"]) == (4.0, 0.0)
    assert (layer1["all"], layer1["specific"], layer1["general"]) == (0.5, 1.0, 0.5)
    assert (layer1["specific_enrichment"], layer1["general_enrichment"]) == (2.0, 1.0)
    assert (layer2["all"], layer2["specific"], layer2["general"]) == (0.0, None, 0.0)
    assert layer2["specific_enrichment"] is None and layer2["general_enrichment"] is None
    assert "specific_activity_adjusted_enrichment" not in r

    probs = torch.zeros(2, 3, 4)
    probs[0, :, 0] = 0.9  # the specific neurons belong to language "x"
    probs[1, 1, :] = 0.5
    langs = language_rates(mask, probs, specific, ["x", "y"])
    assert langs == {"x": {"n_specific": 2, "removal_rate": 1.0}, "y": {"n_specific": 0, "removal_rate": None}}
    assert "general_activity_adjusted_enrichment" in removal_rates(mask, specific, general, probs)

    with pytest.raises(ValueError, match="mask has 3 layers"):
        removal_rates(mask, specific[:2], general[:2])


def test_outlier_neurons_ranks_over_all_layers_and_reads_the_mask():
    importance = [torch.tensor([1.0, 2.0, 900.0]), torch.tensor([3.0, 1.0, 1.5, 4000.0])]
    mask = BinaryMask([torch.tensor([True, True, False]), torch.tensor([True, True, True, True])],
                      [torch.ones(1, dtype=torch.bool)] * 2)
    top = outlier_neurons(importance, mask, top=3)
    assert [(o["layer"], o["neuron"], o["kept"]) for o in top] == [(1, 3, True), (0, 2, False), (1, 0, True)]
    assert top[0]["times_median"] == pytest.approx(4000.0 / 2.0)  # median of all seven scores
    with pytest.raises(ValueError, match="7 neurons, the mask 6"):
        outlier_neurons(importance, BinaryMask([m[:2] if i == 0 else m for i, m in enumerate(mask.ffn)], mask.attn))


def test_cli_analyze_reports_a_removed_massive_neuron(tmp_path, corpus, capsys):
    """A neuron made to dominate Wanda importance and removed by the mask is named as removed."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 7] *= 1000.0
    model_dir = save_tiny(tmp_path / "model", model=model)
    run_dir = tmp_path / "run"
    config = DecomposeConfig(model=model_dir, domain=[f"eng={corpus['eng']}", f"deu={corpus['deu']}"],
                             out=str(run_dir), block_len=32, batch_size=2, kv_slots=4, steps=2, checkpoint_every=2,
                             sparsity=0.3, eval=False)
    Decomposer(config).train()
    mask = BinaryMask.load(run_dir / "mask.safetensors")
    mask.ffn[1][7] = False
    mask.save(run_dir / "mask.safetensors")
    assert main(["analyze", str(run_dir), "--max-blocks", "3", "--batch-size", "2", "--outliers", "2"]) == 0
    top = json.loads((run_dir / "analysis" / "analysis.json").read_text())["outliers"]
    assert (top[0]["layer"], top[0]["neuron"], top[0]["kept"]) == (1, 7, False) and len(top) == 2
    assert top[0]["times_median"] > 100 and "**removed**" in capsys.readouterr().out


def test_adjusted_enrichment_compares_within_strata():
    removed = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    selected = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    strata = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # stratum rates 1/2 and 1/4: expected 1 * 1/2 + 2 * 1/4 = 1 removal; observed 2
    assert adjusted_enrichment(removed, selected, strata) == 2.0
    assert adjusted_enrichment(torch.zeros(8, dtype=torch.bool), selected, strata) is None


def test_cli_analyze_writes_json_table_and_plot(tmp_path, tokenizer, corpus, capsys):
    model_dir = save_tiny(tmp_path / "model", "llama")
    run_dir = tmp_path / "run"
    domains = [f"eng={corpus['eng']}", f"deu={corpus['deu']}", f"code={corpus['code']}"]
    config = DecomposeConfig(model=model_dir, domain=domains, out=str(run_dir), block_len=32, batch_size=2,
                             kv_slots=4, steps=2, checkpoint_every=2, sparsity=0.3, eval=False)
    Decomposer(config).train()
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    stored["domain"].append("py=bundled:code/python")  # skipped without being read
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored))

    assert main(["analyze", str(run_dir), "--exclude", "code", "--max-blocks", "3", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "skipped domain py (bundled:code/python): code is not a language" in printed
    assert "skipped domain code" in printed and "| language-specific |" in printed
    out = run_dir / "analysis"
    result = json.loads((out / "analysis.json").read_text())
    assert result["languages"] == ["eng", "deu"]
    assert [s["name"] for s in result["skipped"]] == ["code", "py"]
    assert result["tokens_per_language"] == {"eng": 3 * 32, "deu": 3 * 32}
    classes = result["classes"]
    assert classes["neurons"] == 2 * 96
    assert classes["specific"] == classes["general"] == round(0.05 * classes["active"])
    mask = BinaryMask.load(run_dir / "mask.safetensors")
    removed = sum(int((~m).sum()) for m in mask.ffn)
    assert removed > 0 and result["removal"]["all"] == removed / (2 * 96)
    assert len(result["removal"]["per_layer"]) == 2
    assert (out / "removal_by_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outliers = result["outliers"]
    assert len(outliers) == 8 and "Wanda importance / median" in printed
    assert [o["importance"] for o in outliers] == sorted((o["importance"] for o in outliers), reverse=True)
    assert all(o["kept"] == bool(mask.ffn[o["layer"]][o["neuron"]]) for o in outliers)
    saved = load_file(out / "lape.safetensors")
    assert saved["probs"].shape == (2, 2, 96) and int(saved["specific"].sum()) == classes["specific"]

    # The analysis reruns from its own resolved config, into another folder.
    assert main(["analyze", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "analysis.json").read_text())
    assert again["removal"] == result["removal"]


def test_cli_analyze_user_errors(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nowhere")]) == 2
    assert "nowhere/config.yaml not found" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": "m", "domain": ["eng=a.txt", "py=bundled:code/python"]}))
    (run_dir / "mask.safetensors").write_bytes(b"")
    assert main(["analyze", str(run_dir)]) == 2
    assert "at least 2 are needed" in capsys.readouterr().err
    assert main(["analyze", str(run_dir), "--exclude", "deu"]) == 2
    assert "no domain deu" in capsys.readouterr().err
    assert main(["analyze", str(run_dir), "--specific-fraction", "0.7", "--general-fraction", "0.7"]) == 2
    assert "add up to more than 1" in capsys.readouterr().err
    assert main(["analyze", str(run_dir), "--outliers", "-1"]) == 2
    assert "--outliers must be at least 0, got -1" in capsys.readouterr().err

    # A mask that does not fit the model is refused before any forward pass.
    model_dir = save_tiny(tmp_path / "model", "llama")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": model_dir, "domain": ["eng=a.txt", "deu=b.txt"]}))
    BinaryMask([torch.ones(8, dtype=torch.bool)] * 3, [torch.ones(2, dtype=torch.bool)] * 3).save(run_dir / "mask.safetensors")
    assert main(["analyze", str(run_dir)]) == 2
    assert "has 3 layers of [8] FFN neurons" in capsys.readouterr().err
