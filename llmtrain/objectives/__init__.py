"""Pretraining objectives, chosen by `objective.name`. See base.py for the contract."""
from llmtrain import registry
from llmtrain.objectives import clm, mlm, nsp  # noqa: F401  (registers)
from llmtrain.objectives.base import LossOutput, Objective

__all__ = ["LossOutput", "Objective", "objective_class"]


def objective_class(name: str) -> type[Objective]:
    """The registered objective `name` (its class attributes, without building it)."""
    return registry.get("objective", name)
