"""Independent runs trained side by side in their own processes (the GPU benchmarks' --jobs)."""

from dataclasses import replace

import pytest
import torch
import yaml

from koff.errors import KoffError
from koff.model import KoffModel
from koff.training import DecomposeConfig, Decomposer
from koff.training.pipeline import train_or_resume
from parallel_runs import PROCESS_LOG, finished, train_all, train_concurrently  # bench/
from sweep import equal_budget_rank  # bench/
from tiny import save_tiny, tiny_model


def config(model_dir, corpus, out, **kw) -> DecomposeConfig:
    return DecomposeConfig(model=str(model_dir), domain=[f"eng={corpus['eng']}", f"code={corpus['code']}"],
                           block_len=32, batch_size=2, kv_slots=4, steps=3, checkpoint_every=2, eval=False,
                           out=str(out), **kw)


def test_runs_in_processes_equal_the_same_runs_in_this_one(tmp_path, corpus):
    model_dir = save_tiny(tmp_path / "model", "llama")
    runs = [config(model_dir, corpus, tmp_path / "a", sparsity=0.2), config(model_dir, corpus, tmp_path / "b", seed=1)]
    train_concurrently(runs, jobs=2)
    assert all(finished(c) for c in runs)
    for run in runs:  # the same config trained in this process ends with the same memories
        again, _ = train_or_resume(replace(run, out=str(tmp_path / ("same-" + run.out[-1]))))
        theirs = Decomposer(run)
        theirs.train(resume=True)  # the process's final checkpoint: no steps left to take
        for name, memory in again.model.memories.items():
            for (key, mine), other in zip(memory.state_dict().items(), theirs.model.memories[name].state_dict().values()):
                torch.testing.assert_close(mine, other, msg=key)
    mtimes = [(tmp_path / x / "summary.json").stat().st_mtime_ns for x in "ab"]
    train_concurrently(runs, jobs=2)  # finished runs start no process
    train_all(runs)  # nor are they reloaded in this one
    assert [(tmp_path / x / "summary.json").stat().st_mtime_ns for x in "ab"] == mtimes


def test_train_all_in_this_process_trains_what_is_unfinished(tmp_path, corpus):
    model_dir = save_tiny(tmp_path / "model", "llama")
    runs = [config(model_dir, corpus, tmp_path / "a"), config(model_dir, corpus, tmp_path / "b", seed=1)]
    train_all(runs[:1])
    mtime = (tmp_path / "a" / "summary.json").stat().st_mtime_ns
    train_all(runs)
    assert all(finished(c) for c in runs)
    assert (tmp_path / "a" / "summary.json").stat().st_mtime_ns == mtime
    assert not (tmp_path / "b" / PROCESS_LOG).exists()  # jobs=1: no process was started


def test_a_run_made_before_a_setting_existed_is_still_finished(tmp_path, corpus):
    """config.yaml of an older koff lacks settings added since; at their defaults it is the same run."""
    model_dir = save_tiny(tmp_path / "model", "llama")
    run = config(model_dir, corpus, tmp_path / "a")
    train_all([run])
    stored = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    del stored["keep_outliers"]
    (tmp_path / "a" / "config.yaml").write_text(yaml.safe_dump(stored))
    assert finished(run)
    assert not finished(replace(run, keep_outliers=2))  # a setting away from its default is another run
    (tmp_path / "a" / "config.yaml").write_text(yaml.safe_dump(stored | {"no_such_setting": 1}))
    assert not finished(run)


def test_a_failing_run_is_named_with_its_log(tmp_path, corpus):
    model_dir = save_tiny(tmp_path / "model", "llama")
    bad = replace(config(model_dir, corpus, tmp_path / "bad"), domain=[f"eng={tmp_path / 'missing.txt'}"])
    with pytest.raises(KoffError, match="1 of 1 runs failed.*bad"):
        train_concurrently([bad], jobs=2)
    assert "missing.txt" in (tmp_path / "bad" / PROCESS_LOG).read_text()


def test_equal_budget_rank_from_shapes_matches_a_built_model(tmp_path):
    model_dir = save_tiny(tmp_path / "model", "qwen2")
    cfg = DecomposeConfig(model=str(model_dir), kv_slots=4, lora_rank=4)
    model = KoffModel(tiny_model("qwen2"), cfg.memory_config())
    memory = model.new_memory("eng", torch.zeros(4, dtype=torch.long))
    per_rank = sum(p.numel() for p in memory.lora_parameters()) / memory.rank
    rank = equal_budget_rank(cfg)
    assert rank * per_rank >= memory.num_parameters() > (rank - 1) * per_rank
