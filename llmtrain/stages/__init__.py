"""Stages: each a short `run(cfg)` over (config, registry, trainer). The CLI maps verbs here."""
