"""conftest marks tests `slow` when they start the CLI, directly, through helpers or through fixtures."""

from __future__ import annotations

from conftest import ROOT, cli_running_names


def test_cli_use_is_found_through_helpers_fixtures_and_imports(tmp_path):
    (tmp_path / "helpers.py").write_text("from conftest import run_cli\n\ndef launch():\n    return run_cli('x')\n")
    (tmp_path / "test_mod.py").write_text(
        "import subprocess\nimport pytest\nfrom helpers import launch as go\n\n"
        "@pytest.fixture\ndef ckpt():\n    subprocess.run(['true'])\n\n"
        "def _twice():\n    go(); go()\n\n"
        "def test_direct():\n    _twice()\n\n"
        "def test_fixture(ckpt):\n    pass\n\n"
        "def test_pure(tmp_path):\n    assert tmp_path\n"
    )
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    names = cli_running_names(tmp_path / "test_mod.py")
    assert {"go", "ckpt", "_twice", "test_direct", "test_fixture"} <= names
    assert "test_pure" not in names and "launch" not in names


def test_the_suite_is_split_where_expected():
    cli = cli_running_names(ROOT / "tests" / "test_cli_config.py")
    assert "test_experiment_composes_and_overrides_apply" in cli  # runs the CLI through _cfg_job
    assert "pretrained" in cli_running_names(ROOT / "tests" / "conftest.py")
    assert "test_losses_unchanged" in cli_running_names(ROOT / "tests" / "test_golden.py")  # via golden_losses
    assert "test_build_tokenizer" not in cli_running_names(ROOT / "tests" / "test_tokenizers.py")
