import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from koff.cli import main
from koff.data import DomainSpec, load_domain
from koff.evaluation import domain_perplexity, evaluate, hf_scorer
from koff.evaluation import score_cache
from koff.experiments.ablation import memory_parameters_per_domain
from koff.export import export_run
from koff.training import DecomposeConfig, Decomposer
from koff.training.pipeline import train_or_resume
import sweep as sweep_module  # bench/
from sweep import run_sweep  # bench/
from tiny import save_tiny, tiny_model


def test_perplexity_matches_hand_computed_loss(tokenizer, corpus):
    model = tiny_model("llama")
    data = load_domain(DomainSpec("eng", str(corpus["eng"])), tokenizer, block_len=16, val_fraction=0.3)
    result = evaluate(hf_scorer(model), [data], batch_size=3, progress=False)["domains"]["eng"]
    with torch.no_grad():
        # HF's own loss, one block at a time; blocks are equal length so the mean is token-weighted.
        losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in data.val.long()]
    assert result["tokens"] == data.val.shape[0] * 15
    assert math.isclose(result["nll"], sum(losses) / len(losses), rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(sum(losses) / len(losses)), rel_tol=1e-5)


def test_evaluate_reports_means(tokenizer, corpus):
    model = tiny_model("qwen2")
    domains = [load_domain(DomainSpec(n, str(corpus[n])), tokenizer, block_len=16) for n in ("eng", "code")]
    result = evaluate(hf_scorer(model), domains, progress=False, max_blocks=2)
    ppls = [result["domains"][n]["perplexity"] for n in ("eng", "code")]
    assert result["domains"]["eng"]["tokens"] == 2 * 15
    assert math.isclose(result["mean_perplexity"], sum(ppls) / 2)
    assert math.isclose(result["geomean_perplexity"], math.sqrt(ppls[0] * ppls[1]))


def decompose(model_dir, corpus, out, **overrides):
    values = dict(model=model_dir, domain=[f"eng={corpus['eng']}", f"code={corpus['code']}"], out=str(out),
                  block_len=32, batch_size=2, kv_slots=4, steps=3, sparsity=0.2, eval=False, lr_lora=0.05, lr_kv=0.1)
    Decomposer(DecomposeConfig(**(values | overrides))).train()
    return str(out)


