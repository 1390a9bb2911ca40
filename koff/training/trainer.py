"""The decomposition loop: one shared mask and every domain's memory, trained together.

One loop serves every variant (``--mask learned|oneshot:<importance>|none`` x ``--memory
lora+kv|lora|kv|none``), so ablations and baselines come from the same code. The loop runs under
``accelerate`` (one process here; ``accelerate launch`` for data parallel).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from tqdm.auto import tqdm

from koff.config import DecomposeConfig, parse_sampling
from koff.data import DomainData, load_domains, parse_domains
from koff.errors import KoffError
from koff.formats import run as run_folder
from koff.io import remove_leftovers, write_text, write_yaml
from koff.locks import folder_lock
from koff.masks import BinaryMask, LearnedMask, SparsityConstraint, target_schedule
from koff.model import KoffModel
from koff.models import load_model
from koff.plan import GiB, plan_decomposition
from koff.scoring import chunked_losses
from koff.training.checkpoint import TrainingState
from koff.training.mask_init import initial_mask
from koff.training.sampler import DomainSampler

log = logging.getLogger(__name__)

# Past this many passes over a domain's corpus, its memory overfits: on SmolLM2, Python's 23 blocks
# seen 87 times each gave a training loss of 0.5 and held-out perplexity 1.10x dense.
MANY_EPOCHS = 30


class TrainingError(KoffError, RuntimeError):
    """A run that cannot go on or cannot be trusted."""


class Decomposer:
    """Builds the model, data and optimisers of one run; ``train()`` runs (or resumes) it."""

    def __init__(self, config: DecomposeConfig, base=None, tokenizer=None, domains: list[DomainData] | None = None):
        self.config = cfg = config
        self.out = Path(cfg.out)
        self.accelerator = Accelerator(
            cpu=cfg.device == "cpu", kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
        )
        if base is None:
            loaded = load_model(cfg.model, dtype=cfg.dtype, device=str(self.accelerator.device))
            base, tokenizer = loaded.model, loaded.tokenizer
        self.tokenizer = tokenizer
        self.domains = domains or load_domains(
            parse_domains(cfg.domain), tokenizer, block_len=cfg.block_len, val_fraction=cfg.val_fraction, seed=cfg.seed
        )
        torch.manual_seed(cfg.seed)
        memory_config = cfg.memory_config()
        self.model = KoffModel(base, memory_config)
        self.model.gradient_checkpointing = self._wants_checkpointing(len(self.domains))
        self.model.set_mask(initial_mask(cfg, self.model, self.domains))
        # The learned gates, kept here too: once the mask is frozen (the last ``final_fraction`` of
        # steps) the model holds the binary mask instead, but checkpoints still carry the gates.
        self.learned_mask = self.model.mask if isinstance(self.model.mask, LearnedMask) else None
        self.mask_frozen = False
        if memory_config.kind != "none":
            for d in self.domains:
                self.model.new_memory(d.name, d.train[0])
        # Under `accelerate launch` this wraps the model in DistributedDataParallel (gradients are
        # all-reduced in backward); in one process it is the model itself.
        self.forward_model = self.accelerator.prepare_model(self.model)
        self.constraint = SparsityConstraint()
        self.sampler = DomainSampler(
            self.domains, cfg.seed, self.accelerator.process_index, self.accelerator.num_processes,
            parse_sampling(cfg.sampling),
        )
        self.optimizer, self.lambda_optimizer = self._optimizers()
        self.scheduler = self._schedule()
        self.step = 0

    # ----- set-up -------------------------------------------------------------------------------
    def _wants_checkpointing(self, domains: int) -> bool:
        """``auto``: on where ``koff plan`` says the run would not fit this GPU without it."""
        choice = self.config.gradient_checkpointing
        device = self.accelerator.device
        if choice != "auto" or device.type != "cuda":
            return choice == "on"
        gpu_gb = torch.cuda.get_device_properties(device).total_memory / GiB
        plan = plan_decomposition(self.model.base.config, self.config, domains, self.accelerator.num_processes,
                                  gpu_gb, str(device))
        log.info("koff plan: peak %.1f GiB without gradient checkpointing, %.1f GiB with it, on a %.0f GiB GPU",
                 plan.training_without_checkpointing / GiB, plan.training_with_checkpointing / GiB, gpu_gb)
        return plan.checkpointing

    @property
    def learned(self) -> bool:
        return self.config.mask_spec.learned and self.config.sparsity > 0

    @property
    def gates_training(self) -> bool:
        """The learned gates are still moving (not yet frozen into the final binary mask)."""
        return self.learned and not self.mask_frozen

    @property
    def lagrangian(self) -> bool:
        return self.learned and self.config.constraint == "lagrangian"

    def _optimizers(self):
        """AdamW over LoRA, KV and gate parameters (each its own learning rate); SGD ascent on lambdas."""
        cfg = self.config
        memories = list(self.model.memories.values())
        groups = [
            {"params": [p for m in memories for p in m.lora_parameters()], "lr": cfg.lr_lora, "name": "lora"},
            {"params": [p for m in memories for p in m.prefix_parameters()], "lr": cfg.lr_kv, "name": "kv"},
        ]
        if self.learned:
            groups.append({"params": list(self.learned_mask.parameters()), "lr": cfg.lr_mask, "name": "mask"})
        groups = [g for g in groups if g["params"]]
        if not groups:
            return None, None
        # One multi-tensor update for every parameter (fused on a GPU): the per-tensor loop costs a
        # host synchronisation per parameter, thousands per step at 30 layers x 7 LoRA targets x domains.
        fused = self.accelerator.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.95), fused=fused, foreach=not fused)
        # Plain SGD ascent: each lambda moves in proportion to the constraint gap (integral control),
        # which settles at the target; Adam would move it by +-lr whatever the gap and overshoot.
        lambdas = torch.optim.SGD(self.constraint.parameters(), lr=cfg.lr_lambda, maximize=True) if self.lagrangian else None
        return optimizer, lambdas

    def _schedule(self):
        """Memories warm up then decay (cosine); gates keep a constant rate."""
        if self.optimizer is None:
            return None
        factors = [(lambda _: 1.0) if g["name"] == "mask" else self._memory_lr_factor for g in self.optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factors)

    def _memory_lr_factor(self, step: int) -> float:
        cfg = self.config
        warmup = max(1, round(cfg.lr_warmup * cfg.steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine to 10%

    # ----- one step -----------------------------------------------------------------------------
    def _loss(self, batch: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The step's loss, its parts as detached 0-d tensors (read once per step, so that a step
        waits on the device once), and each sample's mean LM loss."""
        cfg = self.config
        domains = names if self.model.memory_config.kind != "none" else None
        target = target_schedule(self.step, cfg.steps, cfg.sparsity, cfg.target_warmup)
        if self.gates_training and not self.lagrangian:
            self.learned_mask.project_(target)
        hidden = self.forward_model(batch, domains, hidden=True)
        teacher = None
        if self._distilling():
            with torch.no_grad(), self._teacher():
                teacher = self.model(batch, domains, hidden=True)
        token_loss, kl = chunked_losses(hidden, self.model.head, batch, teacher, cfg.loss_chunk_tokens)
        loss = token_loss.mean()
        parts = {"lm": loss.detach()}
        if kl is not None:
            loss = loss + cfg.distill_weight * cfg.distill_every * kl
            parts["kl"] = kl.detach()
        if self.gates_training:
            expected = self.learned_mask.expected_sparsity()
            parts |= {"expected_sparsity": expected.detach(), "target": torch.tensor(target)}
            if self.lagrangian:
                lagrangian = self.constraint(expected, target)
                loss = loss + lagrangian
                parts["lagrangian"] = lagrangian.detach()
        return loss, parts, token_loss.detach().mean(1)

    def _teacher(self):
        """Inside, the model is the teacher: the dense base, with the student's memories or without."""
        return self.model.unmasked() if self.config.teacher_holds_memories else self.model.dense()

    def _distilling(self) -> bool:
        """Whether this step adds the KL to the dense teacher. Never unpruned: the teacher would be
        the student's own base, pulling the memories towards doing nothing (or the student itself)."""
        cfg = self.config
        return cfg.distill_weight > 0 and self.model.mask is not None and self.step % cfg.distill_every == 0

    @property
    def freeze_step(self) -> int:
        """From this step on, the final binary mask is fixed and only the memories train."""
        return round(self.config.steps * (1 - self.config.final_fraction))

    def _freeze_mask_if_due(self) -> None:
        if self.gates_training and self.step >= self.freeze_step:
            self.model.set_mask(self.final_mask())
            self.mask_frozen = True
            log.info("step %d: mask frozen at sparsity %.4f; memories adapt to it", self.step, self.config.sparsity)

    def train_step(self) -> dict:
        cfg = self.config
        self._freeze_mask_if_due()
        self.model.train()
        self.model.base.eval()  # the base stays in eval mode (no dropout); only the gates sample
        parts: dict[str, torch.Tensor] = {}
        sample_losses, sample_names = [], []
        for _ in range(cfg.grad_accum):
            batch, names = self.sampler.next_batch(cfg.batch_size)
            loss, micro, per_sample = self._loss(batch.to(self.accelerator.device), names)
            self.accelerator.backward(loss / cfg.grad_accum)
            for key, value in micro.items():
                parts[key] = parts.get(key, 0.0) + value.to(loss.device, torch.float32) / cfg.grad_accum
            sample_losses.append(per_sample)
            sample_names += names
        totals = _read_step(parts, torch.cat(sample_losses), sample_names)
        if self.optimizer is not None:
            trainable = [p for g in self.optimizer.param_groups if g.get("name") != "mask" for p in g["params"]]
            if trainable and cfg.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.gates_training:
            self.learned_mask.clamp_()
        if self.lambda_optimizer is not None and self.gates_training:
            self.lambda_optimizer.step()
            self.lambda_optimizer.zero_grad(set_to_none=True)
            totals |= {"lambda1": self.constraint.lambda1.item(), "lambda2": self.constraint.lambda2.item()}
        self.step += 1
        return totals

    # ----- the run ------------------------------------------------------------------------------
    def train(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train to ``config.steps`` (resuming from the latest checkpoint if asked), then write the run folder.

        ``stop_after`` ends the process early, as a kill would, right after that step (tests use it).
        The main process holds the run folder's lock throughout: a second run on the same folder is refused.
        """
        main = self.accelerator.is_main_process
        with folder_lock(self.out, "koff decompose") if main else nullcontext():
            return self._train(resume, stop_after)

    def _train(self, resume: bool, stop_after: int | None) -> dict:
        cfg = self.config
        main = self.accelerator.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.out, ".*.tmp")  # files a killed run was writing
            write_yaml(self.out / run_folder.CONFIG, cfg.to_dict())
        resumed = resume and self._resume()
        if resumed:
            log.info("resumed %s at step %d", self.out, self.step)
        if main and not resumed:
            self._report_epochs()
        if main:
            self._trim_log(self.step if resumed else 0)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_len * self.accelerator.num_processes
        trained_seconds, start_step = 0.0, self.step
        bar = tqdm(total=cfg.steps, initial=self.step, desc="decompose", disable=not main)
        log_file = (self.out / run_folder.LOG).open("a") if main else None
        try:
            while self.step < cfg.steps and (self.optimizer is not None):
                self._freeze_mask_if_due()
                if self.mask_frozen and not self.model.memories:
                    log.info("step %d: mask frozen and no memories: nothing left to train", self.step)
                    break
                t0 = time.perf_counter()
                info = self.train_step()
                dt = time.perf_counter() - t0
                trained_seconds += dt
                record = {"step": self.step, "seconds": round(dt, 3), "tokens_per_s": round(tokens_per_step / dt, 1), **info}
                if log_file and self.step % cfg.log_every == 0:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                bar.set_postfix(_postfix(info))
                bar.update(1)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self._checkpoint()
                if stop_after is not None and self.step >= stop_after:
                    return {"stopped_at": self.step}
        finally:
            bar.close()
            if log_file:
                log_file.close()
        steps_run = self.step - start_step
        summary = {
            "steps": self.step,
            "train_seconds_this_process": round(trained_seconds, 1),
            "seconds_per_step": round(trained_seconds / steps_run, 3) if steps_run else None,
            "tokens_per_s": round(tokens_per_step * steps_run / trained_seconds, 1) if steps_run else None,
        }
        if self.accelerator.num_processes > 1:
            self._check_ranks_agree()
        return self.finish(summary) if main else summary

    def _check_ranks_agree(self) -> None:
        """Every process must end with the same mask and memories (data parallel averages the
        gradients, so the updates are identical); refuse to write a run where they drifted."""
        mask = self.final_mask()
        state = [torch.cat([k.flatten().float() for k in (*mask.ffn, *mask.attn)]).to(self.accelerator.device)]
        state += [p.detach().double().sum().view(1).to(self.accelerator.device) for p in self._trainable().values()]
        mine = torch.cat([t.double() for t in state])
        everyone = self.accelerator.gather(mine[None])
        if not bool((everyone == everyone[0]).all()):
            raise TrainingError("the processes ended with different masks or memories; the run was not written")
        log.info("all %d processes hold the same mask and memories", self.accelerator.num_processes)

    def _report_epochs(self) -> None:
        """How often the run will show each domain its corpus; warn where a memory may overfit."""
        cfg = self.config
        samples = cfg.steps * cfg.batch_size * cfg.grad_accum * self.accelerator.num_processes
        for domain, share in zip(self.domains, self.sampler.shares):
            epochs = samples * share / domain.train.shape[0]
            log.info("%s: %d training blocks, seen %.1f times each over the run", domain.name, domain.train.shape[0], epochs)
            if epochs > MANY_EPOCHS:
                log.warning("%s: its %d blocks will be seen %.0f times each; its memory may overfit. A larger "
                            "corpus, fewer steps or --sampling size:0.5 (fewer samples of small domains) helps",
                            domain.name, domain.train.shape[0], epochs)

    def final_mask(self) -> BinaryMask:
        if self.learned_mask is not None:
            return self.learned_mask.binarize(self.config.sparsity, uniform=self.config.uniform_layers,
                                              ffn_align=self.config.ffn_align)
        mask = self.model.mask
        return mask if mask is not None else BinaryMask.dense(self.model.costs)

    def data_record(self, name: str) -> dict:
        """What domain ``name``'s memory was trained on, for its manifest: the text's summary and the
        split that set its training blocks apart (so a router counted later sees the same blocks)."""
        domain = next(d for d in self.domains if d.name == name)
        return domain.summary() | {"val_fraction": self.config.val_fraction, "seed": self.config.seed}

    def finish(self, summary: dict) -> dict:
        """Write the final binary mask and each memory into the run folder; the model keeps the mask."""
        cfg = self.config
        mask = self.final_mask()
        extras = {name: {"data": self.data_record(name), "memory_kind": cfg.memory} for name in self.model.memories}
        summary = run_folder.write_outputs(self.out, mask, self.model.costs, dict(self.model.memories), extras, summary)
        self.model.set_mask(mask)
        return summary

    def _trim_log(self, step: int) -> None:
        """Keep only log records up to ``step``: those after the checkpoint will be written again."""
        path = self.out / run_folder.LOG
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        write_text(path, "".join(line + "\n" for line in kept))

    # ----- checkpoints --------------------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.Tensor]:
        named = {f"memories.{k}": p for k, p in self.model.memories.named_parameters()}
        if self.learned_mask is not None:
            named |= {f"mask.{k}": p for k, p in self.learned_mask.named_parameters()}
        named |= {f"constraint.{k}": p for k, p in self.constraint.named_parameters()}
        return named

    def _state(self) -> TrainingState:
        optimizers = {"optimizer": self.optimizer, "lambda_optimizer": self.lambda_optimizer}
        return TrainingState(self._trainable(), optimizers, self.scheduler, self.sampler, self.accelerator.device)

    def _checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            self._state().save(self.out / run_folder.CHECKPOINTS, self.step)

    def _resume(self) -> bool:
        step = self._state().restore(self.out / run_folder.CHECKPOINTS)
        if step is None:
            log.warning("no checkpoint in %s; starting from step 0", self.out)
            return False
        self.step = step
        self._freeze_mask_if_due()
        return True


def _read_step(parts: dict[str, torch.Tensor], sample_losses: torch.Tensor, names: list[str]) -> dict:
    """The step's numbers as floats, with each domain's mean loss: one read from the device."""
    values = torch.cat([torch.stack(list(parts.values())), sample_losses.float()]).tolist()
    totals = dict(zip(parts, values))
    per_domain: dict[str, list[float]] = {}
    for name, value in zip(names, values[len(parts):]):
        per_domain.setdefault(name, []).append(value)
    totals["domain_loss"] = {name: sum(v) / len(v) for name, v in per_domain.items()}
    return totals


def _postfix(info: dict) -> dict:
    keys = {"lm": "loss", "expected_sparsity": "sparsity", "target": "target", "lambda1": "l1", "lambda2": "l2"}
    return {short: f"{info[k]:.3f}" for k, short in keys.items() if k in info}
