"""Data parallel through ``accelerate launch``: two CPU processes (gloo), as several GPUs would run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from koff.cli import main
from koff.masks import BinaryMask
from tiny import save_tiny

ACCELERATE = Path(sys.executable).with_name("accelerate")
pytestmark = pytest.mark.skipif(not ACCELERATE.exists(), reason="needs the accelerate launcher")


def flags(tmp_path, corpus, out: Path, batch_size: int) -> list[str]:
    domains = [f"--domain={name}={path}" for name, path in sorted(corpus.items())]
    return ["decompose", "--model", str(tmp_path / "model"), *domains, "--out", str(out), "--steps", "6",
            "--batch-size", str(batch_size), "--block-len", "32", "--kv-slots", "4", "--checkpoint-every", "3",
            "--sparsity", "0.2", "--no-eval", "--lr-lora", "0.01", "--device", "cpu"]


def launch(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    # --multi_gpu takes accelerate's torchrun path; with koff's --device cpu the processes talk over gloo
    # (accelerate's own --cpu launch of several processes needs mpirun)
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "koff", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def memories(run: Path) -> dict[str, torch.Tensor]:
    return {f"{m.name}/{k}": v for m in sorted((run / "memories").iterdir()) for k, v in
            load_file(next(m.glob("*.safetensors"))).items()}


def test_two_processes_agree_meet_the_target_resume_and_match_one_process(tmp_path, corpus):
    save_tiny(tmp_path / "model")
    two = tmp_path / "two"
    done = launch(flags(tmp_path, corpus, two, batch_size=2))
    assert "all 2 processes hold the same mask and memories" in done.stderr
    mask = BinaryMask.load(two / "mask.safetensors")
    assert json.loads((two / "summary.json").read_text())["sparsity"] == pytest.approx(0.2, abs=0.01)

    # one process with the same global batch (2 x 2) computes the same run, to float rounding
    one = tmp_path / "one"
    assert main(flags(tmp_path, corpus, one, batch_size=4)) == 0
    assert all(torch.equal(a, b) for a, b in zip(mask.ffn + mask.attn, BinaryMask.load(one / "mask.safetensors").ffn
                                                  + BinaryMask.load(one / "mask.safetensors").attn))
    parallel, single = memories(two), memories(one)
    assert parallel.keys() == single.keys()
    for key in parallel:
        torch.testing.assert_close(parallel[key], single[key], atol=2e-5, rtol=1e-4, msg=key)

    # killed after step 3 (the step-6 checkpoint never finished): resumes in two processes to the same end
    killed = tmp_path / "killed"
    shutil.copytree(two, killed)
    (killed / "checkpoints" / "step-000006" / "tensors.safetensors").write_bytes(b"truncated")
    for name in ("mask.safetensors", "summary.json"):
        (killed / name).unlink()
    done = launch(flags(tmp_path, corpus, killed, batch_size=2) + ["--resume"])
    assert "step 3" in done.stderr or "step-000003" in done.stderr
    resumed = memories(killed)
    assert all(torch.equal(resumed[k], parallel[k]) for k in parallel)
    assert all(torch.equal(a, b) for a, b in zip(mask.ffn, BinaryMask.load(killed / "mask.safetensors").ffn))
