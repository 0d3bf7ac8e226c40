"""Reward model (task=reward): a scalar head on the last real token of a decoder, trained on
preference pairs (llmtrain/tasks/preference_data.py) with the Bradley-Terry loss
-log sigmoid(r(chosen) - r(rejected)). Logs pref_accuracy (r(chosen) > r(rejected)) and
reward_margin. The head has no bias (a constant shift cancels in every comparison), so it is
transformers' GPT2/LlamaForSequenceClassification with num_labels=1 (llmtrain/hf/export.py).

    loaded = llmtrain.checkpoints.load(REWARD_RUN)
    rewards = score(loaded, ["What is 2+2?"], ["4"])      # float32 [N], as training rendered them
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmtrain.objectives.base import LossOutput
from llmtrain.registry import register
from llmtrain.tasks.base import HeadModel, model_device, pad_rows, sequential_batches
from llmtrain.tasks.preference_data import PairTask


class RewardModel(HeadModel):
    """backbone + a bias-free linear head reading the hidden state of each row's last real token."""

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone, 1)
        self.head = nn.Linear(backbone.config.d_model, 1, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.hidden(input_ids)  # right padding under causal attention: no mask needed
        if last is None:
            last = input_ids.new_full((input_ids.shape[0],), input_ids.shape[1] - 1)
        pooled = hidden[torch.arange(input_ids.shape[0], device=hidden.device), last]
        return self.head(pooled).squeeze(-1).float()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean -log P(chosen > rejected) with P = sigmoid(r_c - r_r) (Bradley & Terry 1952)."""
    return -F.logsigmoid(chosen - rejected).mean()


@register("task", "reward")
class Reward(PairTask):
    name = "reward"

    def build_model(self, backbone):
        return RewardModel(backbone)

    def collate(self, examples):
        return self.collate_scored(examples)

    def pair_rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        r = model(batch["input_ids"], batch["last"])
        n = r.shape[0] // 2
        return r[:n], r[n:]

    def loss(self, model, batch):
        chosen, rejected = self.pair_rewards(model, batch)
        n = torch.tensor(chosen.numel(), device=chosen.device)
        margin = (chosen - rejected).detach()
        return LossOutput(
            loss=bradley_terry_loss(chosen, rejected),
            n_targets=n,
            extras={"pref_accuracy": ((margin > 0).sum(), n), "reward_margin": (margin.sum(), n)},
        )

    @torch.no_grad()
    def rewards(self, model, examples: list[dict], device=None, batch_size: int = 0) -> torch.Tensor:
        """[N, 2] rewards of (chosen, rejected) for each example, in order."""
        device = device or model_device(model)
        was = model.training
        model.eval()
        out = []
        try:
            for batch in sequential_batches(examples, batch_size or self.data_cfg.batch_size, self.collate):
                c, r = self.pair_rewards(model, {k: v.to(device) for k, v in batch.items()})
                out.append(torch.stack([c, r], 1).cpu())
        finally:
            model.train(was)
        return torch.cat(out) if out else torch.zeros(0, 2)

    def evaluate(self, model, device=None, max_examples=0):
        examples = self.val_examples()
        examples = examples[:max_examples] if max_examples > 0 else examples
        r = self.rewards(model, examples, device)
        margin = r[:, 0] - r[:, 1]
        return {
            "pref_accuracy": float((margin > 0).float().mean()),
            "reward_margin": float(margin.mean()),
            "examples": len(r),
        }

    @torch.no_grad()
    def score(self, model, prompts: list, responses: list[str], batch_size: int = 16) -> torch.Tensor:
        """Rewards of (prompt, response) rows, rendered and truncated as in training."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        rows = []
        for prompt, response in zip(prompts, responses):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            p, (r,) = self.truncate(self.prompt_ids(messages), [self.response_ids(response)])
            rows.append(p + r)
        device = model_device(model)
        was = model.training
        model.eval()
        out = []
        try:
            for i in range(0, len(rows), max(1, batch_size)):
                chunk = rows[i : i + batch_size]
                ids = pad_rows(chunk, self.tokenizer.pad_id)
                last = torch.tensor([len(r) - 1 for r in chunk], dtype=torch.long)
                out.append(model(ids.to(device), last.to(device)).float().cpu())
        finally:
            model.train(was)
        return torch.cat(out) if out else torch.zeros(0)


def score(loaded, prompts: list, responses: list[str], batch_size: int = 16) -> torch.Tensor:
    """Rewards (float32, shape [N]) of a reward run's checkpoint (`loaded`, from
    llmtrain.checkpoints.load) for each prompt and response. A prompt is the user's text (or a
    list of {"role", "content"} messages); both are rendered with the run's chat template and
    truncated to its data.seq_len exactly as in training."""
    from llmtrain.errors import UserError

    task = loaded.task
    if task is None or getattr(task, "name", None) != "reward":
        raise UserError(f"{loaded.path} is not a reward model checkpoint (task=reward)")
    return task.score(loaded.model, prompts, responses, batch_size)
