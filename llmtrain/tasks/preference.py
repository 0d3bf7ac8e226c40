"""Preference tuning of a policy on pairs (task=preference, task.loss=dpo|ipo|simpo). With h the
difference of the chosen and rejected log-ratios to the reference,
h = [log pi(y_c|x) - log ref(y_c|x)] - [log pi(y_r|x) - log ref(y_r|x)] (summed over reply tokens):

    dpo    -log sigmoid(beta * h)                                      Rafailov et al. 2023, eq. 7
    ipo    (h - 1 / (2 beta))^2                                        Azar et al. 2023, eq. 17
    simpo  -log sigmoid(beta/|y_c| log pi(y_c|x) - beta/|y_r| log pi(y_r|x) - gamma)
                                                 Meng et al. 2024, eq. 6 (no reference)

task.rpo_alpha > 0 adds rpo_alpha * (-log pi(y_c|x) / |y_c|), the chosen reply's per-token NLL
(RPO, Pang et al. 2024, eq. 3; TRL's rpo_alpha): plain DPO may lower the chosen replies' likelihood
along with the rejected ones', which costs a verifiable task its greedy answers.

The reference is the frozen init_from (with LoRA: the base with the adapters off). Its
log-probs are computed once, before training, in float32 without dropout, and cached in the run
directory (reference_logps.safetensors, keyed by a hash of the weights and the tokenized pairs),
so no second model is held in memory; under DDP each rank scores a shard and they are gathered.
Logged: pref_accuracy (implicit reward of chosen > rejected), reward_margin, chosen_logp and
rejected_logp (summed policy log-probs), for train/ and val/.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from llmtrain.errors import UserError
from llmtrain.objectives.base import LossOutput
from llmtrain.registry import register
from llmtrain.tasks.base import model_device
from llmtrain.tasks.preference_data import PairTask, sequence_logps

LOSSES = ("dpo", "ipo", "simpo")
REFERENCE_CACHE = "reference_logps.safetensors"


def dpo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """Per-pair DPO loss from summed log-probs of the policy (pc, pr) and the reference (rc, rr)."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def ipo_loss(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """Per-pair IPO loss: the log-ratio difference regressed onto 1 / (2 beta)."""
    return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2


def simpo_loss(pc, pr, nc, nr, beta: float, gamma: float) -> torch.Tensor:
    """Per-pair SimPO loss from summed log-probs (pc, pr) and reply lengths in tokens (nc, nr)."""
    return -F.logsigmoid(beta * pc / nc - beta * pr / nr - gamma)


def pair_logps(model, task: PairTask, examples: list[dict], device=None, batch_size: int = 0):
    """Summed log-probs [N, 2] of (chosen, rejected) replies under `model`, float32, in eval mode
    (no dropout), and the replies' lengths [N, 2]."""
    device = device or model_device(model)
    was = model.training
    model.eval()
    logps, lens = [], []
    bs = max(1, batch_size or task.data_cfg.batch_size)
    try:
        with torch.no_grad():
            for i in range(0, len(examples), bs):
                batch = task.collate_lm(examples[i : i + bs])
                lp, n = sequence_logps(model, batch["input_ids"].to(device), batch["labels"].to(device))
                half = lp.shape[0] // 2
                logps.append(torch.stack([lp[:half], lp[half:]], 1).cpu())
                lens.append(torch.stack([n[:half], n[half:]], 1).cpu())
    finally:
        model.train(was)
    if not logps:
        return torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long)
    return torch.cat(logps), torch.cat(lens)


