"""Keys the schema does not have, refused with a "did you mean" suggestion.

Hydra merges the YAML tree onto the typed schema, so a misspelled key in a preset or a plain
`optim.lrr=1` fails while composing. `+key=value` and `++key=value` do not: Hydra adds them
with the struct flag lifted, and OmegaConf's conversion to the dataclasses then drops them
silently. So the composed job config is walked against the schema once more. The schema has no
open dicts; Hydra's own node (`hydra.*`: launcher, sweeper params) is not part of the job.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (the schema's annotations are strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def schema_class(dotted: str) -> type | None:
    """The dataclass of the group at `dotted` ("" = the root, "finetune.lora"), or None."""
    cls: Any = RunConfig
    for part in [p for p in dotted.split(".") if p]:
        hint = _fields(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if hint is None or not dataclasses.is_dataclass(hint):
            return None
        cls = hint
    return cls


def suggestion(dotted_key: str) -> str | None:
    """The closest existing key to a misspelled `dotted_key` (same group), or None."""
    group, _, name = dotted_key.rpartition(".")
    cls = schema_class(group)
    if cls is None:
        return None
    close = difflib.get_close_matches(name, list(_fields(cls)), n=1, cutoff=0.6)
    return f"{group}.{close[0]}" if group and close else (close[0] if close else None)


def unknown_key_message(dotted_key: str) -> str:
    hint = suggestion(dotted_key)
    group = dotted_key.rpartition(".")[0]
    where = f"group {group!r}" if group else "the root config"
    return f"unknown key {dotted_key!r}: {where} has no such key" + (f" (did you mean {hint!r}?)" if hint else "")


def with_suggestion(line: str) -> str:
    """Hydra's one-line "Could not override 'optim.lrr' ... not in ..." plus the closest key."""
    found = re.search(r"Could not override '([^']+)'.*not in", line)
    hint = suggestion(found.group(1)) if found else None
    return f"{line} (did you mean {hint!r}?)" if found and hint and hint != found.group(1) else line


def _unknown(node: dict, cls: type, prefix: str) -> str | None:
    fields = _fields(cls)
    for key, value in node.items():
        if prefix == "" and key == "hydra":
            continue
        dotted = f"{prefix}{key}"
        if key not in fields:
            return dotted
        if dataclasses.is_dataclass(fields[key]) and isinstance(value, dict):
            found = _unknown(value, fields[key], dotted + ".")
            if found:
                return found
    return None


def check_known_keys(cfg: DictConfig) -> None:
    """UserError naming the first key of `cfg` that the schema lacks (e.g. from `+optim.lrr=1`)."""
    raw = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    assert isinstance(raw, dict)
    found = _unknown(raw, RunConfig, "")
    if found:
        raise UserError(unknown_key_message(found))
