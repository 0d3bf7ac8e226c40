"""One registration mechanism for everything that is chosen by name in a config.

    @register("model", "gpt2")
    class GPT2(nn.Module): ...

    get("model", "gpt2")  # -> the class

The bottom layer: it imports no plugin package. Each package registers its plugins when it is
imported, and callers go through the package's builder (llmtrain.models.build_model,
llmtrain.objectives.build_objective, llmtrain.tasks.build_task, llmtrain.tokenizers.build_tokenizer),
which imports the package and so its registrations.
"""

from __future__ import annotations

from typing import Any, Callable

from llmtrain.errors import UserError

_REGISTRY: dict[str, dict[str, Any]] = {}

KINDS = ("model", "objective", "task", "tokenizer")


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator: register `obj` under (kind, name). Re-registering a name is an error."""

    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")

    def deco(obj: Any) -> Any:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = obj
        return obj

    return deco


def get(kind: str, name: str) -> Any:
    table = _REGISTRY.get(kind, {})
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise UserError(f"unknown {kind} {name!r}; registered: {known}")
    return table[name]


def names(kind: str) -> list[str]:
    return sorted(_REGISTRY.get(kind, {}))
