import json

import pytest
import torch
import yaml

from koff.cli import main
from koff.training.pipeline import decompose
from koff.masks import BinaryMask
from koff.scoring import chunked_losses
from koff.training import DecomposeConfig, Decomposer
from tiny import tiny_model


def settings(tmp_path, **overrides) -> DecomposeConfig:
    values = dict(model="tiny", out=str(tmp_path / "run"), block_len=32, batch_size=3, kv_slots=4, steps=12,
                  checkpoint_every=5, eval_max_blocks=2, eval=False)
    return DecomposeConfig(**(values | overrides))


def make(tmp_path, tokenizer, domains, kind="llama", **overrides) -> Decomposer:
    return Decomposer(settings(tmp_path, **overrides), base=tiny_model(kind), tokenizer=tokenizer, domains=domains)


def trained_state(dec: Decomposer) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in dec._trainable().items()}
    for i, per_param in dec.optimizer.state_dict()["state"].items():
        state |= {f"opt.{i}.{k}": v.clone() for k, v in per_param.items() if torch.is_tensor(v)}
    return state


def assert_same_end_state(whole: Decomposer, resumed: Decomposer) -> None:
    """A resumed run ended exactly where the uninterrupted one did (12 steps)."""
    assert resumed.step == whole.step == 12
    a, b = trained_state(whole), trained_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert whole.sampler.state_dict() == resumed.sampler.state_dict()


def test_expected_sparsity_converges_and_final_mask_meets_target(tmp_path, tokenizer, domains):
    # A random tiny model gives its gates almost no LM signal, so they move as one block: slow gate
    # and lambda rates keep the constraint from oscillating (the defaults are tuned on SmolLM2).
    dec = make(tmp_path, tokenizer, domains, sparsity=0.3, steps=400, checkpoint_every=400, prune_attention=False,
               constraint="lagrangian", lr_mask=0.1, lr_lambda=0.05, target_warmup=0.3, final_fraction=0.0,
               init_from="none", init_log_alpha=3.0, ffn_align=1)  # the controller alone, from identical gates
    dec.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert records[0]["expected_sparsity"] < 0.02
    late = [r["expected_sparsity"] for r in records[-20:]]
    assert all(abs(s - 0.3) < 0.05 for s in late), late
    mask = BinaryMask.load(tmp_path / "run" / "mask.safetensors")
    costs = dec.model.costs
    assert abs(mask.sparsity(costs) - 0.3) * costs.block_params <= costs.ffn_cost[0]
    assert all(m.all() for m in mask.attn)


def test_mask_shaped_init_starts_at_the_oneshot_mask(tmp_path, tokenizer, domains):
    learned = make(tmp_path, tokenizer, domains, sparsity=0.3, init_shape="mask", init_log_alpha=4.0)
    oneshot = make(tmp_path, tokenizer, domains, sparsity=0.3, mask="oneshot:wanda")
    start = learned.learned_mask.binarize(0.3)
    assert [m.tolist() for m in start.ffn] == [m.tolist() for m in oneshot.model.mask.ffn]
    assert [m.tolist() for m in start.attn] == [m.tolist() for m in oneshot.model.mask.attn]
    alphas = torch.cat([g.log_alpha for g in learned.learned_mask.ffn])
    assert set(alphas.tolist()) == {-4.0, 4.0}


