"""Pretraining objectives, chosen by `objective.name`. See base.py for the contract."""

from __future__ import annotations

from llmtrain import registry
from llmtrain.config.schema import DataConfig, ModelConfig, ObjectiveConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.objectives import clm, contrastive, denoising, mlm, nsp, span_corruption  # noqa: F401  (registers)
from llmtrain.objectives.base import LossOutput, Objective, Trainee
from llmtrain.tokenizers import Tokenizer

__all__ = ["LossOutput", "Objective", "Trainee", "build_objective", "objective_class"]


def objective_class(name: str) -> type[Objective]:
    """The registered objective `name` (its class attributes, without building it)."""
    return registry.get("objective", name)


def build_objective(
    cfg: ObjectiveConfig,
    tokenizer: Tokenizer,
    splits: TokenSplits,
    data_cfg: DataConfig,
    seed: int,
    model_cfg: ModelConfig | None = None,
) -> Objective:
    """The registered objective `cfg.name`, bound to its token splits, data config and seed
    (and the resolved model config: span_corruption's sentinel ids are model.extra_ids)."""
    cls = objective_class(cfg.name)
    extra = {"model_cfg": model_cfg} if cls.needs_encoder_decoder else {}  # only they read it
    return cls(cfg, tokenizer, splits, data_cfg, seed, **extra)
