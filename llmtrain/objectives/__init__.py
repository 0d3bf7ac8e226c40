"""Pretraining objectives, chosen by `objective.name`. See base.py for the contract."""
from llmtrain.objectives import clm, mlm, nsp  # noqa: F401  (registers)
from llmtrain.objectives.base import LossOutput, Objective

__all__ = ["LossOutput", "Objective"]