def test_file_mask_trains_memories_on_another_runs_mask(tmp_path, tokenizer, domains):
    first = make(tmp_path, tokenizer, domains, sparsity=0.3, steps=4, out=str(tmp_path / "first"))
    first.train()
    reused = make(tmp_path, tokenizer, domains, mask=f"file:{tmp_path / 'first'}", memory="lora", steps=3,
                  out=str(tmp_path / "second"))
    assert reused.learned_mask is None
    reused.train()
    masks = [BinaryMask.load(tmp_path / name / "mask.safetensors") for name in ("first", "second")]
    assert [m.tolist() for m in masks[0].ffn] == [m.tolist() for m in masks[1].ffn]
    assert [m.tolist() for m in masks[0].attn] == [m.tolist() for m in masks[1].attn]
    with pytest.raises(FileNotFoundError, match="no such mask"):
        make(tmp_path, tokenizer, domains, mask=f"file:{tmp_path / 'nowhere.safetensors'}")
    config = DecomposeConfig(model="tiny", out=str(tmp_path / "third"), block_len=32, mask=f"file:{tmp_path / 'first'}")
    with pytest.raises(ValueError, match="another model"):
        Decomposer(config, base=tiny_model("llama", layers=3), tokenizer=tokenizer, domains=domains)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_projected_constraint_holds_the_target_at_every_step(tmp_path, tokenizer, domains, kind):
    dec = make(tmp_path, tokenizer, domains, kind, sparsity=0.3, steps=30, checkpoint_every=30, target_warmup=0.5,
               final_fraction=0.2)
    dec.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    ramp = [r for r in records if "expected_sparsity" in r]
    assert len(ramp) == 24  # the last 20% of steps train the memories on the frozen mask
    for r in ramp:
        assert abs(r["expected_sparsity"] - r["target"]) < 1e-3, r
    assert "lambda1" not in records[0]
    mask = BinaryMask.load(tmp_path / "run" / "mask.safetensors")
    assert abs(mask.sparsity(dec.model.costs) - 0.3) * dec.model.costs.block_params <= max(dec.model.costs.attn_cost)


