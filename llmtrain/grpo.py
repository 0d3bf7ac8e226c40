"""GRPO (Shao et al. 2024, DeepSeekMath) as a Trainee of the one Trainer (llmtrain/train/trainer.py).

The trainer's batch source does the rollout: batch(step) samples rl.group_size completions for
each of data.batch_size prompts with the KV-cache engine (llmtrain/generation.py), batched,
scores them with the reward, and returns the token ids with the frozen reference's log-probs
and the group-normalised advantages. `loss` is then the clipped surrogate plus the k3 KL
estimate to the reference, averaged per sequence and over sequences:

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)
    L = -mean_i mean_t [ min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta * KL3_t ]
    rho_t = exp(logp_t - logp_old_t),   KL3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

With rl.iterations = 1 (the default) every rollout is used for one optimizer step, so the old
policy is the current one (rho = 1, its gradient is the policy gradient); with rl.iterations = mu
a rollout serves mu steps and the clip bounds how far they move from the policy that sampled it.

Resume is exact: the sampling generator's state and the rollout in use are part of the train
state (`state_dict`, stored in train_state.pt by the trainer), the prompts of a step are a
function of (seed, step, rank) as every batch is.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from llmtrain.config.schema import RLConfig
from llmtrain.data.loader import step_generator
from llmtrain.data.validation import shard
from llmtrain.distributed import sum_across_ranks
from llmtrain.errors import UserError
from llmtrain.files import file_mode
from llmtrain.generation import generate, trim_at_stop
from llmtrain.objectives.base import LossOutput
from llmtrain.tasks.base import ExampleSource
from llmtrain.train.device import autocast

# reward(prompts, responses) -> one float per response; a prompt is text, or chat messages for
# preference data (what llmtrain.tasks.reward.score takes)
RewardFn = Callable[[list[Any], list[str]], "list[float] | torch.Tensor"]
SAMPLES_FILE = "samples.jsonl"


# ----------------------------------------------------------------------------- the maths
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Rewards [N] (N = prompts x group_size, each prompt's completions adjacent) -> advantages
    normalised within each group: zero mean, unit (sample) standard deviation; a group whose
    completions all got the same reward gets zeros."""
    r = rewards.float().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per sampled token: unbiased, >= 0, and
    exactly 0 where the two log-probs are equal."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for every t: [N, T-1]. Rows are right padded, which a
    causal model never sees from the real tokens, so no mask is needed."""
    logits = model(ids)[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-sequence mean KL [N], fraction of clipped tokens); log-probs and mask [N, T]."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = kl_k3(logp, ref_logp)
    n_tok = mask.sum(1).clamp(min=1)
    per_seq = ((-(surrogate - kl_coef * kl)) * mask).sum(1) / n_tok
    kl_seq = (kl * mask).sum(1) / n_tok
    clipped = (((ratio - 1).abs() > clip_eps).float() * mask).sum() / mask.sum().clamp(min=1)
    return per_seq.mean(), kl_seq.detach(), clipped.detach()


# ----------------------------------------------------------------------------- rewards
def reward_function(cfg: RLConfig, task, device) -> RewardFn:
    """The reward rl.reward names: the task's verifiable reward, a user function, or a reward model."""
    spec = cfg.reward
    if spec == "arithmetic":
        if not hasattr(task, "reward") or getattr(task, "name", "") != "arithmetic":
            raise UserError(f"rl.reward=arithmetic needs task=arithmetic (the prompts it checks), not task={task.name}")
        return task.reward
    if spec.startswith("python:"):
        module, _, name = spec.removeprefix("python:").partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except ImportError as e:
            raise UserError(f"rl.reward={spec}: cannot import {module!r}: {e}") from None
        except AttributeError:
            raise UserError(f"rl.reward={spec}: module {module!r} has no {name!r}") from None
        if not callable(fn):
            raise UserError(f"rl.reward={spec}: {module}.{name} is not callable")
        return fn
    if spec == "model":
        try:
            from llmtrain.tasks.reward import score  # the reward-model task (task=reward)
        except ImportError:
            raise UserError(
                "rl.reward=model needs a reward checkpoint task (task=reward), which this llmtrain lacks; "
                "use rl.reward=arithmetic or rl.reward=python:module:function"
            ) from None
        from llmtrain import checkpoints

        loaded = checkpoints.load(cfg.reward_model, device)
        return lambda prompts, responses: score(loaded, prompts, responses, batch_size=cfg.reward_batch_size)
    raise UserError(f"rl.reward={spec!r}: choose arithmetic, model or python:module:function")


def score(reward_fn: RewardFn, prompts: list[Any], responses: list[str]) -> torch.Tensor:
    out = reward_fn(prompts, responses)
    r = torch.as_tensor(out if isinstance(out, torch.Tensor) else list(out), dtype=torch.float32).detach().cpu()
    if r.shape != (len(prompts),) or not torch.isfinite(r).all():
        raise UserError(f"the reward gave {tuple(r.shape)} values (or non-finite ones) for {len(prompts)} responses")
    return r


