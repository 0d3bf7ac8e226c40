"""`llmtrain VERB --help`: each verb's own keys (with composed defaults) and the experiments that fit it."""

from __future__ import annotations

import dataclasses
import re

import pytest

from conftest import assert_user_error, run_cli
from llmtrain.config.schema import TaskConfig, TrainerConfig
from llmtrain.help import KEYS, VERBS, expand_keys, experiments_for


def _help(verb: str) -> str:
    proc = run_cli(*verb.split(), "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: llmtrain {verb} "), proc.stdout[:200]
    return proc.stdout


def _section(text: str, title: str) -> list[str]:
    """The first word of each indented line under a heading starting with `title`."""
    block = text.split("\n" + title, 1)[1].split("\n\n", 1)[0]
    return [ln.split()[0] for ln in block.splitlines()[1:] if ln.startswith("  ")]


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_lists_its_keys(verb):
    out = _help(verb)
    keys = expand_keys(verb)
    assert keys and _section(out, "Main keys") == keys
    block = out.split("\nMain keys", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert len(block) == len(keys)  # one line per key, even for a default like generate.prompt's "\n"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_listed_key_has_a_description(verb):
    assert [k for k in expand_keys(verb) if k not in KEYS] == []


def test_verbs_list_their_own_keys_not_others():
    ev = _section(_help("evaluate"), "Main keys")
    assert {"checkpoint", "eval.tasks", "task.val_path"} <= set(ev)
    assert "init_from" not in ev and "generate.prompt" not in ev
    gen = _section(_help("generate"), "Main keys")
    assert {
        "generate.prompt",
        "generate.max_new_tokens",
        "generate.temperature",
        "generate.top_k",
        "generate.top_p",
        "generate.num_samples",
    } <= set(gen)
    chat = _section(_help("chat"), "Main keys")
    assert {"chat.template", "chat.max_new_tokens", "chat.temperature"} <= set(chat)
    assert {"checkpoint", "export.out", "export.format"} <= set(_section(_help("export"), "Main keys"))


def test_finetune_lists_every_task_key_and_group():
    out = _help("finetune")
    keys = _section(out, "Main keys")
    assert {f"task.{f.name}" for f in dataclasses.fields(TaskConfig)} <= set(keys)
    assert "init_from" in keys
    assert re.search(r"^  task \(default lm\): .*classification", out, re.M)


def test_defaults_are_the_composed_ones():
    pre = _help("pretrain")
    assert re.search(rf"^  trainer\.max_steps .*\[{TrainerConfig().max_steps}\]$", pre, re.M)
    assert re.search(r"^  data\.seq_len .*\[64\]$", pre, re.M)  # data=shakespeare's, not the schema's 128
    assert re.search(r"^  eval\.tasks .*\[\[\]\]$", _help("evaluate"), re.M)  # evaluate.yaml's [], not [lm]


def test_experiments_fit_their_verbs():
    pre, ft = _section(_help("pretrain"), "Experiments"), _section(_help("finetune"), "Experiments")
    assert {"gpt_small", "gpt_shakespeare", "llama_small", "bert_small"} <= set(pre)
    assert {"finetune_sst2", "finetune_wikitext", "qa_squad", "sft_alpaca", "sft_dolly", "summarize_scitldr"} <= set(ft)
    assert not set(pre) & set(ft)
    assert "Experiments: none for this verb" in _help("generate")
    assert experiments_for("bench") == experiments_for("pretrain")
    assert experiments_for("evaluate") == experiments_for("export") == []
    # the rule matches Hydra: a fine-tuning preset does not compose for pretrain
    assert_user_error(
        run_cli("pretrain", "+experiment=finetune_sst2", "task.train_path=x", "--cfg", "job"),
        "Could not override 'task'",
    )