def test_loss_goes_down(tmp_path, tokenizer, domains):
    dec = make(tmp_path, tokenizer, domains, sparsity=0.0, steps=40, checkpoint_every=40, lr_lora=1e-2)
    dec.train()
    losses = [json.loads(line)["lm"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


@pytest.mark.parametrize(("kill_at", "sampling"), [(7, "balanced"), (11, "balanced"), (7, "size:1")])
def test_killed_and_resumed_run_ends_in_the_same_state(tmp_path, tokenizer, domains, kill_at, sampling):
    # killed before (7) and after (11) the mask is frozen at step 10
    whole = make(tmp_path / "a", tokenizer, domains, sparsity=0.2, sampling=sampling)
    whole.train()
    killed = make(tmp_path / "b", tokenizer, domains, sparsity=0.2, sampling=sampling)
    assert killed.train(stop_after=kill_at) == {"stopped_at": kill_at}  # dies; last checkpoint at 5 or 10
    resumed = make(tmp_path / "b", tokenizer, domains, sparsity=0.2, sampling=sampling)
    resumed.train(resume=True)
    assert_same_end_state(whole, resumed)
    files = [p.suffix for p in (tmp_path / "b" / "run" / "checkpoints").rglob("*") if p.is_file()]
    assert set(files) <= {".safetensors", ".json"}  # no pickles
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # steps after the checkpoint were dropped from the log on resume
    assert resumed.mask_frozen and torch.equal(whole.final_mask().ffn[0], resumed.final_mask().ffn[0])


def test_final_phase_trains_memories_on_the_fixed_binary_mask(tmp_path, tokenizer, domains):
    dec = make(tmp_path, tokenizer, domains, sparsity=0.2, steps=10, final_fraction=0.3, checkpoint_every=10)
    for _ in range(7):
        dec.train_step()
    assert not dec.mask_frozen and dec.model.mask is dec.learned_mask
    gates = [g.log_alpha.detach().clone() for g in dec.learned_mask.ffn]
    memory = dec.model.memories["eng"].lora_B["0_q_proj"].detach().clone()
    for _ in range(3):
        info = dec.train_step()
    assert dec.mask_frozen and isinstance(dec.model.mask, BinaryMask)
    assert "expected_sparsity" not in info  # no constraint once the mask is fixed
    assert all(torch.equal(a, g.log_alpha) for a, g in zip(gates, dec.learned_mask.ffn))
    assert not torch.equal(memory, dec.model.memories["eng"].lora_B["0_q_proj"])
    assert abs(dec.model.mask.sparsity(dec.model.costs) - 0.2) * dec.model.costs.block_params <= max(dec.model.costs.attn_cost)


@pytest.mark.parametrize(
    "mask, memory",
    [("learned", "none"), ("oneshot:wanda", "lora"), ("oneshot:activation", "kv"), ("none", "lora+kv"), ("none", "none")],
)
def test_every_variant_runs_through_the_same_loop(tmp_path, tokenizer, domains, mask, memory):
    config = settings(tmp_path, mask=mask, memory=memory, sparsity=0.15, steps=2, eval=True, distill_every=1)
    _, summary = decompose(config, base=tiny_model("llama"), tokenizer=tokenizer, domains=domains)
    out = tmp_path / "run"
    assert (out / "mask.safetensors").is_file()
    expected_sparsity = 0.0 if mask == "none" else 0.15
    assert abs(summary["sparsity"] - expected_sparsity) < 0.1
    memories = sorted(p.name for p in (out / "memories").iterdir()) if (out / "memories").exists() else []
    assert memories == ([] if memory == "none" else ["code", "deu", "eng"])
    assert set(summary["eval"]) == ({"dense", "mask only"} if memory == "none" else {"dense", "mask+memories", "mask only"})
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(("kl" in r) == (mask != "none") for r in records)  # distillation only where something is pruned


def test_distill_every_k_steps_adds_the_teacher_on_those_steps_only(tmp_path, tokenizer, domains):
    dec = make(tmp_path, tokenizer, domains, sparsity=0.15, steps=7, distill_every=3)
    dec.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "kl" in r] == [1, 4, 7]  # steps 0, 3, 6 before they count


def test_the_teacher_is_the_dense_base_with_or_without_the_student_memories(tmp_path, tokenizer, domains):
    """--teacher base distils towards the dense base alone; base+memories towards the dense base
    with each sample's own memory (what the price of offloading compares KOFF against)."""
    kls = {}
    for teacher, setting in [("base", "dense"), ("base+memories", "unmasked")]:
        dec = make(tmp_path / teacher, tokenizer, domains, sparsity=0.2, mask="oneshot:wanda", teacher=teacher)
        torch.manual_seed(1)
        with torch.no_grad():  # memories that change the output (a fresh LoRA adds nothing)
            for p in dec.model.memories.parameters():
                p.add_(0.05 * torch.randn_like(p))
        batch, names = dec.sampler.next_batch(3)
        _, parts, _ = dec._loss(batch, names)
        with torch.no_grad():
            student = dec.model(batch, names, hidden=True)
            with getattr(dec.model, setting)():
                expected = dec.model(batch, names, hidden=True)
            _, kl = chunked_losses(student, dec.model.head, batch, expected)
        assert torch.allclose(parts["kl"], kl, rtol=1e-4), teacher
        kls[teacher] = kl
    assert not torch.allclose(kls["base"], kls["base+memories"], rtol=1e-2)


def test_unmasked_keeps_the_memories_and_dense_drops_them(tmp_path, tokenizer, domains):
    dec = make(tmp_path, tokenizer, domains, sparsity=0.2, mask="oneshot:wanda")
    model, batch, names = dec.model, domains[0].train[:2], [domains[0].name] * 2
    with torch.no_grad():
        for p in model.memories.parameters():
            p.add_(0.05 * torch.randn_like(p))
        with model.unmasked():
            unmasked = model(batch, names)
        mask = model.mask
        model.set_mask(None)
        assert torch.equal(unmasked, model(batch, names))
        model.set_mask(mask)
        with model.dense():
            assert torch.equal(model(batch, names), model(batch, None))
            with model.unmasked():  # inside dense(), the memories stay off
                assert torch.equal(model(batch, names), model(batch, None))
        assert not torch.equal(unmasked, model(batch, names))  # the mask is back on


@pytest.mark.parametrize("mask", ["learned", "oneshot:wanda"])
def test_final_masks_keep_ffn_widths_in_multiples_of_the_alignment(tmp_path, tokenizer, domains, mask):
    dec = make(tmp_path, tokenizer, domains, sparsity=0.2, steps=4, mask=mask, ffn_align=32)
    dec.train()
    final = BinaryMask.load(tmp_path / "run" / "mask.safetensors")
    assert all(int(m.sum()) % 32 == 0 for m in final.ffn) and any(not m.all() for m in final.ffn)


def test_bad_configs_are_refused():
    for bad, message in [
        (dict(mask="oneshot:nope"), "unknown one-shot importance"),
        (dict(mask="random"), "--mask must be"),
        (dict(memory="prefix"), "--memory must be"),
        (dict(sparsity=1.5), "sparsity"),
        (dict(prune_ffn=False, prune_attention=False), "nothing to prune"),
        (dict(distill_every=0), "distill_every"),
        (dict(teacher="student"), "--teacher must be one of"),
        (dict(sampling="size:big"), "--sampling must be"),
        (dict(sampling="size:-1"), "--sampling must be"),
        (dict(sampling="proportional"), "--sampling must be"),
        (dict(keep_outliers=-1), "--keep-outliers must be at least 0"),
        (dict(ffn_align=0), "--ffn-align must be at least 1"),
        (dict(keep_outliers=2, mask="oneshot:wanda"), "--keep-outliers holds gates of a learned mask open"),
    ]:
        with pytest.raises(ValueError, match=message):
            DecomposeConfig(**bad)


def test_keep_outliers_holds_the_massive_neuron_open_through_training_and_resume(tmp_path, tokenizer, domains):
    """Gates from no importance may close any neuron; --keep-outliers 1 keeps the one that dominates
    Wanda importance in the final mask, and a resumed run pins the same neuron again."""
    base = tiny_model("llama")
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[:, 7] *= 1000.0
    config = settings(tmp_path, init_from="none", keep_outliers=1, sparsity=0.3, steps=4, checkpoint_every=2)
    dec = Decomposer(config, base=base, tokenizer=tokenizer, domains=domains)
    assert dec.learned_mask.pinned.sum() == 1 and dec.learned_mask.gates()[0][1][7] == 1
    dec.train()
    assert BinaryMask.load(tmp_path / "run" / "mask.safetensors").ffn[1][7]
    resumed = Decomposer(config, base=base, tokenizer=tokenizer, domains=domains)
    assert torch.equal(resumed.learned_mask.pinned, dec.learned_mask.pinned)


@pytest.mark.parametrize("start, passes", [("wanda", 1), ("activation", 2), ("none", 1)])
def test_held_open_outliers_reuse_the_starts_wanda_calibration(tmp_path, tokenizer, domains, monkeypatch, start, passes):
    """Wanda importance is computed once whether it ranks the start, finds the outliers, or both."""
    from koff.masks import oneshot
    from koff.training import mask_init

    measures = []
    counted = oneshot.unit_importance

    def counting(model, layout, batches, importance):
        measures.append(importance)
        return counted(model, layout, batches, importance)

    for module in (oneshot, mask_init):  # every calibration pass, whichever module makes it
        monkeypatch.setattr(module, "unit_importance", counting)
    dec = make(tmp_path, tokenizer, domains, init_from=start, keep_outliers=2)
    assert len(measures) == passes and "wanda" in measures and dec.learned_mask.pinned.sum() == 2


def test_cli_decompose_writes_the_run_folder_and_resumes(tmp_path, corpus, capsys):
    from tiny import save_tiny

    model_dir = save_tiny(tmp_path / "model", "qwen2")
    out = tmp_path / "run"
    argv = ["decompose", "--model", model_dir, "--domain", f"eng={corpus['eng']}", "--domain", f"code={corpus['code']}",
            "--block-len", "32", "--steps", "4", "--batch-size", "2", "--kv-slots", "4", "--sparsity", "0.2",
            "--eval-max-blocks", "2", "--checkpoint-every", "2", "--out", str(out)]
    assert main(argv) == 0
    assert "mask+memories" in capsys.readouterr().out
    for name in ("config.yaml", "log.jsonl", "mask.safetensors", "mask.json", "summary.json",
                 "memories/eng/memory.safetensors", "memories/code/memory.json", "checkpoints/latest.json"):
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["sparsity"] == 0.2 and config["domain"][0].startswith("eng=")
    assert main(argv) == 2  # the folder holds a run: refuse to overwrite it
    assert "--resume" in capsys.readouterr().err
    assert main(["decompose", "--resume", "--out", str(out)]) == 0  # finished: resumes to the end at once
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_a_small_domain_seen_many_times_is_warned_about(tmp_path, tokenizer, domains, caplog):
    dec = make(tmp_path, tokenizer, domains, sparsity=0.15, steps=2, batch_size=3)
    blocks = {d.name: d.train.shape[0] for d in domains}
    with caplog.at_level("INFO", logger="koff.training.trainer"):
        dec._report_epochs()
    assert all(f"{name}: {n} training blocks, seen {2 / n:.1f} times" in caplog.text for name, n in blocks.items())
    assert "may overfit" not in caplog.text
    caplog.clear()
    dec.config.steps = 40 * max(blocks.values())
    with caplog.at_level("INFO", logger="koff.training.trainer"):
        dec._report_epochs()
    assert caplog.text.count("may overfit") == len(blocks)
