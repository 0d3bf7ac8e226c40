"""Every `llmtrain VERB ...` example in the README composes and validates against the real conf/
tree (in process, so it is fast): a renamed key, a moved preset or a misspelled group in the
README fails here. The dataset paths point at the test data; checkpoints need not exist, since
composing does not read them."""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import ROOT, SHARED
from llmtrain.cli import STAGES
from llmtrain.config import compose, register_configs
from llmtrain.config.moved_keys import moved_key_error

HYDRA_FLAGS = {"-m", "--multirun", "--cfg", "job", "--help"}


def readme_commands() -> list[str]:
    """`llmtrain ...` lines of the README's bash blocks, continuations joined, comments cut."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            m = re.search(r"(?:^|\s|/)(?:-m )?llmtrain (.*)$", line)
            if m and not line.startswith(("make", "pip", "cd ")):
                commands.append(m.group(1).strip())
    return commands


def _verb(words: list[str]) -> tuple[str | None, list[str]]:
    for n in (2, 1):
        if " ".join(words[:n]) in STAGES:
            return " ".join(words[:n]), words[n:]
    return None, words


def test_readme_has_examples_for_every_verb():
    verbs = {_verb(shlex.split(c))[0] for c in readme_commands()}
    assert set(STAGES) - {"bench"} <= verbs | {"bench"}, set(STAGES) - verbs
    assert "bench" in verbs


@pytest.mark.parametrize("command", readme_commands())
def test_readme_example_composes(command):
    words = shlex.split(command.replace("../shared/data", str(SHARED)))
    verb, args = _verb(words)
    if verb is None:  # `llmtrain plot DIR ...` takes paths, not overrides
        assert words[0] == "plot", command
        return
    overrides = [a for a in args if a not in HYDRA_FLAGS and not a.startswith("-")]
    assert moved_key_error(verb, overrides) is None, command
    sweep = "-m" in args or "--multirun" in args
    single = compose.sweep_first_values(overrides) if sweep else overrides
    register_configs()
    with compose.hydra_session(verb.replace(" ", "_")):
        compose.validate(compose.compose_run(verb.replace(" ", "_"), single))


PATH_KEYS = ("data.path", "task.train_path", "task.val_path", "tokenizer.path", "checkpoint", "init_from")


def test_readme_examples_name_files_that_exist_or_capital_placeholders():
    """Copy-pasteable: each file or run a command names is bundled, in ../shared/data, made by an
    earlier README command (hydra.run.dir, export.out), or a placeholder in CAPITALS."""
    made: set[str] = set()
    for command in readme_commands():
        words = shlex.split(command)
        for w in words:
            key, eq, value = w.partition("=")
            key = key.lstrip("+~")
            value = value.removeprefix("hf:")
            if not eq or key not in PATH_KEYS or re.fullmatch(r"[A-Z_]+(/.*)?", value):
                continue
            if value.startswith("../shared/data/"):
                assert (SHARED / value.removeprefix("../shared/data/")).exists(), command
            elif key in ("tokenizer.path",) and value.rsplit("/", 1)[0] in made:
                continue  # a file inside a run directory an earlier command makes
            else:
                assert value in made, f"{value!r} is neither a shared file nor made above: {command}"
        for w in words:
            key, _, value = w.partition("=")
            if key in ("hydra.run.dir", "export.out"):
                made.add(value)
        if words[0] == "plot":
            assert all(w in made for w in words[1:] if not w.startswith("-")), command
