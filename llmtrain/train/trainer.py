"""The one trainer every stage uses: a step loop over (model, trainee, batch source); the trainee
is an objective or a task (the Trainee contract, llmtrain/objectives/base.py).

Design points:
- The loss is computed inside `LossModule.forward`, so DDP/FSDP/compile wrap a single forward.
- Batches are a function of the step, so resume needs only the step and the RNG/optimizer state.
- No host-device sync on steps that do not log: loss and grad-norm stay on device until then.
- Global batch rule: micro-batch `micro` of optimizer step `step` on rank `rank` is the source's
  batch(step * grad_accum + micro) for that rank, i.e. global window index
  ((step * grad_accum + micro) * world_size + rank) * batch_size + i. Each optimizer step therefore
  consumes the contiguous windows [step * A * W * B, (step + 1) * A * W * B): the same samples for any
  grad_accum A and world size W with the same product, so 2 GPUs x accum 1 == 1 GPU x accum 2.
- Checkpoints have one format for every strategy (full safetensors weights + train_state.pt);
  under FSDP the full state is gathered to rank 0 for the save and re-sharded on load.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from llmtrain.config.schema import RunConfig
from llmtrain.data.validation import LossSums, move, sum_losses
from llmtrain.distributed import (
    all_gather_object,
    all_reduce_max,
    all_reduce_sum,
    any_rank,
    barrier,
    max_across_ranks,
    sum_across_ranks,
)
from llmtrain.distributed.wrap import resolve_strategy, wrap_model
from llmtrain.errors import Interrupted, UserError
from llmtrain.objectives import LossOutput, Trainee
from llmtrain.objectives.chunked_ce import defer_head_gradient
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.device import autocast, peak_flops
from llmtrain.train.optim import build_optimizer, build_scheduler
from llmtrain.train.tracking import MetricsLogger

if TYPE_CHECKING:  # a job's runtime is set up above the trainer (docs/design.md, layer 6)
    from llmtrain.runtime import Runtime


class LossModule(torch.nn.Module):
    """model + trainee as one module, so wrappers see the whole loss computation."""

    def __init__(self, model: torch.nn.Module, trainee: Trainee):
        super().__init__()
        self.model, self.trainee = model, trainee
        if trainee_extra(trainee) is not None:
            # Registered, so it moves to the device and DDP synchronises its gradients.
            self.extra = trainee_extra(trainee)

    def forward(self, batch: dict[str, torch.Tensor]):
        out = self.trainee.loss(self.model, batch)
        return out.loss, out.n_targets, out.extras


def trainee_extra(trainee: Trainee) -> torch.nn.Module | None:
    """Parameters a trainee trains besides the model (distillation's hidden-state projection):
    optimised with the model and kept in train_state.pt, never in the model's weights."""
    return getattr(trainee, "extra", None)


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    interrupted: bool = False
    signal: int | None = None  # the signal that stopped an interrupted run

    def interruption(self, run_dir: Path) -> Interrupted:
        """What a stage raises for an interrupted run: the CLI prints it last and exits 128 + signal."""
        return Interrupted(
            self.signal or signal.SIGTERM,
            f"interrupted at step {self.step}; checkpoint {self.checkpoint}; "
            f"resume with trainer.resume=auto hydra.run.dir={run_dir}",
        )


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        rt: Runtime,
        model: torch.nn.Module,
        trainee: Trainee,
        logger: MetricsLogger,
        meta: dict[str, Any],
    ):
        """`trainee`: an objective or a task, its data bound (it gives this rank its batches)."""
        self.cfg, self.tc = cfg, cfg.trainer
        self.model, self.trainee = model, trainee
        run_dir, device, precision, dist = rt.run_dir, rt.device, rt.precision, rt.dist
        self.run_dir, self.device, self.precision, self.dist = run_dir, device, precision, dist
        self.logger, self.meta = logger, meta
        self.ckpt_root = run_dir / "checkpoints"
        if self.tc.resume not in ("never", "auto"):
            raise UserError(f"trainer.resume must be 'never' or 'auto', got {self.tc.resume!r}")
        self.strategy = resolve_strategy(self.tc, dist)
        self.aliases = ckpt.tied_aliases(model)  # names to drop from full state dicts
        # Resume: weights go into the plain model before wrapping (FSDP then shards them);
        # optimizer/scheduler/RNG state after the optimizer exists.
        resume = self.tc.resume == "auto"  # from the newest checkpoint that verifies (corrupt ones: a warning)
        self.resumed_from: Path | None = ckpt.newest_intact(self.ckpt_root, dist.rank == 0) if resume else None
        if self.resumed_from is not None:
            ckpt.load_meta(self.resumed_from)
            ckpt.load_model_state(model, ckpt.load_weights(self.resumed_from), self.resumed_from)
        if hasattr(trainee, "chunked_loss"):  # objectives and tasks whose loss is the LM head's
            chunked = self.tc.chunked_loss
            trainee.chunked_loss = device.type == "cpu" if chunked is None else chunked
        if self.tc.defer_head_grad:  # the config-only conflicts are refused by validate_config
            if not getattr(trainee, "chunked_loss", False):  # auto turns it off on GPUs
                raise UserError(
                    f"trainer.defer_head_grad=true needs the chunked loss, which is off on {device.type} "
                    "unless trainer.chunked_loss=true"
                )
            if not defer_head_gradient(model):  # a classifier, or a LoRA or quantized head
                name = type(model).__name__
                raise UserError(f"trainer.defer_head_grad=true: {name} has no plain linear LM head to defer")
        self.loss_module = wrap_model(LossModule(model, trainee), cfg.trainer, device, precision, dist)
        self.optimizer = build_optimizer(model, cfg.optim, device.type)
        self.extra = trainee_extra(trainee)
        if self.extra is not None:
            if self.strategy == "fsdp":
                raise UserError(f"{cfg.stage}: trainer.strategy=fsdp cannot train the trainee's parameters; use ddp")
            self.optimizer.add_param_group({"params": list(self.extra.parameters()), "weight_decay": 0.0})
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, self.tc.max_steps)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.source = trainee.train_source(dist.rank, dist.world_size)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * self.tc.grad_accum * dist.world_size
        flops = getattr(model, "flops_per_token", None)
        self.flops_per_token = flops(cfg.data.seq_len) if flops else None
        self.peak = peak_flops(device)
        self.step = 0
        self.best_val = math.inf
        self._stop_signal: int | None = None
        self._saving = False  # a signal now waits for the save (see _install_signal_handlers)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.extra is not None:
            self.params += list(self.extra.parameters())
        self.bad_run = torch.zeros((), device=device)  # current streak of non-finite steps
        self.bad_max = torch.zeros((), device=device)  # longest streak since the last check
        self.grad_norm = torch.zeros((), device=device)
        self.train_extras = {}
        self._last_val_step: int | None = None
        if self.resumed_from is not None:
            self._load_train_state(self.resumed_from)

    # ----------------------------------------------------------------- state
    def _state_options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Full (unsharded) tensors; under FSDP gathered to rank 0's CPU (the others get {}).
        return StateDictOptions(full_state_dict=True, cpu_offload=self.strategy == "fsdp", **kw)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def train_state(self) -> dict[str, Any]:
        """Everything but the weights; collective (every rank must call it), full on rank 0."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        # Keyed by parameter name, not position: loadable under another strategy or world size.
        try:
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=self._state_options())
        except (KeyError, RuntimeError, ValueError):
            if self.strategy == "fsdp":
                raise
            # The model no longer holds every optimised parameter (e.g. LoRA merged for the
            # final save): fall back to torch's positional format.
            optim_state = self.optimizer.state_dict()
        state = {
            "step": self.step,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "rng": all_gather_object(self._rng_state()),  # one per rank: dropout streams differ
            "best_val": self.best_val,
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.extra is not None:
            state["trainee"] = {k: v.detach().cpu() for k, v in self.extra.state_dict().items()}
        if hasattr(self.trainee, "state_dict"):  # e.g. RL's sampling generator and rollout (llmtrain/grpo.py)
            state["trainee_state"] = all_gather_object(self.trainee.state_dict())
        return state

    def model_state(self) -> dict[str, torch.Tensor]:
        if self.strategy != "fsdp":
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=self._state_options())

    def save(self, metrics: dict[str, float] | None = None, metrics_step: int | None = None) -> Path | None:
        """Checkpoint the current step. Collective: every rank calls it; rank 0 writes and renames,
        the others wait. `metrics` default to the last evaluation's, with the step it ran at."""
        if metrics_step is None and metrics:
            metrics_step = self._last_val_step
        self._saving = True
        try:
            weights, state = self.model_state(), self.train_state()
            path = None
            if self.dist.rank == 0:
                meta = {**self.meta, "metrics": metrics or {}, "metrics_step": metrics_step}
                path = ckpt.save_checkpoint(
                    self.ckpt_root, self.step, weights, meta, state, keep_last=self.tc.keep_last, aliases=self.aliases
                )
            barrier()
        finally:
            self._saving = False
        self._last_save_time = time.monotonic()
        return path

    def _load_train_state(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = ckpt.load_train_state(path)
        if state is None:
            raise UserError(f"checkpoint {path} has no training state ({ckpt.STATE}) to resume from")
        try:
            if all(isinstance(k, int) for k in state["optimizer"].get("state", {})):  # positional
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                set_optimizer_state_dict(
                    self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
                )
            self.scheduler.load_state_dict(state["scheduler"])
            rngs = state["rng"]
            if len(rngs) == self.dist.world_size:  # same layout: continue each rank's stream exactly
                torch.set_rng_state(rngs[self.dist.rank]["cpu"])
                if "cuda" in rngs[self.dist.rank] and self.device.type == "cuda":
                    torch.cuda.set_rng_state(rngs[self.dist.rank]["cuda"], self.device)
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            if self.extra is not None:
                self.extra.load_state_dict(state["trainee"])
            if hasattr(self.trainee, "load_state_dict"):
                trainee_states = state["trainee_state"]
                if len(trainee_states) != self.dist.world_size:
                    raise ValueError(f"saved by {len(trainee_states)} ranks, resumed by {self.dist.world_size}")
                self.trainee.load_state_dict(trainee_states[self.dist.rank])
            self.step, self.best_val = int(state["step"]), float(state["best_val"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"training state {path / ckpt.STATE} does not fit this run: {first}") from None
        if self.dist.rank == 0:  # metrics.jsonl is cut back to this step by the stage (llmtrain/run_dir.py)
            tqdm.write(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        validate = getattr(self.trainee, "validate", None)
        if validate is not None:  # a trainee with its own validation (RL: rewards of held-out prompts)
            self.loss_module.eval()
            try:
                return validate(self.model, self.step)
            finally:
                self.loss_module.train()
        self.loss_module.eval()
        try:
            views = getattr(self.trainee, "val_sources", lambda: None)()
            if views is None:
                return self._val_metrics(self._val_sums(self.trainee))
            # A data mixture: each source on its own (val/loss/<source>) and all targets together.
            per_source = {name: self._val_sums(view) for name, view in views.items()}
            sums = list(per_source.values())
            keys = sorted({k for s in sums for k in s.extras})
            extras = {k: sum(s.extras[k] for s in sums if k in s.extras) for k in keys}
            total = LossSums(sum(s.total for s in sums), sum(s.count for s in sums), extras)
            out = self._val_metrics(total)
            for name, s in per_source.items():
                out.update({f"{k}/{name}": v for k, v in self._val_metrics(s).items()})
            return out
        finally:
            self.loss_module.train()

    def _val_sums(self, trainee: Trainee) -> LossSums:
        """The validation loss sums of `trainee`'s val_batches, over every rank."""
        batches = list(trainee.val_batches(self.tc.eval_batches, self.dist.rank, self.dist.world_size))
        weights = [1.0] * len(batches)
        # Under FSDP every forward is a collective, so ranks with fewer batches run extra forwards
        # with weight 0 until all ranks have done the same number.
        if self.strategy == "fsdp":
            n_max = int(all_reduce_max(torch.tensor([len(batches)], device=self.device)).item())
            if len(batches) < n_max:
                filler = batches[0] if batches else next(iter(trainee.val_batches(1, 0, 1)))
                weights += [0.0] * (n_max - len(batches))
                batches += [filler] * (n_max - len(batches))

        def loss(batch):
            with autocast(self.device, self.precision):
                return LossOutput(*self.loss_module(batch))

        return sum_losses(loss, batches, self.device, weights).all_reduce()

    def _val_metrics(self, sums: LossSums) -> dict[str, float]:
        if sums.count.item() == 0:
            return {}
        val_loss = (sums.total / sums.count).item()
        out = {"val/loss": val_loss}
        if getattr(self.trainee, "token_loss", True):
            out["val/ppl"] = math.exp(min(val_loss, 700.0))
        out.update({f"val/{k}": v for k, v in sums.extra_means().items()})
        return out

    # ----------------------------------------------------------------- train
    train_extras: dict[str, torch.Tensor]  # objective extras as (sum, count), since the last log

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns this rank's mean loss, on
        device (no host sync). Also used by `llmtrain bench`."""
        accum = self.tc.grad_accum
        loss_step = torch.zeros((), device=self.device)
        for micro in range(accum):
            # See the module docstring: identical global batches for equal world_size x grad_accum.
            batch = move(self.source.batch(self.step * accum + micro), self.device)
            with _no_sync(self.loss_module, micro == accum - 1), autocast(self.device, self.precision):
                loss, _, extras = self.loss_module(batch)
            for k, (num, den) in extras.items():  # e.g. mlm_accuracy: summed on device until a log step
                acc = self.train_extras.setdefault(k, torch.zeros(2, dtype=torch.float64, device=self.device))
                acc += torch.stack([num.detach().double(), den.detach().double()])
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_step += scaled.detach()
        self.grad_norm = self._step_optimizer(self.params, loss_step, self.bad_run)
        torch.maximum(self.bad_max, self.bad_run, out=self.bad_max)
        self.step += 1
        return loss_step

    def tokens_done(self) -> float:
        """Tokens trained on so far, all ranks: the context windows of every step, or the trainee's
        own count where it keeps one (RL: the tokens it sampled). Collective for such a trainee."""
        counted = getattr(self.trainee, "tokens_done", None)
        if counted is None:
            return float(self.step * self.tokens_per_step)
        return sum_across_ranks([float(counted())])[0]

    def fit(self) -> TrainResult:
        tc = self.tc
        main = self.dist.rank == 0
        start_step = self.step
        bar = tqdm(
            total=tc.max_steps,
            initial=self.step,
            disable=not (main and tc.progress),
            desc=self.cfg.stage,
            dynamic_ncols=True,
            leave=True,
        )
        old_handlers = self._install_signal_handlers()
        loss_acc = torch.zeros((), device=self.device)
        last_val: dict[str, float] = {}
        t_last, steps_since = time.perf_counter(), 0
        tokens_last = self.tokens_done()
        self._last_save_time = time.monotonic()
        save_every_s = tc.ckpt_every_minutes * 60.0
        interrupted = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.loss_module.train()
        try:
            while self.step < tc.max_steps:
                loss_step = self.train_step()
                loss_acc += loss_step
                steps_since += 1
                bar.update(1)

                is_last = self.step == tc.max_steps
                first = self.step == start_step + 1 and not (self.step % tc.log_every == 0 or is_last)
                if first and not bar.disable:
                    # The bar shows loss and lr from the first step on, not only from the first
                    # log step; one host sync, once per run.
                    bar.set_postfix(loss=f"{loss_step.item():.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.step % tc.log_every == 0 or is_last:
                    all_reduce_sum(loss_acc)
                    mean_loss = loss_acc.item() / (steps_since * self.dist.world_size)
                    elapsed = time.perf_counter() - t_last
                    tokens = self.tokens_done()
                    tps, tokens_last = (tokens - tokens_last) / max(elapsed, 1e-9), tokens
                    metrics = {
                        "train/loss": mean_loss,
                        "train/lr": self.scheduler.get_last_lr()[0],
                        "train/grad_norm": self.grad_norm.item(),
                        "train/tokens_per_s": tps,
                        "train/tokens": tokens,
                        "train/step_time_ms": 1000 * elapsed / steps_since,
                    }
                    by_source = getattr(self.trainee, "windows_by_source", lambda n: None)(
                        self.step * self.tc.grad_accum * self.dist.world_size * self.cfg.data.batch_size
                    )
                    for name, windows in (by_source or {}).items():  # a data mixture's sources
                        metrics[f"train/tokens/{name}"] = windows * self.cfg.data.seq_len
                    for k, acc in self.train_extras.items():
                        num, den = all_reduce_sum(acc).tolist()
                        metrics[f"train/{k}"] = num / max(den, 1.0)
                        acc.zero_()
                    if self.peak and self.flops_per_token:  # CUDA devices in the peak table only
                        metrics["train/mfu"] = tps * self.flops_per_token / (self.peak * self.dist.world_size)
                    if self.device.type == "cuda":
                        metrics["train/peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
                    self.logger.log(metrics, self.step)
                    bar.set_postfix(
                        loss=f"{mean_loss:.4f}", lr=f"{metrics['train/lr']:.2e}", tok_s=f"{tps:,.0f}", refresh=False
                    )
                    loss_acc.zero_()
                    t_last, steps_since = time.perf_counter(), 0
                    self._check_bad_steps()  # after logging, so the log shows the bad steps

                if (tc.eval_every > 0 and self.step % tc.eval_every == 0) or is_last:
                    val = self._evaluate_showing(bar)
                    if val:
                        self._record_val(val, bar)
                        last_val = val
                    t_last = time.perf_counter()  # evaluation time is not training throughput

                # One host-side reduction (gloo, no device sync) carries both decisions, so every
                # rank stops, and saves, at the same step: 2 = a signal on some rank (stop and
                # save), 1 = rank 0's clock says a timed save is due, 0 = go on.
                due = (
                    self.dist.rank == 0
                    and save_every_s > 0
                    and not is_last  # the final save follows anyway
                    and time.monotonic() - self._last_save_time >= save_every_s
                )
                decision = max_across_ranks(2 if self._stop_signal is not None else int(due))
                if decision == 2:
                    interrupted = True
                    break
                timed = decision == 1
                if (tc.ckpt_every > 0 and self.step % tc.ckpt_every == 0 and not is_last) or timed:
                    self._check_bad_steps()  # never save a run that has already diverged
                    if not bool(self.bad_run):  # nor a step whose update was skipped
                        self.save(last_val)
                    t_last = time.perf_counter()
            self._check_bad_steps()
            if self.step == start_step and self.resumed_from is not None:
                path = self.resumed_from  # resumed a finished run: nothing new to save
            else:
                path = self.save(last_val)  # a signal now waits for this (no half-written state)
            if interrupted and tc.eval_on_stop and self._last_val_step != self.step:
                # After the save: the checkpoint is safe even if the validation pass is cut short.
                val = self._evaluate_showing(bar)
                if val:
                    self._record_val(val, bar)
                    last_val = val
            # A signal during the final save of a finished run counts too, the same on every rank.
            interrupted = any_rank(self._stop_signal is not None)
        finally:
            bar.close()
            # A stopped run keeps the waiting handler until the process exits: a further Ctrl-C
            # on the way out (after the save) must not turn into a KeyboardInterrupt that skips
            # the "interrupted at step N" line.
            if self._stop_signal is None:
                self._restore_signal_handlers(old_handlers)
        return TrainResult(
            step=self.step,
            metrics=last_val,
            checkpoint=path,
            interrupted=interrupted,
            signal=self._stop_signal,
        )

    def _evaluate_showing(self, bar) -> dict[str, float]:
        """The validation pass, with the bar saying so (it would sit frozen otherwise)."""
        bar.set_description(f"{self.cfg.stage} (evaluating)", refresh=True)
        try:
            return self.evaluate()
        finally:
            bar.set_description(self.cfg.stage, refresh=False)

    def _record_val(self, val: dict[str, float], bar) -> None:
        self._last_val_step = self.step
        self.logger.log(val, self.step)
        if self.dist.rank == 0:  # every rank has the reduced value; one line, not one per rank
            shown = {k: v for k, v in val.items() if k == "val/loss"} or dict(list(val.items())[:3])
            bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        if "val/loss" in val:
            self.best_val = min(self.best_val, val["val/loss"])

    def _step_optimizer(self, params, loss_step: torch.Tensor, bad_run: torch.Tensor) -> torch.Tensor:
        clip = self.cfg.optim.grad_clip
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # Under FSDP the grads are sharded DTensors: the norm is reduced over all shards (a
        # replicated DTensor), so every rank clips by the same global norm.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # The same decision on every rank: the grad norm is global already; the loss is made
        # global with one small all-reduce (asynchronous under NCCL, so still no host sync).
        loss_all = all_reduce_sum(loss_step.detach().clone()) if self.dist.enabled else loss_step
        finite = torch.isfinite(loss_all) & torch.isfinite(grad_norm)
        if self.scaler is not None:  # the scaler skips non-finite steps itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif getattr(self.optimizer, "skips_on_found_inf", False) or (
            self.device.type == "cuda" and self.optimizer.defaults.get("fused")
        ):
            # The fused kernel (and MuonAdamW) skips the update on device when found_inf is set:
            # no host sync.
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        elif bool(finite):  # on CPU reading a flag costs nothing
            self.optimizer.step()
        bad_run.mul_(~finite).add_((~finite).float())
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def _check_bad_steps(self) -> None:
        n = int(self.bad_max.item())
        self.bad_max.zero_()
        if n >= self.tc.max_bad_steps > 0:
            # Only finite steps are ever saved (see fit), so the newest checkpoint is a good one.
            found = ckpt.list_checkpoints(self.ckpt_root)
            kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint had been saved yet"
            raise UserError(
                f"training diverged: {n} consecutive steps with non-finite loss or gradients by step "
                f"{self.step} (trainer.max_bad_steps={self.tc.max_bad_steps}); stopped without saving, {kept}"
            )

    def _install_signal_handlers(self):
        # The handler only sets a flag: the loop stops at the next step boundary and saves. A
        # repeated signal never raises (a KeyboardInterrupt inside the save would leave a torn
        # checkpoint and a silent exit 130); it is acknowledged and the save goes on.
        def handler(signum, frame):
            if self._stop_signal is None:
                self._stop_signal = signum
                return
            what = "saving the checkpoint" if self._saving else "stopping at the step boundary to save"
            # os.write, not print: a handler may run in the middle of another print to stderr.
            os.write(2, f"{signal.Signals(signum).name} again: {what}, please wait\n".encode())

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
