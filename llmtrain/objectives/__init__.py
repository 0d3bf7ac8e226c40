"""Pretraining objectives, chosen by `objective.name`. See base.py for the contract."""
from __future__ import annotations

from llmtrain.config.schema import DataConfig, ObjectiveConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.objectives import clm, mlm, nsp  # noqa: F401  (registers)
from llmtrain.objectives.base import LossOutput, Objective, Trainee
from llmtrain.tokenizers import Tokenizer

__all__ = ["LossOutput", "Objective", "Trainee", "build_objective"]


def build_objective(cfg: ObjectiveConfig, tokenizer: Tokenizer, splits: TokenSplits, data_cfg: DataConfig,
                    seed: int) -> Objective:
    """The registered objective `cfg.name`, bound to its token splits, data config and seed."""
    from llmtrain.registry import get

    return get("objective", cfg.name)(cfg, tokenizer, splits, data_cfg, seed)
