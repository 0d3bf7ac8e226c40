"""Keys that moved into typed per-stage groups, and the keys that went.

Command line: an old flat spelling (`prompt=...`, `out=...`, `task.options.X=...`) is refused
with one line naming the new key (a removed key: one line saying so), before anything is
composed or written. Refused rather than mapped: a mapping would keep two spellings of every
key alive, to document and to test, and sweeps and scripts would never move to the new one.

Stored configs: checkpoints written before the move keep `options` dicts and dead keys in
meta["config"] and meta["task"]["config"]; `known_fields` reads such a section into today's
dataclass fields, so old checkpoints load unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmtrain.errors import fail

# Sampling keys that sat at the root: which group took them depends on the stage.
_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p")
_SAMPLING_GROUP = {"chat": "chat", "evaluate": "eval"}  # every other stage: generate

# Old key -> new key, whatever the stage.
MOVED: dict[str, str] = {
    "prompt": "generate.prompt",
    "num_samples": "generate.num_samples",
    "out": "export.out",
    "format": "export.format",
}

# Old key -> new key, for one stage only (elsewhere the old key still means what it meant).
MOVED_FOR_STAGE: dict[str, dict[str, str]] = {
    "chat": {"task.chat_template": "chat.template"},
    "embed": {"input": "embed.input", "out": "embed.out"},  # the stage's own group, as for export
}

# Keys nothing ever read: removed from the schema.
REMOVED = ("data.name", "data.num_workers", "trainer.sample_every", "extra")

# Untyped option dicts whose entries became typed fields of their group (task.X, eval.X).
OPTION_DICTS = ("task.options", "eval.options")


def _key(override: str) -> str:
    """The config key an override sets: `+prompt=x`, `++prompt=x`, `~prompt` all name `prompt`."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]  # group@package=option


def new_key(stage: str, key: str) -> str | None:
    """The key that replaced `key` for `stage`, or None if `key` did not move."""
    if key in MOVED_FOR_STAGE.get(stage, {}):
        return MOVED_FOR_STAGE[stage][key]
    if key in MOVED:
        return MOVED[key]
    if key in _SAMPLING:
        return f"{_SAMPLING_GROUP.get(stage, 'generate')}.{key}"
    for prefix in OPTION_DICTS:
        group = prefix.split(".")[0]
        if key == prefix:  # the whole dict at once: each entry is a field now
            return f"{group}.<option>"
        if key.startswith(prefix + "."):
            return f"{group}.{key[len(prefix) + 1 :]}"
    return None


def moved_key_error(stage: str, overrides: list[str]) -> str | None:
    """The one-line error for the first override that uses an old or removed key, or None."""
    for override in overrides:
        key = _key(override)
        new = new_key(stage, key)
        if new is not None:
            return f"{key!r} is now {new!r}"
        if any(key == k or key.startswith(k + ".") for k in REMOVED):
            return f"{key!r} was removed (nothing read it)"
    return None


def refuse_moved_keys(stage: str, overrides: list[str]) -> None:
    """Exit 2 with one line if an override uses an old spelling (called before composing)."""
    message = moved_key_error(stage, overrides)
    if message:
        fail(message)


def known_fields(cls: type, saved: dict[str, Any] | None) -> dict[str, Any]:
    """A stored config section as keyword arguments of `cls`: entries of an old `options` dict
    become the typed fields they turned into, and keys `cls` no longer has are dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    saved = dict(saved or {})
    options = saved.pop("options", None)
    lifted = {k: v for k, v in options.items() if k in names} if isinstance(options, dict) else {}
    return {**lifted, **{k: v for k, v in saved.items() if k in names}}
