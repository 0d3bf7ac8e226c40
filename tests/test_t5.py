"""The t5 encoder-decoder: HF parity and export, span corruption and denoising batches, cached
and beam-search generation, seq2seq data errors, resume of span_corruption."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from conftest import SHARED, assert_user_error, run_cli
from llmtrain.config.schema import DataConfig, ModelConfig, ObjectiveConfig, RunConfig, TaskConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.errors import UserError
from llmtrain.generation import generate
from llmtrain.models import build_model, resolve_model_config
from llmtrain.objectives import build_objective
from llmtrain.objectives.span_corruption import (
    compute_input_and_target_lengths,
    corrupt,
    random_spans_noise_mask,
)
from llmtrain.tokenizers.char import CharTokenizer

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=1e-5)
TEXT = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20000]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        name="t5",
        n_layer=2,
        n_head=4,
        d_model=32,
        d_ff=48,
        vocab_size=128,
        bias=False,
        tie_embeddings=False,
        norm_eps=1e-6,
        relative_buckets=8,
        relative_max_distance=20,
    )
    return ModelConfig(**{**base, **kw})


def perturbed(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():  # norms away from 1: a swapped norm would show
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


# ----------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("tied", [False, True])
def test_logits_and_state_dict_match_hf_t5(tied):
    from llmtrain.models import t5

    cfg = tiny_cfg(tie_embeddings=tied, head_dim=12)  # d_kv * heads != d_model, as t5-v1_1-small
    ours = perturbed(cfg)
    hf = transformers.T5ForConditionalGeneration(t5.hf_config(cfg)).eval()
    t5.prepare_hf_model(hf, cfg)
    result = hf.load_state_dict(t5.to_hf_state_dict(ours.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randint(0, 128, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 19:] = 0  # padding in the encoder input
    y = torch.randint(0, 128, (2, 25))
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, mask, y), hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits, **TOL
        )
    back = t5.from_hf_state_dict(dict(hf.state_dict()))
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    back_cfg = t5.config_from_hf(t5.hf_config(cfg))
    assert dataclasses.replace(back_cfg, max_seq_len=cfg.max_seq_len) == cfg  # T5 has no position limit


def test_export_then_transformers_generates_our_greedy_tokens(tmp_path):
    from llmtrain.checkpoints import checkpoint_meta, load as load_checkpoint
    from llmtrain.hf.export import export_hf
    from llmtrain.train.checkpoint import save_checkpoint

    tok = CharTokenizer.train([TEXT])
    cfg = resolve_model_config(tiny_cfg(vocab_size=0, extra_ids=10), tok)
    assert cfg.vocab_size >= tok.vocab_size + 10
    model = perturbed(cfg)
    run_cfg = RunConfig(model=cfg)
    run_cfg.objective.name = "span_corruption"
    ck = save_checkpoint(tmp_path / "run" / "checkpoints", 3, model, checkpoint_meta(run_cfg, cfg, tok))
    ours = load_checkpoint(str(ck))
    out = export_hf(ours, tmp_path / "export")

    hf, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    top = tok.vocab_size + 9  # <extra_id_0>: the highest sentinel, as T5
    assert hf_tok.convert_tokens_to_ids("<extra_id_0>") == top
    assert hf_tok.convert_tokens_to_ids("<extra_id_9>") == tok.vocab_size
    src = tok.encode("ROMEO: But soft, what light") + [tok.eos_id]
    assert hf_tok("ROMEO: But soft, what light")["input_ids"] == src[:-1]

    ids = torch.tensor([src])
    y = torch.tensor([[tok.pad_id, 5, 9, top, 11]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, decoder_input_ids=y).logits, ours.model(ids, None, y), **TOL)
    mine = generate(ours.model, [src], max_new_tokens=12, temperature=0, eos_id=None)
    assert len(mine.tokens[0]) == 12
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, num_beams=1, eos_token_id=None, min_new_tokens=12)
    assert theirs[0, 0].item() == tok.pad_id  # transformers starts the decoder with pad, as ours
    assert theirs[0, 1:].tolist() == mine.tokens[0]

    from llmtrain.tokenizers.hf import HFTokenizer

    foreign = HFTokenizer.from_pretrained(str(out))  # the sentinels inside its vocabulary, as a T5 directory's
    obj, _ = _objective("span_corruption", foreign, extra_ids=10)
    assert obj.top_sentinel == top == foreign.piece_id("<extra_id_0>")
    back = load_checkpoint(f"hf:{out}")
    assert back.model_cfg.extra_ids == 10 and back.tokenizer.state() == tok.state()
    assert all(torch.equal(back.model.state_dict()[k], v) for k, v in ours.model.state_dict().items())


# ----------------------------------------------------------------------------- span corruption
@pytest.mark.parametrize("length", [20, 57, 100, 568])
def test_noise_mask_has_exact_density_and_span_count(length):
    for seed in range(5):
        mask = random_spans_noise_mask(length, 0.15, 3.0, torch.Generator().manual_seed(seed))
        n_noise = min(max(round(length * 0.15), 1), length - 1)
        assert int(mask.sum()) == n_noise
        starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])
        assert int(starts.sum()) == max(round(n_noise / 3.0), 1)
        assert not mask[0] and mask[-1]  # T5: non-noise first, the last span is noise


def test_t5_lengths_and_sentinel_layout():
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)  # T5 / HF run_t5_mlm_flax
    tokens = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17])
    mask = torch.tensor([0, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    inputs, targets = corrupt(tokens, mask, top_sentinel=99, eos_id=1)
    # noise spans -> sentinels 99, 98 (<extra_id_0>, <extra_id_1>); targets: each span after its sentinel
    assert inputs.tolist() == [10, 11, 99, 14, 15, 98, 17, 1]
    assert targets.tolist() == [99, 12, 13, 98, 16, 97, 1]


def _objective(name: str, tok, seq_len: int = 64, extra_ids: int = 20, **ocfg):
    ids = torch.tensor(tok.encode(TEXT), dtype=torch.int64).numpy()
    splits = TokenSplits(train=ids[:15000], val=ids[15000:], n_docs=1, val_bytes=1)
    model_cfg = resolve_model_config(tiny_cfg(vocab_size=0, extra_ids=extra_ids), tok)
    data = DataConfig(seq_len=seq_len, batch_size=4)
    obj = build_objective(ObjectiveConfig(name=name, **ocfg), tok, splits, data, 7, model_cfg)
    return obj, model_cfg


def test_span_corruption_batches_pack_exactly_and_repeat_by_step():
    tok = CharTokenizer.train([TEXT])
    obj, model_cfg = _objective("span_corruption", tok)
    tokens_len, targets_len = compute_input_and_target_lengths(64, 0.15, 3.0)
    src = obj.train_source(0, 1)
    b = src.batch(3)
    assert b["input_ids"].shape == (4, 64) and b["labels"].shape == (4, targets_len)
    assert "attention_mask" not in b and (b["labels"] != -100).all()  # no padding anywhere
    assert (b["decoder_input_ids"][:, 0] == tok.pad_id).all()
    assert torch.equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
    top = tok.vocab_size + 19
    for x, y in zip(b["input_ids"], b["labels"]):
        sx = x[x >= tok.vocab_size]
        assert sx.tolist() == list(range(top, top - len(sx), -1))  # in order, one per span
        n_raw = int((x < tok.vocab_size).sum()) - 1 + int((y < tok.vocab_size).sum()) - 1  # minus the two eos
        assert n_raw == tokens_len
    again = obj.train_source(0, 1).batch(3)  # a fresh source (a resumed run): the same batch
    assert all(torch.equal(b[k], again[k]) for k in b)
    assert not torch.equal(b["input_ids"], src.batch(4)["input_ids"])
    model = build_model(model_cfg)
    out = obj.loss(model, b)
    assert out.n_targets == 4 * targets_len and torch.isfinite(out.loss)
    val = list(obj.val_batches(max_batches=2))
    assert len(val) == 2 and val[0]["input_ids"].shape[1] <= 64


def test_span_corruption_needs_enough_sentinels():
    tok = CharTokenizer.train([TEXT])
    with pytest.raises(UserError, match="extra_ids"):
        _objective("span_corruption", tok, seq_len=128, extra_ids=2)


@pytest.mark.parametrize("permute", [False, True])
def test_denoising_target_is_the_clean_window(permute):
    tok = CharTokenizer.train([TEXT])
    obj, model_cfg = _objective("denoising", tok, noise_density=0.3, permute_sentences=permute)
    src = obj.train_source(0, 1)
    windows = src.windows.batch(2)
    clean = torch.cat([windows["input_ids"], windows["labels"][:, -1:]], dim=1)
    b = src.batch(2)
    eos = torch.full((4, 1), tok.eos_id)
    assert torch.equal(b["labels"], torch.cat([clean, eos], dim=1))  # the decoder reconstructs the original
    for x, c in zip(b["input_ids"], clean):
        x = x[x != tok.pad_id]
        assert (x == tok.mask_id).any() and len(x) < len(c)  # spans became single [MASK] tokens
        kept = x[x != tok.mask_id]
        if not permute:  # the unmasked tokens are the clean window's, in order
            it = iter(c.tolist())
            assert all(any(t == u for u in it) for t in kept.tolist())
    assert torch.isfinite(obj.loss(build_model(model_cfg), b).loss)


def test_objective_and_architecture_must_fit():
    from llmtrain.config import validate_config

    def cfg(model: str, objective: str) -> RunConfig:
        c = RunConfig(stage="pretrain")
        c.model.name, c.objective.name, c.data.path = model, objective, "x.txt"
        c.data.seq_len = 32
        return c

    for model, objective, needle in [
        ("t5", "clm", "encoder-decoder"),
        ("t5", "mlm", "span_corruption"),
        ("gpt2", "span_corruption", "needs an encoder-decoder"),
        ("bert", "denoising", "needs an encoder-decoder"),
    ]:
        with pytest.raises(UserError, match=needle):
            validate_config(cfg(model, objective))
    validate_config(cfg("t5", "span_corruption"))


# ----------------------------------------------------------------------------- generation
def test_cached_decoding_equals_uncached_logits():
    cfg = tiny_cfg()
    m = perturbed(cfg)
    x = torch.randint(0, 128, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, 7:] = 0
    y = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        full = m(x, mask, y)
        memory = m.encode(x, mask)
        cross, cache = m.cross_kv(memory), m.new_kv_cache(2, 9)
        steps = [m.lm_logits(m.decode(y[:, :3], memory_mask=mask, kv_cache=cache, cross_kv=cross))]
        steps += [
            m.lm_logits(m.decode(y[:, t : t + 1], memory_mask=mask, kv_cache=cache, cross_kv=cross))
            for t in range(3, 9)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    prompts = [x[0, :7].tolist(), x[1].tolist()]
    a = generate(m, prompts, max_new_tokens=10, temperature=0, eos_id=None)
    b = generate(m, prompts, max_new_tokens=10, temperature=0, eos_id=None, use_cache=False)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 10


def _sequence_logprob(model, prompt, new) -> float:
    if getattr(model, "is_encoder_decoder", False):
        dec = torch.tensor([[0] + new[:-1]])
        logits = model(torch.tensor([prompt]), None, dec)[0]
    else:
        ids = torch.tensor([prompt + new[:-1]])
        logits = model(ids)[0, len(prompt) - 1 :]
    logp = torch.log_softmax(logits.float(), -1)
    return float(logp[torch.arange(len(new)), torch.tensor(new)].sum())


@pytest.mark.parametrize("arch", ["t5", "llama", "gpt2"])
def test_beam_search_with_one_beam_is_greedy(arch):
    from llmtrain.generation import beam_search

    cfg = tiny_cfg() if arch == "t5" else ModelConfig(name=arch, n_layer=2, d_model=32, vocab_size=128, max_seq_len=64)
    m = perturbed(cfg, seed=1)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 3]]
    for eos in (None, 4):
        greedy = generate(m, prompts, max_new_tokens=12, temperature=0, eos_id=eos)
        assert beam_search(m, prompts, 12, eos, 0, [], None, num_beams=1) == greedy.tokens
    greedy = generate(m, prompts, max_new_tokens=12, temperature=0, eos_id=None).tokens
    # more beams find a sequence at least as likely as greedy's (no eos: equal lengths)
    four = generate(m, prompts, max_new_tokens=12, eos_id=None, num_beams=4).tokens
    with torch.no_grad():
        for p, g, b in zip(prompts, greedy, four):
            assert len(b) == 12
            assert _sequence_logprob(m, p, b) >= _sequence_logprob(m, p, g) - 1e-5


# ----------------------------------------------------------------------------- seq2seq data
def _seq2seq_task(tmp_path, content: str, suffix: str, model: ModelConfig | None = None, **kw):
    from llmtrain.tasks import build_task

    f = tmp_path / f"train{suffix}"
    f.write_text(content)
    tok = CharTokenizer.train([TEXT])
    cfg = TaskConfig(name="seq2seq", train_path=str(f), **kw)
    model_cfg = resolve_model_config(model or tiny_cfg(vocab_size=0, max_seq_len=64), tok)
    return build_task(cfg, tok, model_cfg, DataConfig(seq_len=32, batch_size=2, val_fraction=0.5)), model_cfg


def test_seq2seq_reads_csv_and_jsonl_and_trains_t5(tmp_path):
    task, model_cfg = _seq2seq_task(tmp_path, "source,target\nhello there,hi\ngood night,bye\nwhat light,sun\n", ".csv")
    batch = task.train_source().batch(0)
    assert set(batch) >= {"input_ids", "decoder_input_ids", "labels"}
    assert (batch["input_ids"] == task.tokenizer.eos_id).any(dim=1).all()  # the source ends with </s>
    out = task.loss(build_model(model_cfg), batch)
    assert torch.isfinite(out.loss) and out.n_targets > 0
    task2, _ = _seq2seq_task(
        tmp_path,
        '{"src": "a b", "tgt": "c"}\n{"src": "d e", "tgt": "f"}\n',
        ".jsonl",
        source_field="src",
        target_field="tgt",
    )
    assert len(task2.train_examples()) == 1 and task2.train_examples()[0]["tgt"][-1] == task2.tokenizer.eos_id
    # the same file on a decoder: "{source}{prompt_suffix}{target}</s>", loss on the target only
    llama = ModelConfig(name="llama", n_layer=1, d_model=32, max_seq_len=64, bias=False)
    dec, dec_cfg = _seq2seq_task(tmp_path, "source,target\nhello there,hi\ngood night,bye\n", ".csv", llama)
    b = dec.train_source().batch(0)
    assert "decoder_input_ids" not in b and torch.isfinite(dec.loss(build_model(dec_cfg), b).loss)
    assert dec.tokenizer.decode(dec.train_examples()[0]["prompt"]).endswith(dec.cfg.prompt_suffix)


@pytest.mark.parametrize(
    "content,suffix,needle",
    [
        ('{"source": "a"}\n{"source": "b", "target": "c"}\n', ".jsonl", "no field 'target'"),
        ('{"source": "a", "target": "b"\n', ".jsonl", "not valid JSON"),
        ("", ".tsv", "empty file"),
        ('{"source": "", "target": "x"}\n{"source": "y", "target": "x"}\n', ".jsonl", "empty 'source'"),
        ("a,b\n", ".xml", "unsupported file type"),
    ],
)
def test_bad_seq2seq_files_are_one_line_errors(tmp_path, content, suffix, needle):
    with pytest.raises(UserError, match=needle) as e:
        _seq2seq_task(tmp_path, content, suffix)[0].train_examples()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- CLI
# the bundled Tiny Shakespeare: its prepared shards are shared with the other tests' runs
COMMON = [
    "pretrain", "model=t5_tiny", "objective=span_corruption", "data.seq_len=32", "data.batch_size=4",
    "trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.log_every=1", "trainer.eval_every=0",
    "trainer.eval_batches=1", "trainer.progress=false", "scheduler.name=constant", "scheduler.warmup_steps=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    ref = tmp_path_factory.mktemp("t5") / "ref"
    proc = run_cli(*COMMON, f"hydra.run.dir={ref}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ref


def test_cli_bad_seq2seq_file_exit_2(t5_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "x", "target": "y"}\n{"source": "x"}\n{"source": "z", "target": "w"}\n')
    proc = run_cli("finetune", "task=seq2seq", f"init_from={t5_run}", f"task.train_path={bad}")
    assert_user_error(proc, "bad.jsonl", "record 2", "'target'")


def test_span_corruption_resume_is_bit_exact(t5_run, tmp_path):
    ref = t5_run
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step_0000006")  # as if killed after step 3's save
    proc = run_cli(*COMMON, "trainer.resume=auto", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout + proc.stderr

    def losses(d):
        recs = map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}

    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6] and losses(run) == losses(ref)
    from safetensors.torch import load_file

    a = load_file(run / "checkpoints" / "step_0000006" / "model.safetensors")
    b = load_file(ref / "checkpoints" / "step_0000006" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chat_answers_each_line_of_a_t5_checkpoint_from_its_encoder(t5_run, tmp_path, monkeypatch, capsys):
    """chat on an encoder-decoder: every line alone is the encoder input (no history), and the
    reply is the same greedy decoding as generate() from that input."""
    import io

    from llmtrain.checkpoints import load
    from llmtrain.stages import chat

    monkeypatch.chdir(tmp_path)
    turns = ["ROMEO:", "Good morrow, cousin.", "ROMEO:"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join([*turns, "/exit", "never answered"]) + "\n"))
    cfg = RunConfig(stage="chat", checkpoint=str(t5_run))
    cfg.chat.temperature, cfg.chat.max_new_tokens, cfg.trainer.threads = 0.0, 8, torch.get_num_threads()
    chat.run(cfg)
    out, err = capsys.readouterr()
    assert "encoder-decoder: each line is the encoder input" in err

    loaded = load(str(t5_run))
    tok = loaded.tokenizer
    want = []
    for text in turns:
        res = generate(loaded.model, [tok.encode(text) + [tok.eos_id]], max_new_tokens=8, temperature=0.0,
                       eos_id=tok.eos_id, pad_id=tok.pad_id or 0)  # fmt: skip
        want.append(tok.decode(res.tokens[0]).strip() + "\n")
    assert out.splitlines(keepends=True) == want and want[0] == want[2]


def test_bench_times_the_t5_span_corruption_step(tmp_path, monkeypatch):
    from llmtrain.stages import bench

    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(stage="bench")
    cfg.model, cfg.trainer.threads = tiny_cfg(vocab_size=0, extra_ids=8), torch.get_num_threads()
    cfg.data.seq_len, cfg.data.batch_size = 32, 2
    cfg.bench.steps, cfg.bench.warmup, cfg.bench.rounds, cfg.bench.out = 2, 0, 1, str(tmp_path / "b.json")
    tokens_per_s = bench.run(cfg)
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["model"] == "t5" and r["seq_len"] == 32 and r["tokens_per_s"] == pytest.approx(tokens_per_s)
    assert r["tokens_per_s"] == pytest.approx(2 * 32 / (r["step_ms"] / 1000))
    assert r["baseline_tokens_per_s"] == pytest.approx(2 * 32 / (r["baseline_step_ms"] / 1000))