@register("task", "preference")
class Preference(PairTask):
    name = "preference"

    def __init__(self, cfg, tokenizer, model_cfg, data_cfg, state=None, seed=0):
        super().__init__(cfg, tokenizer, model_cfg, data_cfg, state, seed)
        if cfg.loss not in LOSSES:
            raise UserError(f"task.loss={cfg.loss!r} is not a preference loss (choose from {', '.join(LOSSES)})")
        self.reference: dict[str, torch.Tensor] | None = None  # split -> [N, 2] summed log-probs

    @property
    def needs_reference(self) -> bool:
        return self.cfg.loss != "simpo"

    def collate(self, examples):
        batch = self.collate_lm(examples)
        if all("ref" in e for e in examples):
            batch["ref"] = torch.tensor([e["ref"] for e in examples], dtype=torch.float32)
        return batch

    # ------------------------------------------------------------------ reference
    def reference_key(self, model) -> str:
        """sha256 of the reference weights and the tokenized pairs: a cache from other weights or data is not used."""
        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        for split in (self.train_examples(), self.val_examples()):
            h.update(json.dumps([[e["prompt"], e["chosen"], e["rejected"]] for e in split]).encode())
        return h.hexdigest()

    def prepare(self, model, device, run_dir: Path, rank: int = 0, world: int = 1) -> str | None:
        """Bind the reference log-probs of `model` (the initial policy) to every pair: read from
        the run directory's cache when it is this model's on these pairs, else computed here
        (sharded over ranks). write_files() saves them once the run directory may be written."""
        if not self.needs_reference:
            return "task preference: loss simpo needs no reference model"
        from llmtrain.models.lora import adapters_disabled

        with adapters_disabled(model):
            key = self.reference_key(model)
            cached = _read_cache(run_dir / REFERENCE_CACHE, key)
            if cached is not None:
                self.reference, how = cached, f"read from {run_dir / REFERENCE_CACHE}"
            else:
                model.to(device)
                self.reference = {
                    "train": _sharded_logps(model, self, self.train_examples(), device, rank, world),
                    "val": _sharded_logps(model, self, self.val_examples(), device, rank, world),
                }
                how = "computed from init_from (frozen)"
        self._key = key
        for split, examples in (("train", self.train_examples()), ("val", self.val_examples())):
            for e, ref in zip(examples, self.reference[split].tolist()):
                e["ref"] = ref
        return f"task preference: reference log-probs of {sum(len(v) for v in self.reference.values()):,} pairs {how}"

    def write_files(self, run_dir: Path) -> None:
        if self.reference is None:
            return
        from safetensors.torch import save

        from llmtrain.files import atomic_write

        atomic_write(run_dir / REFERENCE_CACHE, save(self.reference, metadata={"key": self._key}))

    # ------------------------------------------------------------------ loss
    def loss(self, model, batch):
        labels = batch["labels"]
        lp, n = sequence_logps(model, batch["input_ids"], labels)
        half = lp.shape[0] // 2
        pc, pr, nc, nr = lp[:half], lp[half:], n[:half].clamp(min=1), n[half:].clamp(min=1)
        beta = self.cfg.beta
        if self.cfg.loss == "simpo":
            per_pair = simpo_loss(pc, pr, nc, nr, beta, self.cfg.gamma)
            reward_c, reward_r = beta * pc / nc, beta * pr / nr
        else:
            if "ref" not in batch:
                raise RuntimeError("preference loss without reference log-probs: call task.prepare(model, ...) first")
            rc, rr = batch["ref"][:, 0], batch["ref"][:, 1]
            fn = dpo_loss if self.cfg.loss == "dpo" else ipo_loss
            per_pair = fn(pc, pr, rc, rr, beta)
            reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
        if self.cfg.rpo_alpha > 0:
            per_pair = per_pair + self.cfg.rpo_alpha * (-pc / nc)
        margin = (reward_c - reward_r).detach()
        count = torch.tensor(half, device=lp.device)
        return LossOutput(
            loss=per_pair.mean(),
            n_targets=count,
            extras={
                "pref_accuracy": ((margin > 0).sum(), count),
                "reward_margin": (margin.sum(), count),
                "chosen_logp": (pc.detach().sum(), count),
                "rejected_logp": (pr.detach().sum(), count),
            },
        )

    def evaluate(self, model, device=None, max_examples=0):
        """Whether the policy gives the chosen reply the higher log-prob (summed; and per token)."""
        examples = self.val_examples()
        examples = examples[:max_examples] if max_examples > 0 else examples
        lp, n = pair_logps(model, self, examples, device)
        return policy_metrics(lp, n)


def policy_metrics(logps: torch.Tensor, lens: torch.Tensor) -> dict[str, float]:
    """Accuracy of chosen over rejected by summed and by per-token log-prob, with standard errors."""
    out: dict[str, float] = {"examples": len(logps)}
    per_token = logps / lens.clamp(min=1)
    for name, v in (("policy_accuracy", logps), ("policy_accuracy_norm", per_token)):
        acc = (v[:, 0] > v[:, 1]).float()
        out[name] = float(acc.mean()) if len(acc) else 0.0
        out[name + "_se"] = float(acc.std(unbiased=False) / max(len(acc), 1) ** 0.5) if len(acc) else 0.0
    return out


def _sharded_logps(model, task, examples, device, rank, world) -> torch.Tensor:
    from llmtrain.data.validation import shard
    from llmtrain.distributed import gather_indexed

    bs = task.data_cfg.batch_size
    pairs = []
    for b, chunk in shard(examples, bs, 0, rank, world):
        lp, _ = pair_logps(model, task, list(chunk), device, bs)
        pairs += [(b * bs + i, row) for i, row in enumerate(lp.tolist())]
    rows = gather_indexed(pairs) if world > 1 else [row for _, row in pairs]
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 2)


def _read_cache(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached reference log-probs if they were computed for `key`, else None (recomputed)."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        raw = path.read_bytes()
        meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")]).get("__metadata__") or {}
        tensors = load(raw)
    except (SafetensorError, ValueError, OSError):
        return None
    if meta.get("key") != key or set(tensors) != {"train", "val"}:
        return None
    return tensors
