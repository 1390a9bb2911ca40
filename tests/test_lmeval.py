"""Downstream tasks through lm-evaluation-harness on tiny local tasks (files made here, no network)."""

import json

import pytest

from koff.cli import main
from koff.export import export_run
from koff.runtime import load
from test_export import make_run

lm_eval = pytest.importorskip("lm_eval")

from koff.experiments.lmeval import koff_lm, run_tasks  # noqa: E402

TASKS = ["koff_tiny_mc", "koff_tiny_gen"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice and a generation task reading local JSON lines."""
    folder = tmp_path_factory.mktemp("tasks")
    mc = [{"question": f"the cat sat on the {w}", "choices": [" mat", " hill", " dog"], "answer": i % 3}
          for i, w in enumerate(["", "big", "old", "red", "soft", "green"])]
    gen = [{"prompt": p, "target": t} for p, t in [("def f(x):", " return"), ("the dog ran", " over"), ("der hund", " lief"),
                                                    ("for i in", " range")]]
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mc.yaml").write_text(f"""task: koff_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (folder / "gen.yaml").write_text(f"""task: koff_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")
    (folder / "offline.yaml").write_text("""task: koff_needs_the_hub
dataset_path: koff-tests/no-such-dataset
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return folder


def samples(result: dict, task: str) -> list:
    return [s["resps"] for s in result["samples"][task]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, task_dir):
    from tiny import write_corpus

    root = tmp_path_factory.mktemp("lmeval")
    corpus = write_corpus(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KOFF_CACHE_DIR", str(root / "koff-cache"))
        lora = export_run(make_run(root / "lora", corpus, "qwen2", memory="lora"), root / "lora-export", uniform=True)
        both = export_run(make_run(root / "both", corpus, "llama", memory="lora+kv"), root / "both-export", uniform=True)
    assert lora and both
    return {"lora": root / "lora-export", "lora+kv": root / "both-export"}


def harness_peft(export, memory, task_dir):
    """The harness's own ``hf`` model with ``peft=``: what koff must agree with where only LoRA is in play."""
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export / 'backbone'},peft={export / 'memories' / memory},"
                                   "dtype=float32", tasks=TASKS, task_manager=TaskManager(include_path=str(task_dir)),
                                   log_samples=True, bootstrap_iters=100, verbosity="WARNING", device="cpu")


def test_koff_equals_the_harness_hf_peft_model_for_a_lora_memory(exports, task_dir):
    ours = run_tasks(koff_lm(load(exports["lora"]), "eng"), TASKS, include_path=str(task_dir), log_samples=True)
    theirs = harness_peft(exports["lora"], "eng", task_dir)
    assert ours["results"]["koff_tiny_mc"]["acc,none"] == theirs["results"]["koff_tiny_mc"]["acc,none"]
    assert ours["results"]["koff_tiny_gen"]["exact_match,none"] == theirs["results"]["koff_tiny_gen"]["exact_match,none"]
    for a, b in zip(samples(ours, "koff_tiny_mc"), samples(theirs, "koff_tiny_mc")):
        assert [x[0][0] for x in a] == pytest.approx([x[0][0] for x in b], abs=1e-3)  # the loglikelihoods
    assert samples(ours, "koff_tiny_gen") == samples(theirs, "koff_tiny_gen")  # the generated text


def test_a_kv_memory_is_really_used(exports, task_dir):
    ours = run_tasks(koff_lm(load(exports["lora+kv"]), "eng"), TASKS[:1], include_path=str(task_dir), log_samples=True)
    lora_only = harness_peft(exports["lora+kv"], "eng", task_dir)
    mine = [x[0][0] for s in samples(ours, "koff_tiny_mc") for x in s]
    theirs = [x[0][0] for s in samples(lora_only, "koff_tiny_mc") for x in s]
    assert max(abs(a - b) for a, b in zip(mine, theirs)) > 1e-3


def test_cli_writes_one_table_and_refuses_tasks_without_local_data(exports, task_dir, capsys):
    export = exports["lora+kv"]
    argv = ["eval", str(export), "--tasks", ",".join(TASKS), "--memory", "eng", "--memory", "koff_tiny_gen=code",
            "--include-path", str(task_dir), "--limit", "3", "--out", str(export / "tasks")]
    assert main(argv) == 0
    table = (export / "tasks" / "tasks.md").read_text()
    assert "dense base" in table and "backbone, no memory" in table and "backbone + eng" in table and "backbone + code" in table
    assert json.loads((export / "tasks" / "tasks.json").read_text())[2]["memory"] == "code"
    capsys.readouterr()
    code = main(["eval", str(export), "--tasks", "koff_needs_the_hub", "--include-path", str(task_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "--include-path" in err.strip().splitlines()[-1]
    assert main(["eval", str(export), "--tasks", "no_such_task"]) == 2