# ----------------------------------------------------------------------------- the trainee
class GRPO:
    """The Trainee (llmtrain/objectives/base.py) of `llmtrain rl`: rollouts in its batch source,
    the GRPO loss, and its own validation (rewards of greedy answers to held-out prompts)."""

    needs_decoder = True

    def __init__(
        self,
        cfg: RLConfig,
        policy: torch.nn.Module,
        reference: torch.nn.Module,
        tokenizer,
        train_prompts: list[tuple[list[int], Any]],  # (ids, the prompt as the reward reads it)
        val_prompts: list[tuple[list[int], Any]],
        reward_fn: RewardFn,
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        device: torch.device,
        precision: str = "fp32",
        stop_strings: list[str] | None = None,
        run_dir: Path | None = None,
        is_main: bool = True,
    ):
        self.cfg, self.policy, self.reference, self.tok = cfg, policy, reference, tokenizer
        self.reward_fn, self.batch_size, self.grad_accum, self.seed = reward_fn, batch_size, grad_accum, seed
        self.device, self.precision, self.run_dir, self.is_main = device, precision, run_dir, is_main
        max_len = int(policy.config.max_seq_len)
        room = max_len - cfg.max_new_tokens
        if room < 1:
            raise UserError(f"rl.max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt (context {max_len})")
        # Over-long prompts keep their end (where the answer starts); the loss sees prompt + answer.
        self.train_prompts = [(ids[-room:], text) for ids, text in train_prompts]
        self.val_prompts = [(ids[-room:], text) for ids, text in val_prompts]
        if not self.train_prompts or not self.val_prompts:
            raise UserError("rl: the task gave no training or no held-out prompts")
        self.stop_strings = [s for s in (stop_strings or []) if s]
        self.stops = [self.tok.encode(s) for s in self.stop_strings]
        self.gen = step_generator(seed, 0x6A1, 0)
        self.rollouts: dict[int, dict[str, torch.Tensor]] = {}
        self.sampled_tokens = 0  # completion tokens of this rank's rollouts: the trainer's train/tokens_per_s
        self._rank, self._world = 0, 1

    # -------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """What resume needs besides the step: the sampling generator and the rollout in use."""
        return {
            "generator": self.gen.get_state(),
            "rollouts": dict(self.rollouts),
            "sampled_tokens": self.sampled_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.sampled_tokens = int(state.get("sampled_tokens", 0))
        self.rollouts = {int(k): dict(b) for k, b in state["rollouts"].items()}

    # -------------------------------------------------------------------- Trainee
    def tokens_done(self) -> int:
        """The trainer's token count (train/tokens, train/tokens_per_s): tokens sampled, not windows."""
        return self.sampled_tokens

    def train_source(self, rank: int = 0, world: int = 1) -> GRPO:
        self._rank, self._world = rank, world
        self.gen = step_generator(self.seed, 0x6A1, rank)  # a fresh run's; resume replaces its state
        self.prompt_source = ExampleSource(self.train_prompts, self.batch_size, self.seed, list, rank, world)
        return self

    def val_batches(self, max_batches: int = 0, rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        return iter(())  # validation is `validate`: generation, not a loss

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """The trainer's micro-batch `index` (= step * grad_accum + micro): a rollout, sampled
        when first needed and reused for rl.iterations optimizer steps."""
        step, micro = divmod(index, self.grad_accum)
        slot = (step // self.cfg.iterations) * self.grad_accum + micro
        if slot not in self.rollouts:
            # Only the current group of rollouts is kept (and saved with a checkpoint).
            first = (step // self.cfg.iterations) * self.grad_accum
            self.rollouts = {k: v for k, v in self.rollouts.items() if k >= first}
            self.rollouts[slot] = self.rollout(self.prompt_source.batch(slot))
        return self.rollouts[slot]

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], temperature: float, generator=None) -> list[list[int]]:
        """Completions of the prompts; each keeps the token that ended it (eos or a stop string),
        so the policy learns to stop."""
        eos, stops = self.tok.eos_id, self.stops

        def stop_fn(_row: int, new: list[int]) -> bool:
            return new[-1] == eos or any(len(new) >= len(s) and new[-len(s) :] == s for s in stops)

        with autocast(self.device, self.precision):
            res = generate(
                self.policy,
                prompts,
                max_new_tokens=self.cfg.max_new_tokens,
                temperature=temperature,
                top_k=self.cfg.top_k,
                eos_id=None,  # kept in the completion by stop_fn instead of cut
                pad_id=self.tok.pad_id or 0,
                generator=generator,
                stop_fn=stop_fn,
            )
        self.last_generation = res  # tokens/s of the rollout (benchmarks)
        return res.tokens

    def responses_text(self, completions: list[list[int]]) -> list[str]:
        """What the reward reads: each completion's text, without the stop string that ended it."""
        return [trim_at_stop(self.tok.decode(c), self.stop_strings)[0] for c in completions]

    @torch.no_grad()
    def rollout(self, picked: list[tuple[list[int], str]]) -> dict[str, torch.Tensor]:
        G = self.cfg.group_size
        prompts = [ids for ids, _ in picked for _ in range(G)]
        texts = [text for _, text in picked for _ in range(G)]
        completions = self.sample(prompts, self.cfg.temperature, self.gen)
        self.sampled_tokens += sum(len(c) for c in completions)
        rewards = score(self.reward_fn, texts, self.responses_text(completions))
        rows = [p + c for p, c in zip(prompts, completions)]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.tok.pad_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), T - 1))
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, len(p) - 1 : len(p) - 1 + len(c)] = 1.0  # targets ids[t + 1] of the completion
        ids, mask = ids.to(self.device), mask.to(self.device)
        with autocast(self.device, self.precision):
            batch = {
                "input_ids": ids,
                "mask": mask,
                "ref_logp": token_logprobs(self.reference, ids).float(),
                "advantages": group_advantages(rewards, G).to(self.device),
                "reward": rewards.to(self.device),
                "response_len": mask.sum(1),
            }
            if self.cfg.iterations > 1:  # the policy that sampled, for the ratio of later steps
                was = self.policy.training
                self.policy.eval()
                batch["old_logp"] = token_logprobs(self.policy, ids).float()
                self.policy.train(was)
        # Kept on the host (the trainer moves each batch to the device; a checkpoint saves it).
        return {k: v.cpu() for k, v in batch.items()}

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        logp = token_logprobs(model, batch["input_ids"])
        old = batch["old_logp"] if "old_logp" in batch else logp.detach()
        loss, kl, clipped = grpo_loss(
            logp, old, batch["ref_logp"], batch["advantages"], batch["mask"], self.cfg.clip_eps, self.cfg.kl_coef
        )
        n = torch.tensor(float(len(kl)), device=kl.device)
        one = torch.ones((), device=kl.device)
        return LossOutput(
            loss=loss,
            n_targets=n,
            extras={
                "reward": (batch["reward"].sum(), n),
                "reward_std": (batch["reward"].view(-1, self.cfg.group_size).std(1).sum(), n / self.cfg.group_size),
                "kl": (kl.sum(), n),
                "response_len": (batch["response_len"].sum(), n),
                "clip_ratio": (clipped, one),
            },
        )

    # -------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Greedy answers to the held-out prompts (the first rl.eval_prompts): val/reward, the KL
        of those answers to the reference, and a few samples appended to samples.jsonl."""
        prompts = self.val_prompts[: self.cfg.eval_prompts or None]
        total = torch.zeros(4, dtype=torch.float64)  # reward, kl, response tokens, n
        samples = []
        for _, chunk in shard(prompts, max(self.batch_size * self.cfg.group_size, 1), 0, self._rank, self._world):
            completions = self.sample([ids for ids, _ in chunk], 0.0)
            texts = self.responses_text(completions)
            rewards = score(self.reward_fn, [t for _, t in chunk], texts)
            rows = [p + c for (p, _), c in zip(chunk, completions)]
            T = max(len(r) for r in rows)
            ids = torch.full((len(rows), T), self.tok.pad_id or 0, dtype=torch.long)
            mask = torch.zeros((len(rows), T - 1))
            for i, ((p, _), c) in enumerate(zip(chunk, completions)):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                mask[i, len(p) - 1 : len(p) - 1 + len(c)] = 1.0
            ids, mask = ids.to(self.device), mask.to(self.device)
            with autocast(self.device, self.precision):
                kl = kl_k3(token_logprobs(model, ids).float(), token_logprobs(self.reference, ids).float())
            kl_seq = ((kl * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu()
            total += torch.tensor([rewards.sum(), kl_seq.sum(), mask.sum().item(), len(chunk)], dtype=torch.float64)
            if len(samples) < self.cfg.num_samples:
                samples += [
                    {"prompt": t, "response": r, "reward": float(v)} for (_, t), r, v in zip(chunk, texts, rewards)
                ][: self.cfg.num_samples - len(samples)]
        reward, kl_sum, tokens, n = sum_across_ranks(total.tolist())
        out = {"val/reward": reward / max(n, 1), "val/kl": kl_sum / max(n, 1), "val/response_len": tokens / max(n, 1)}
        if self.cfg.reward == "arithmetic":  # the reward is 1 for a right answer: exact match
            out["val/exact_match"] = out["val/reward"]
        if self.is_main and self.run_dir is not None and samples:
            append_samples(self.run_dir / SAMPLES_FILE, step, samples)
        return out


def append_samples(path: Path, step: int, samples: list[dict]) -> None:
    """One JSON line per evaluation, written with a single write and fsynced: a kill leaves at
    most a torn last line, which readers skip and the next start cuts back (reconcile_metrics)."""
    line = json.dumps({"step": step, "samples": samples}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode())
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