def test_eval_table_of_a_run_and_its_comparison_runs(tmp_path, corpus, capsys):
    model_dir = save_tiny(tmp_path / "model", "llama")
    koff = decompose(model_dir, corpus, tmp_path / "koff")
    lora = decompose(model_dir, corpus, tmp_path / "lora", mask=f"file:{koff}", memory="lora")
    pruned = decompose(model_dir, corpus, tmp_path / "oneshot", mask="oneshot:activation", memory="lora")
    pruned_kv = decompose(model_dir, corpus, tmp_path / "oneshot-kv", mask="oneshot:activation", memory="kv")
    assert main(["eval", koff, lora, f"prune-then-LoRA={pruned}", f"prune-then-KV={pruned_kv}", "--max-blocks", "2",
                 "--out", str(tmp_path / "t")]) == 0
    table = json.loads((tmp_path / "t" / "table.json").read_text())
    names = [r["configuration"] for r in table["rows"]]
    # a mask is scored alone once: the fixed mask is KOFF's, and both one-shot runs have the same mask
    # (with the activation importance: three steps from the Wanda start leave KOFF's mask where Wanda's is)
    assert names == ["dense base", "dense base + memories (LoRA + KV)", "mask, no memories",
                     "KOFF: learned mask + LoRA + KV", "fixed mask + LoRA only",
                     "prune-then-LoRA, mask without memories", "prune-then-LoRA", "prune-then-KV"]
    rows = {r["configuration"]: r for r in table["rows"]}
    assert all(r == 1.0 for r in rows["dense base"]["ratio_to_dense"].values())
    assert table["domains"] == ["eng", "code"]
    # the same mask with memories off is the bare-mask row; the parameter counts follow the mask
    assert rows["mask, no memories"]["parameters"] < rows["dense base"]["parameters"]
    assert rows["fixed mask + LoRA only"]["parameters"] == rows["KOFF: learned mask + LoRA + KV"]["parameters"]
    assert 0 < rows["fixed mask + LoRA only"]["memory_parameters_per_domain"] < rows["KOFF: learned mask + LoRA + KV"]["memory_parameters_per_domain"]
    csv_lines = (tmp_path / "t" / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(names) and csv_lines[0].startswith("configuration,eng_perplexity")
    assert "| dense base |" in (tmp_path / "t" / "table.md").read_text()
    assert "KOFF: learned mask" in capsys.readouterr().out


def test_transfer_columns_score_each_memory_on_another_source_and_price_the_offloading(tmp_path, corpus, capsys):
    model_dir = save_tiny(tmp_path / "model", "llama")
    koff = decompose(model_dir, corpus, tmp_path / "koff")
    other = tmp_path / "manual" / "eng"  # another source of English: HTML pages
    other.mkdir(parents=True)
    (other / "ch01.html").write_text("<p>" + "the dog sat on the hill and the cat ran over the mat " * 40 + "</p>")
    assert main(["eval", koff, "--max-blocks", "2", "--transfer", f"eng={other}", "--transfer-max-blocks", "3",
                 "--out", str(tmp_path / "t")]) == 0
    table = json.loads((tmp_path / "t" / "table.json").read_text())
    assert table["domains"] == ["eng", "code"] and table["transfer"] == ["eng@manual"]
    assert table["tokens"]["eng@manual"] == 3 * 31  # three evenly spaced blocks of 32 tokens
    rows = {r["configuration"]: r for r in table["rows"]}
    koff_row, reference = rows["KOFF: learned mask + LoRA + KV"], rows["dense base + memories (LoRA + KV)"]
    assert set(koff_row["perplexity"]) == {"eng", "code", "eng@manual"}
    assert koff_row["transfer_mean_ratio"] == koff_row["ratio_to_dense"]["eng@manual"]
    assert table["price_of_offloading"]["eng@manual"] == pytest.approx(
        koff_row["perplexity"]["eng@manual"] / reference["perplexity"]["eng@manual"])
    # the memory is what scores the other source: the bare mask scores it differently
    assert rows["mask, no memories"]["perplexity"]["eng@manual"] != koff_row["perplexity"]["eng@manual"]
    text = (tmp_path / "t" / "table.md").read_text()
    assert "eng@manual" in text and "mean ratio, other source" in text and "Price of offloading" in text
    assert main(["eval", koff, "--transfer", f"deu={other}"]) == 2
    assert "'deu' is not a domain of the run" in capsys.readouterr().err
    # two held-out texts of one domain are two columns, each scored on its own text
    genre = tmp_path / "story" / "eng"
    genre.mkdir(parents=True)
    (genre / "tale.txt").write_text("once upon a time a fox ran into the wood and met an owl " * 40)
    assert main(["eval", koff, "--max-blocks", "2", "--transfer", f"eng={other}", "--transfer", f"eng={genre}",
                 "--transfer-max-blocks", "3", "--out", str(tmp_path / "t2")]) == 0
    two = json.loads((tmp_path / "t2" / "table.json").read_text())
    dense = two["rows"][0]["perplexity"]
    assert two["transfer"] == ["eng@manual", "eng@story"] and dense["eng@manual"] != dense["eng@story"]
    assert dense["eng@manual"] == pytest.approx(rows["dense base"]["perplexity"]["eng@manual"])
    assert "mean ratio, manual" in (tmp_path / "t2" / "table.md").read_text()


def test_eval_table_of_an_export_matches_the_run(tmp_path, corpus):
    model_dir = save_tiny(tmp_path / "model", "llama")
    run = decompose(model_dir, corpus, tmp_path / "koff")
    export_run(run, tmp_path / "export")
    assert main(["eval", run, "--max-blocks", "2", "--out", str(tmp_path / "run-table")]) == 0
    assert main(["eval", str(tmp_path / "export"), "--max-blocks", "2", "--out", str(tmp_path / "export-table")]) == 0
    by_run = {r["configuration"]: r["perplexity"] for r in json.loads((tmp_path / "run-table" / "table.json").read_text())["rows"]}
    by_export = {r["configuration"]: r["perplexity"] for r in json.loads((tmp_path / "export-table" / "table.json").read_text())["rows"]}
    for run_row, export_row in [("dense base", "dense base"), ("mask, no memories", "exported backbone, no memories"),
                                ("KOFF: learned mask + LoRA + KV", "exported backbone + memories")]:
        for domain, value in by_run[run_row].items():
            assert math.isclose(by_export[export_row][domain], value, rel_tol=1e-4), (run_row, domain)


def test_the_dense_base_is_scored_once_per_set_of_blocks_and_kept_between_tables(tmp_path, corpus, monkeypatch):
    model_dir = save_tiny(tmp_path / "model", "llama")
    run = decompose(model_dir, corpus, tmp_path / "koff")
    scored = []
    counting = lambda scorer, data, *args: scored.append(data.name) or domain_perplexity(scorer, data, *args)  # noqa: E731
    monkeypatch.setattr(score_cache, "domain_perplexity", counting)

    def table(name, *flags):
        assert main(["eval", run, "--out", str(tmp_path / name), *flags]) == 0
        return {r["configuration"]: r["perplexity"] for r in json.loads((tmp_path / name / "table.json").read_text())["rows"]}

    first = table("t1", "--max-blocks", "2")
    assert scored == ["eng", "code"]  # the dense base, once per domain
    again = table("t2", "--max-blocks", "2")
    assert scored == ["eng", "code"] and again == first  # kept: every row the same, the dense base read back
    table("t3", "--max-blocks", "3")
    assert scored == ["eng", "code"] * 2  # other blocks: scored afresh
    (Path(model_dir) / "config.json").touch()  # a model file rewritten: its scores are not reused
    table("t4", "--max-blocks", "2")
    assert scored == ["eng", "code"] * 3


def test_eval_table_refuses_runs_on_other_domains(tmp_path, corpus, capsys):
    model_dir = save_tiny(tmp_path / "model", "llama")
    koff = decompose(model_dir, corpus, tmp_path / "koff")
    other = decompose(model_dir, corpus, tmp_path / "other", domain=[f"deu={corpus['deu']}"])
    assert main(["eval", koff, other, "--max-blocks", "1", "--out", str(tmp_path / "t")]) == 2
    assert "same data" in capsys.readouterr().err


def test_sparsity_sweep_writes_numbers_and_plot(tmp_path, corpus):
    model_dir = save_tiny(tmp_path / "model", "llama")
    base = DecomposeConfig(model=model_dir, domain=[f"eng={corpus['eng']}", f"code={corpus['code']}"], block_len=32,
                           batch_size=2, kv_slots=4, steps=2, eval_max_blocks=1)
    result = run_sweep(base, [0.0, 0.3], tmp_path / "sweep")
    ratios = result["geomean_ratio_to_dense"]
    assert set(ratios) == {"KOFF", "mask, no memories", "one-shot mask + LoRA + KV", "prune, then LoRA",
                           "one-shot mask, no memories"}
    assert all(set(points) == {0.0, 0.3} for points in ratios.values())
    assert ratios["mask, no memories"][0.0] == 1.0  # no mask at 0%: the bare row is the dense base
    oneshot = Path(result["runs"][0.3]["oneshot_lora_kv"])  # the isolating row: same memories, one-shot mask
    config = yaml.safe_load((oneshot / "config.yaml").read_text())
    assert (config["mask"], config["memory"]) == ("oneshot:wanda", "lora+kv")
    budget = result["trainable_budget"][0.3]
    assert budget["prune_then_lora_parameters_per_domain"] >= budget["koff_memory_parameters_per_domain"]
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["sparsities"] == [0.0, 0.3]
    assert "| KOFF |" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_concurrent_sweep_reads_each_evaluation_its_process_wrote(tmp_path, corpus, monkeypatch):
    model_dir = save_tiny(tmp_path / "model", "llama")
    base = DecomposeConfig(model=model_dir, domain=[f"eng={corpus['eng']}", f"code={corpus['code']}"], block_len=32,
                           batch_size=2, kv_slots=4, steps=2, eval_max_blocks=1)
    trained = []
    monkeypatch.setattr(sweep_module, "train_concurrently", lambda configs, jobs: trained.extend(
        train_or_resume(c) for c in configs))  # what the processes leave: finished, evaluated runs

    def not_again(config):
        raise AssertionError(f"{config.out} was trained or evaluated a second time")

    monkeypatch.setattr(sweep_module, "train_or_resume", not_again)
    result = run_sweep(base, [0.3], tmp_path / "sweep", jobs=2)
    assert len(trained) == 3
    again = run_sweep(base, [0.3], tmp_path / "sweep", jobs=2)  # a rerun of a finished sweep reads it back
    assert again["geomean_ratio_to_dense"] == result["geomean_ratio_to_dense"]
    by_name = {Path(out).name: out for out in result["runs"][0.3].values()}
    for (_, summary), name in zip(trained, ("koff-s30", "oneshot-lora-kv-s30", "prune-then-lora-s30")):
        assert json.loads((Path(by_name[name]) / "summary.json").read_text())["eval"] == summary["eval"]
    budget = result["trainable_budget"][0.3]
    assert budget["koff_memory_parameters_per_domain"] == memory_parameters_per_domain(trained[0][0].model)
    assert budget["prune_then_lora_parameters_per_domain"] == memory_parameters_per_domain(trained[2][0].model)
