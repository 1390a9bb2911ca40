"""One decomposition as the CLI and the benchmarks run it: train (or resume), then evaluate the
result and record the evaluation in the run's summary.json."""

from __future__ import annotations

from pathlib import Path

from koff.config import DecomposeConfig
from koff.evaluation import DecompositionEval, evaluate_decomposition
from koff.formats import run as run_folder
from koff.training.trainer import Decomposer


def decompose(config: DecomposeConfig, resume: bool = False, evaluate_run: bool = True,
              **parts) -> tuple[Decomposer, dict]:
    """(the trained decomposer, its summary); with ``config.eval`` and ``evaluate_run`` the summary
    holds ``eval`` (a caller that scores the run more widely passes False and records it itself).
    ``parts`` go to ``Decomposer`` (``base``, ``tokenizer``, ``domains``: already loaded ones)."""
    decomposer = Decomposer(config, **parts)
    summary = decomposer.train(resume=resume)
    if config.eval and evaluate_run and decomposer.accelerator.is_main_process:
        summary = summary | {"eval": evaluate(decomposer).to_dict()}
        run_folder.write_summary(decomposer.out, summary)
    return decomposer, summary


def evaluate(decomposer: Decomposer) -> DecompositionEval:
    """The trained decomposer's model three ways: dense, with its memories, mask alone."""
    cfg = decomposer.config
    return evaluate_decomposition(decomposer.model, decomposer.domains, cfg.eval_batch_size, cfg.eval_max_blocks,
                                  decomposer.accelerator.device)


def train_or_resume(config: DecomposeConfig) -> tuple[Decomposer, dict]:
    """Train one run, continuing from its checkpoints if a previous attempt left some."""
    return decompose(config, resume=(Path(config.out) / run_folder.CHECKPOINTS).is_dir())
