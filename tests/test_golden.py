"""The restructure must not change what is trained: per-step losses of a 20-step gpt_small
pretrain and of 20-step fine-tunes (lm, classification) equal the fixture recorded on the code
before it (tests/golden_losses.py --write)."""

from __future__ import annotations

import json

import pytest

from golden_losses import FIXTURE, record

pytestmark = pytest.mark.slow


def test_losses_unchanged(tmp_path):
    expected = json.loads(FIXTURE.read_text())
    got = record(tmp_path)
    assert set(got) == set(expected)
    for name, losses in expected.items():
        assert len(got[name]) == len(losses) == 20, name
        assert got[name] == pytest.approx(losses, rel=1e-5, abs=1e-6), name
