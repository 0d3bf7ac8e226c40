"""Data mixtures (data.sources): windows drawn by weight as a function of (seed, step, rank), so
resuming is exact; per-source preparation, validation and token counts; bad mixtures refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED, TINY, run_cli
from llmtrain.config import register_configs
from llmtrain.config.compose import compose_run, hydra_session, validate
from llmtrain.data.corpus import TokenSplits
from llmtrain.data.mixture import MixedTokens, MixtureSchedule, MixtureSplits, MixtureWindows, default_name
from llmtrain.errors import UserError
from llmtrain.objectives import build_objective

register_configs()


def _mixed(sizes=(5000, 3000, 800), weights=(0.5, 0.3, 0.2)) -> MixedTokens:
    # Source i's tokens are 1000 * i + (position mod 1000): a row tells which source it came from.
    parts = [(np.arange(n) % 1000 + 1000 * i).astype(np.uint16) for i, n in enumerate(sizes)]
    w = np.asarray(weights, dtype=np.float64)
    return MixedTokens([f"s{i}" for i in range(len(sizes))], parts, w / w.sum())


# --------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("weights", [(0.7, 0.3), (5.0, 3.0, 2.0), (0.98, 0.01, 0.01)])
def test_observed_fractions_follow_the_weights(weights):
    shares = np.asarray(weights) / sum(weights)
    sched = MixtureSchedule(shares, seed=3)
    for n in (sched.block, 3 * sched.block, 10_000, 12_345):
        counts = sched.counts(n)
        assert counts.sum() == n
        assert np.abs(counts / n - shares).max() < 0.01, (n, counts)
    for b in (1, 7, 40):  # at block boundaries within two windows of the exact share
        assert np.abs(sched.counts(b * sched.block) - b * sched.block * shares).max() <= 2
    # The order within a block is random, not a fixed pattern: two seeds differ.
    g = np.arange(sched.block)
    assert not np.array_equal(sched.assign(g)[0], MixtureSchedule(shares, seed=4).assign(g)[0])


def test_windows_are_a_function_of_seed_step_and_rank():
    mixed = _mixed()
    a = MixtureWindows(mixed, 16, 8, seed=11)
    for step in range(200):  # walks several blocks (and epochs of the small source)
        a.batch(step)
    # A fresh sampler (as after a resume) gives the same batch at any step, bit for bit.
    fresh = MixtureWindows(_mixed(), 16, 8, seed=11)
    for step in (199, 3, 150):
        x, y = a.batch(step), fresh.batch(step)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a.batch(5)["input_ids"], MixtureWindows(_mixed(), 16, 8, seed=12).batch(5)["input_ids"])
    # Ranks read disjoint windows: rank r of 2 at step s reads what one process reads at 2s + r.
    for step in (0, 9):
        for rank in (0, 1):
            r = MixtureWindows(mixed, 16, 8, seed=11, rank=rank, world_size=2).batch(step)
            assert torch.equal(r["input_ids"], a.batch(2 * step + rank)["input_ids"])


def test_rows_come_from_their_drawn_source_each_seen_once_per_epoch():
    mixed = _mixed()
    T, B = 16, 8
    w = MixtureWindows(mixed, T, B, seed=5)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for step in range(60):
        src, number = w.assign(step)
        batch = w.batch(step)
        row_src = batch["input_ids"][:, 0] // 1000
        assert torch.equal(row_src, torch.from_numpy(src)), step  # the rows in the drawn order
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
        for s, k in zip(src.tolist(), number.tolist()):
            seen[s].append(k)
    for s, ks in seen.items():  # window numbers of a source run 0, 1, 2, ... with no gap or repeat
        assert ks == list(range(len(ks))) and ks, s
    # The small source (800 tokens, 48 windows of 16) went round more than once: still every
    # window once per epoch.
    small = w.sources[2]
    epoch = [small.window_start(k) for k in range(small.n_windows)]
    assert len(set(epoch)) == small.n_windows and len(seen[2]) > small.n_windows


def test_token_counts_per_source_match_the_windows_drawn():
    mixed = _mixed()
    w = MixtureWindows(mixed, 16, 4, seed=2, rank=1, world_size=2)
    other = MixtureWindows(mixed, 16, 4, seed=2, rank=0, world_size=2)
    drawn = np.zeros(3, dtype=np.int64)
    for step in range(300):
        for r in (other, w):
            drawn += np.bincount(r.assign(step)[0], minlength=3)
    assert drawn.tolist() == mixed.schedule(2).counts(300 * 2 * 4).tolist()


def _splits(mixed: MixedTokens) -> MixtureSplits:
    parts = [TokenSplits(train=t, val=t[:200], n_docs=1, val_bytes=200) for t in mixed.parts]
    return MixtureSplits(mixed.names, [0.5, 0.3, 0.2], parts)


def test_objectives_train_and_validate_per_source():
    with hydra_session("pretrain"):
        cfg = validate(compose_run("pretrain", ["data.seq_len=16", "data.batch_size=4"]))
    splits = _splits(_mixed())
    obj = build_objective(cfg.objective, None, splits, cfg.data, 7)
    batch = obj.train_source().batch(3)
    assert batch["input_ids"].shape == (4, 16)
    views = obj.val_sources()
    assert list(views) == ["s0", "s1", "s2"]
    for i, view in enumerate(views.values()):  # each view's validation reads its own source only
        rows = torch.cat([b["input_ids"][b["labels"] != -100] for b in view.val_batches()])  # not padding
        assert set((rows // 1000).unique().tolist()) == {i}
    seen = obj.windows_by_source(1000)
    assert sum(seen.values()) == 1000
    assert list(seen.values()) == splits.train.schedule(7).counts(1000).tolist()


def test_default_source_names():
    assert default_name("../shared/data/tinyshakespeare/input.txt") == "tinyshakespeare"
    assert default_name("data/wikitext2/valid.txt") == "wikitext2"
    assert default_name("books.txt.gz") == "books"
    assert default_name("hf:org/fine-web:sample@train") == "fine-web"
    assert default_name("corpora/code/*.jsonl") == "code"


# ------------------------------------------------------------------------------ bad configs
WIKI = str(SHARED / "wikitext2" / "valid.txt")
SHAKES = str(SHARED / "tinyshakespeare" / "input.txt")


def _refused(*overrides: str) -> str:
    with hydra_session("pretrain"), pytest.raises(UserError) as e:
        validate(compose_run("pretrain", list(overrides)))
    return str(e.value)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ([f"data.sources=[{{path: {WIKI}, weight: 1}}]"], "data.path"),  # data=shakespeare has a path
        (["data=mixture", "data.sources=[]"], "data.sources is empty"),
        (
            ["data=mixture", f"data.sources=[{{path: {WIKI}, weight: 0}}, {{path: {SHAKES}}}]"],
            "data.sources[0].weight=0",
        ),
        (
            ["data=mixture", f"data.sources=[{{path: {SHAKES}}}, {{path: {WIKI}, weight: -0.5}}]"],
            "data.sources[1].weight",
        ),
        (["data=mixture", "data.sources=[{path: no/such/file.txt, weight: 1}]"], "data.sources[0].path"),
        (["data=mixture", "data.sources=[{weight: 1}]"], "data.sources[0].path is missing"),
        (["data=mixture", f"data.sources=[{{path: {WIKI}}}, {{path: {WIKI}}}]"], "two sources are named"),
        (["data=mixture", f"data.sources=[{{path: {WIKI}, name: 'a b'}}]"], "data.sources[0].name"),
        (["data=mixture", f"data.sources=[{{path: {WIKI}}}]", f"data.val_path={WIKI}"], "data.val_path"),
        (["data=mixture", f"data.sources=[{{path: {WIKI}}}]", "model=bert_tiny", "objective=nsp"], "objective=nsp"),
        (["data=mixture"], "data.sources="),  # the preset leaves the sources to the user
    ],
)
def test_bad_mixture_is_one_line_naming_the_key(overrides, needle):
    msg = _refused(*overrides)
    assert needle in msg and "\n" not in msg, msg


def test_good_mixture_composes_typed():
    with hydra_session("pretrain"):
        cfg = validate(
            compose_run(
                "pretrain",
                [
                    "data=mixture",
                    f"data.sources=[{{path: {WIKI}, weight: 0.7}}, {{path: {SHAKES}, weight: 0.3, name: sh}}]",
                ],
            )
        )
    assert [(s.weight, s.name) for s in cfg.data.sources] == [(0.7, None), (0.3, "sh")] and cfg.data.path is None


# --------------------------------------------------------------------- preparation and resume
def _texts(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(Path(SHAKES).read_text()[:30_000])
    b.write_text("only in b: \u00e6\u00f8\u00e5\n" + Path(WIKI).read_text()[:20_000])
    return a, b


def test_each_source_is_prepared_as_its_own_data_path(tmp_path):
    from llmtrain.data.pipeline import load_corpus

    a, b = _texts(tmp_path)
    cache = tmp_path / "cache"
    with hydra_session("pretrain"):
        cfg = validate(
            compose_run(
                "pretrain",
                [
                    "data=mixture",
                    f"data.sources=[{{path: {a}, weight: 2}}, {{path: {b}, doc_pattern: '^ = [^=].* = $'}}]",
                    f"data.cache_dir={cache}",
                ],
            )
        )
    tok, splits = load_corpus(cfg)
    assert splits.names == ["a", "b"] and splits.train.shares.tolist() == pytest.approx([2 / 3, 1 / 3])
    # The char tokenizer was trained on both sources' training text: b's own characters are in it.
    assert tok.decode(tok.encode("\u00e6\u00f8\u00e5")) == "\u00e6\u00f8\u00e5"
    # b's own doc_pattern cut it into articles; a has the mixture's (none): one document.
    assert splits.parts[0].n_docs == 1 and splits.parts[1].n_docs > 1
    # Each source's splits are exactly what data.path=that source gives with the same tokenizer.
    for path, part, pattern in zip((a, b), splits.parts, (None, "^ = [^=].* = $")):
        own = dataclasses.replace(cfg.data, path=str(path), sources=None, doc_pattern=pattern)
        single = dataclasses.replace(cfg, data=own)
        _, alone = load_corpus(single, tokenizer=tok)
        for x, y in ((alone.train, part.train), (alone.val, part.val)):  # array-likes: compare slices
            assert len(x) == len(y) and np.array_equal(x[: len(x)], y[: len(y)])
    assert len(list((cache / "prepared").iterdir())) == 2  # and from the same cache entries


def _metrics(run: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec.pop("step"), {}).update(rec)
    return out


def test_resume_from_checkpoint_is_bit_exact_with_per_source_metrics(tmp_path):
    a, b = _texts(tmp_path)
    args = [
        "pretrain",
        *TINY,
        "data=mixture",
        f"data.sources=[{{path: {a}, weight: 0.7}}, {{path: {b}, weight: 0.3, name: wiki}}]",
        "trainer.max_steps=8",
        "trainer.ckpt_every=4",
        "trainer.eval_every=4",
        "trainer.log_every=2",
        "trainer.eval_batches=2",
        "scheduler.warmup_steps=2",
    ]
    ref = tmp_path / "ref"
    proc = run_cli(*args, f"hydra.run.dir={ref}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = _metrics(ref)
    last = want[8]
    for key in ("val/loss", "val/ppl", "val/loss/a", "val/loss/wiki", "val/ppl/wiki"):
        assert key in last, (key, sorted(last))
    # Overall = every validation target of both sources together: between the two.
    assert (
        min(last["val/loss/a"], last["val/loss/wiki"])
        <= last["val/loss"]
        <= max(last["val/loss/a"], last["val/loss/wiki"])
    )
    for step in (2, 4, 6, 8):
        tok = want[step]
        assert tok["train/tokens/a"] + tok["train/tokens/wiki"] == tok["train/tokens"]
    assert abs(last["train/tokens/a"] / last["train/tokens"] - 0.7) < 0.15

    # evaluate on the checkpoint alone scores each source's validation split as training did
    ev = tmp_path / "ev"
    proc = run_cli("evaluate", f"checkpoint={ref}", "trainer.eval_batches=2", f"hydra.run.dir={ev}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = json.loads((ev / "eval.json").read_text())
    for key in ("val/loss", "val/loss/a", "val/loss/wiki", "val/ppl/wiki"):
        assert scored[key] == pytest.approx(last[key], rel=1e-4), key
    assert scored["val/tokens"] == scored["val/tokens/a"] + scored["val/tokens/wiki"] > 0

    # A run that starts from the reference's step-4 checkpoint continues exactly as it did.
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_0000004", run / "checkpoints" / "step_0000004")
    proc = run_cli(*args, "trainer.resume=auto", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout + proc.stderr
    got = _metrics(run)
    for step in (6, 8):
        for key in want[step]:
            if not key.endswith(("tokens_per_s", "step_time_ms")):
                assert got[step][key] == want[step][key], (step, key)
    x, y = (
        load_file(run / "checkpoints" / "step_0000008" / "model.safetensors"),
        load_file(ref / "checkpoints" / "step_0000008" / "model.safetensors"),
    )
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
