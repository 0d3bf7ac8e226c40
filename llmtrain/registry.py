"""One registration mechanism for everything that is chosen by name in a config.

    @register("model", "gpt2")
    class GPT2(nn.Module): ...

    get("model", "gpt2")  # -> the class
"""
from __future__ import annotations

from typing import Any, Callable

from llmtrain.errors import UserError

_REGISTRY: dict[str, dict[str, Any]] = {}

KINDS = ("model", "objective", "task", "tokenizer", "eval_task", "logger")


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator: register `obj` under (kind, name). Re-registering a name is an error."""

    def deco(obj: Any) -> Any:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = obj
        return obj

    return deco


def _load_builtins() -> None:
    # Importing the packages runs their @register decorators.
    import llmtrain.models  # noqa: F401
    import llmtrain.objectives  # noqa: F401
    import llmtrain.tasks  # noqa: F401
    import llmtrain.tokenizers  # noqa: F401


def get(kind: str, name: str) -> Any:
    _load_builtins()
    table = _REGISTRY.get(kind, {})
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise UserError(f"unknown {kind} {name!r}; registered: {known}")
    return table[name]


def names(kind: str) -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY.get(kind, {}))
