"""The one trainer every stage uses: a step loop over (model, objective, batch source).

Design points:
- The loss is computed inside `LossModule.forward`, so DDP/FSDP/compile wrap a single forward.
- Batches are a function of the step, so resume needs only the step and the RNG/optimizer state.
- No host-device sync on steps that do not log: loss and grad-norm stay on device until then.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from llmtrain.config.schema import RunConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.distributed import DistInfo, all_reduce_sum
from llmtrain.distributed.wrap import wrap_model
from llmtrain.errors import UserError
from llmtrain.objectives import Objective
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.device import autocast, peak_flops
from llmtrain.train.optim import build_optimizer, build_scheduler
from llmtrain.train.tracking import MetricsLogger


class LossModule(torch.nn.Module):
    """model + objective as one module, so wrappers see the whole loss computation."""

    def __init__(self, model: torch.nn.Module, objective: Objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, torch.Tensor]):
        out = self.objective.loss(self.model, batch)
        return out.loss, out.n_targets, out.extras


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    interrupted: bool = False


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: RunConfig, model: torch.nn.Module, objective: Objective,
                 splits: TokenSplits, run_dir: Path, device: torch.device, precision: str,
                 dist: DistInfo, logger: MetricsLogger, meta: dict[str, Any],
                 trainable: Callable[[torch.nn.Module], None] | None = None):
        self.cfg, self.tc = cfg, cfg.trainer
        self.model, self.objective, self.splits = model, objective, splits
        self.run_dir, self.device, self.precision, self.dist = run_dir, device, precision, dist
        self.logger, self.meta = logger, meta
        self.ckpt_root = run_dir / "checkpoints"
        self.loss_module = wrap_model(LossModule(model, objective), cfg.trainer, device, precision, dist)
        self.optimizer = build_optimizer(model, cfg.optim, device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, self.tc.max_steps)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.source = objective.train_source(splits, cfg.data, self.tc.seed, dist.rank, dist.world_size)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * self.tc.grad_accum * dist.world_size
        flops = getattr(model, "flops_per_token", None)
        self.flops_per_token = flops(cfg.data.seq_len) if flops else None
        self.peak = peak_flops(device)
        self.step = 0
        self.best_val = math.inf
        self._stop_signal: int | None = None

    # ----------------------------------------------------------------- state
    def train_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "best_val": self.best_val,
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save(self, metrics: dict[str, float] | None = None) -> Path | None:
        if self.dist.rank != 0:
            return None
        meta = {**self.meta, "metrics": metrics or {}}
        return ckpt.save_checkpoint(self.ckpt_root, self.step, self.model, meta, self.train_state(),
                                    keep_last=self.tc.keep_last)

    def maybe_resume(self) -> None:
        if self.tc.resume == "never":
            return
        if self.tc.resume != "auto":
            raise UserError(f"trainer.resume must be 'never' or 'auto', got {self.tc.resume!r}")
        found = ckpt.list_checkpoints(self.ckpt_root)
        if not found:
            return
        path = found[-1]
        ckpt.load_meta(path)
        ckpt.load_model_state(self.model, ckpt.load_weights(path), path)
        state = ckpt.load_train_state(path)
        if state is None:
            raise UserError(f"checkpoint {path} has no training state to resume from")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_val = int(state["step"]), float(state["best_val"])
        if self.dist.rank == 0:
            _truncate_metrics(self.logger.path, self.step)
            tqdm.write(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.loss_module.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        extras: dict[str, torch.Tensor] = {}
        batches = self.objective.val_batches(self.splits, self.cfg.data, self.tc.eval_batches,
                                             self.dist.rank, self.dist.world_size, self.tc.seed)
        for batch in batches:
            with autocast(self.device, self.precision):
                loss, n, ex = self.loss_module(move(batch, self.device))
            total += loss.double() * n
            count += n
            for k, (s, c) in ex.items():
                acc = extras.setdefault(k, torch.zeros(2, dtype=torch.float64, device=self.device))
                acc += torch.stack([s.double(), c.double()])
        self.loss_module.train()
        all_reduce_sum(total), all_reduce_sum(count)
        if count.item() == 0:
            return {}
        val_loss = (total / count).item()
        out = {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 700.0))}
        for k, acc in extras.items():
            s, c = all_reduce_sum(acc).tolist()
            out[f"val/{k}"] = s / max(c, 1.0)
        return out

    # ----------------------------------------------------------------- train
    def fit(self) -> TrainResult:
        tc = self.tc
        self.maybe_resume()
        main = self.dist.rank == 0
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not (main and tc.progress),
                   desc=self.cfg.stage, dynamic_ncols=True, leave=True)
        old_handlers = self._install_signal_handlers()
        params = [p for p in self.model.parameters() if p.requires_grad]
        bad_run = torch.zeros((), device=self.device)  # consecutive non-finite steps
        loss_acc = torch.zeros((), device=self.device)
        last_val: dict[str, float] = {}
        t_last, steps_since = time.perf_counter(), 0
        interrupted = False
        self.loss_module.train()
        try:
            while self.step < tc.max_steps:
                loss_step = torch.zeros((), device=self.device)
                for micro in range(tc.grad_accum):
                    batch = move(self.source.batch(self.step * tc.grad_accum + micro), self.device)
                    sync = micro == tc.grad_accum - 1
                    with _no_sync(self.loss_module, sync), autocast(self.device, self.precision):
                        loss, _, _ = self.loss_module(batch)
                    scaled = loss / tc.grad_accum
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                    loss_step += scaled.detach()
                grad_norm = self._step_optimizer(params, loss_step, bad_run)
                loss_acc += loss_step
                self.step += 1
                steps_since += 1
                bar.update(1)

                is_last = self.step == tc.max_steps
                if self.step % tc.log_every == 0 or is_last:
                    self._check_bad_steps(bad_run)
                    all_reduce_sum(loss_acc)
                    mean_loss = loss_acc.item() / (steps_since * self.dist.world_size)
                    elapsed = time.perf_counter() - t_last
                    tps = steps_since * self.tokens_per_step / max(elapsed, 1e-9)
                    metrics = {
                        "train/loss": mean_loss,
                        "train/lr": self.scheduler.get_last_lr()[0],
                        "train/grad_norm": float(grad_norm),
                        "train/tokens_per_s": tps,
                        "train/tokens": self.step * self.tokens_per_step,
                        "train/step_time_ms": 1000 * elapsed / steps_since,
                    }
                    if self.peak and self.flops_per_token:
                        metrics["train/mfu"] = tps * self.flops_per_token / (self.peak * self.dist.world_size)
                    if self.device.type == "cuda":
                        metrics["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
                    self.logger.log(metrics, self.step)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{metrics['train/lr']:.2e}",
                                    tok_s=f"{tps:,.0f}", refresh=False)
                    loss_acc.zero_()
                    t_last, steps_since = time.perf_counter(), 0

                if (tc.eval_every > 0 and self.step % tc.eval_every == 0) or is_last:
                    last_val = self.evaluate()
                    if last_val:
                        self.logger.log(last_val, self.step)
                        bar.write(f"step {self.step}: val/loss {last_val['val/loss']:.4f}")
                        self.best_val = min(self.best_val, last_val["val/loss"])
                    t_last = time.perf_counter()  # evaluation time is not training throughput

                if self._stop_signal is not None:
                    interrupted = True
                    break
                if tc.ckpt_every > 0 and self.step % tc.ckpt_every == 0 and not is_last:
                    self.save(last_val)
        finally:
            bar.close()
            self._restore_signal_handlers(old_handlers)
        path = self.save(last_val)
        if interrupted and main:
            print(f"stopped by signal at step {self.step}; checkpoint saved to {path} "
                  f"(continue with trainer.resume=auto hydra.run.dir={self.run_dir})", flush=True)
        return TrainResult(step=self.step, metrics=last_val, checkpoint=path, interrupted=interrupted)

    def _step_optimizer(self, params, loss_step: torch.Tensor, bad_run: torch.Tensor) -> torch.Tensor:
        clip = self.cfg.optim.grad_clip
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        finite = torch.isfinite(loss_step) & torch.isfinite(grad_norm)
        if self.scaler is not None:  # the scaler skips non-finite steps itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.device.type == "cuda" and self.optimizer.defaults.get("fused"):
            # The fused kernel skips the update on device when found_inf is set: no host sync.
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        elif bool(finite):  # on CPU reading a flag costs nothing
            self.optimizer.step()
        bad_run.mul_(~finite).add_((~finite).float())
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def _check_bad_steps(self, bad_run: torch.Tensor) -> None:
        n = int(bad_run.item())
        if n >= self.tc.max_bad_steps:
            raise UserError(
                f"{n} consecutive steps with non-finite loss or gradients at step {self.step} "
                f"(trainer.max_bad_steps={self.tc.max_bad_steps}); last good checkpoint kept in {self.ckpt_root}"
            )

    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._stop_signal = signum

        old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    def _restore_signal_handlers(self, old) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)


def _no_sync(module: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on non-final micro-steps."""
    import contextlib

    if not sync and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` by the interrupted run, so the log reads as one run."""
    import json
    import os

    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
