"""Hugging Face interchange: our checkpoints load in transformers (Auto classes, no missing or
unexpected keys, same logits, same token ids) and transformers directories load as ours.
Everything is built locally from tiny random models; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from conftest import SHARED, TINY, assert_user_error, run_cli  # noqa: E402
from llmtrain import files  # noqa: E402
from llmtrain.checkpoints import checkpoint_meta, load as load_checkpoint  # noqa: E402
from llmtrain.config.schema import ExportConfig, ModelConfig, RunConfig, TokenizerConfig  # noqa: E402
from llmtrain.errors import UserError  # noqa: E402
from llmtrain.hf.export import export_hf  # noqa: E402
from llmtrain.models import build_model, resolve_model_config  # noqa: E402
from llmtrain.tokenizers.byte import ByteTokenizer  # noqa: E402
from llmtrain.tokenizers.char import CharTokenizer  # noqa: E402
from llmtrain.train.checkpoint import save_checkpoint  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
# newlines, tabs, runs of spaces, text outside the training characters (byte fallback / unk),
# and special-token look-alikes
TRICKY = "ROMEO:\n\tBut soft!  what   light?\n\n  héllo — 日本語 🤖 naïve 1234 <x> [CLS] a[SEP]b <s>\n"
# every special token's spelling typed in text (WikiText writes "<unk>"), and a byte piece's
SPECIALS = "= Valkyria <unk> = \n<s>a</s> <pad>[MASK]x <unk><unk> [CLS]b[SEP] <<s>> <0x41>\n"

OURS = {  # our architecture -> (extra ModelConfig fields, Auto class that must load the export)
    "gpt2": (dict(), "AutoModelForCausalLM"),
    "llama": (dict(bias=False, n_kv_heads=2, tie_embeddings=False), "AutoModelForCausalLM"),
    "bert": (dict(norm_eps=1e-12), "AutoModelForPreTraining"),
}


def shakespeare(n: int) -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")[:n]


def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Random biases / norms too: unit norms and zero biases would hide mapping bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def our_checkpoint(tmp_path: Path, arch: str, tokenizer) -> Path:
    """A tiny model of ours, saved as a pretrain checkpoint would be."""
    extra, _ = OURS[arch]
    cfg = resolve_model_config(
        ModelConfig(name=arch, n_layer=2, n_head=4, d_model=32, max_seq_len=48, **extra), tokenizer
    )
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size > tokenizer.vocab_size  # padded vocab
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    perturb(model)
    run_cfg = RunConfig(model=cfg)
    run_cfg.objective.name = "clm" if arch != "bert" else "mlm"
    return save_checkpoint(tmp_path / "run" / "checkpoints", 7, model, checkpoint_meta(run_cfg, cfg, tokenizer))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.prediction_logits


# ----------------------------------------------------------------------------- export
def make_tokenizer(kind: str, tmp_path: Path):
    if kind == "char":
        return CharTokenizer.train([shakespeare(20000)])
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("bpe", "wordpiece"):  # Hugging Face tokenizers, trained by llmtrain
        from llmtrain.tokenizers.hf_train import train_hf

        return train_hf([shakespeare(60000)], TokenizerConfig(name=kind, vocab_size=400, lowercase=True))
    from llmtrain.tokenizers.train import train_sentencepiece

    return train_sentencepiece(
        [shakespeare(60000)], TokenizerConfig(name="sentencepiece", vocab_size=400), tmp_path / "sp.model"
    )


# each architecture with another of our tokenizers, so all of them go through a full export
@pytest.mark.parametrize(
    "arch,tok_kind",
    [("gpt2", "char"), ("llama", "sentencepiece"), ("bert", "byte"), ("gpt2", "bpe"), ("bert", "wordpiece")],
)
def test_export_loads_with_auto_classes(tmp_path, arch, tok_kind):
    tok = make_tokenizer(tok_kind, tmp_path)
    ck = our_checkpoint(tmp_path, arch, tok)
    ours = load_checkpoint(str(ck))
    out = export_hf(ours, tmp_path / "export")
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / f).is_file(), f
    # one mode for every file, the weights too (safetensors alone would leave them 0600)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {files.file_mode()}

    auto = getattr(transformers, OURS[arch][1])
    hf, info = auto.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.vocab_size == ours.model_cfg.vocab_size  # the padded vocabulary
    hf.eval()

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = shakespeare(20000)[-300:] + TRICKY + SPECIALS
    ids = tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids  # no bos/eos added, same ids (unk included)
    assert hf_tok.pad_token_id == tok.pad_id and hf_tok.eos_token_id == tok.eos_id
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id and gen["pad_token_id"] == tok.pad_id

    x = torch.tensor([ids[:40], ids[40:80]])
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, x), ours.model(x), **TOL)
        if arch == "bert":
            h = ours.model.encode(x)
            torch.testing.assert_close(hf(input_ids=x).seq_relationship_logits, ours.model.nsp_logits(h), **TOL)

    # and back: hf:DIR gives our exact weights and tokenizer
    back = load_checkpoint(f"hf:{out}")
    assert back.tokenizer.state() == tok.state()
    assert back.model_cfg.vocab_size == ours.model_cfg.vocab_size
    theirs = back.model.state_dict()
    for k, v in ours.model.state_dict().items():
        assert torch.equal(theirs[k], v), k


def test_export_tokenizer_byte_and_sentencepiece(tmp_path):
    from llmtrain.hf.tokenizer import to_hf_tokenizer
    from llmtrain.tokenizers.train import train_sentencepiece

    text = shakespeare(60000)
    text_end = shakespeare(200000)[-4000:]
    toks = {"byte": ByteTokenizer()}
    for model_type in ("bpe", "unigram"):
        cfg = TokenizerConfig(name="sentencepiece", vocab_size=400, model_type=model_type)
        toks[model_type] = train_sentencepiece([text], cfg, tmp_path / f"sp_{model_type}.model")
    # a corpus that writes the specials itself (as WikiText writes "<unk>"): "<", ">" are pieces too
    cfg = TokenizerConfig(name="sentencepiece", vocab_size=400, model_type="unigram")
    toks["unigram, specials in the corpus"] = train_sentencepiece([text + SPECIALS * 50], cfg, tmp_path / "sp_u2.model")
    for name, tok in toks.items():
        sample = text_end + TRICKY + SPECIALS
        d = tmp_path / name.replace(" ", "_").replace(",", "")
        to_hf_tokenizer(tok).save_pretrained(str(d))
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
        ids = tok.encode(sample)
        if name != "byte":  # byte fallback really was needed, and newlines are their own piece
            assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)
            assert tok.sp.piece_to_id("\n") in ids
        assert hf_tok(sample)["input_ids"] == ids, name
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids), name


TASKS = {  # task -> (architecture, transformers class the export must load as, LoRA rank)
    "classification": ("bert", "BertForSequenceClassification", 4),
    "extractive_qa": ("bert", "BertForQuestionAnswering", 0),  # span QA needs an encoder
}


@pytest.mark.parametrize("task_name", list(TASKS))
def test_export_fine_tuned_task_model(tmp_path, task_name):
    """A fine-tuned head (LoRA adapters unmerged in the checkpoint) -> the matching HF class."""
    tasks = pytest.importorskip("llmtrain.tasks")
    from llmtrain.config.schema import DataConfig, LoraConfig, TaskConfig
    from llmtrain.models.lora import apply_lora
    from llmtrain.stages import export as export_stage

    arch, hf_cls, r = TASKS[task_name]
    tok = CharTokenizer.train([shakespeare(20000)])
    cfg = resolve_model_config(
        ModelConfig(name=arch, n_layer=2, n_head=4, d_model=32, max_seq_len=48, **OURS[arch][0]), tok
    )
    labels = ["neg", "neutral", "pos"]
    task = tasks.build_task(TaskConfig(name=task_name, labels=labels), tok, cfg, DataConfig())
    torch.manual_seed(0)
    model = task.build_model(build_model(cfg)).eval()
    meta = checkpoint_meta(RunConfig(model=cfg), cfg, tok)
    meta["task"] = tasks.task_meta(task)
    if r:
        lora = LoraConfig(r=r, targets=["attn"])
        apply_lora(model, lora)
        meta["lora"] = {"r": r, "alpha": lora.alpha, "dropout": 0.0, "targets": ["attn"], "merged": False}
    perturb(model)  # LoRA B starts at zero: perturbing makes the adapters matter
    ck = save_checkpoint(tmp_path / "ft" / "checkpoints", 3, model, meta)

    out = tmp_path / "export"
    export_stage.run(RunConfig(checkpoint=str(ck), export=ExportConfig(out=str(out))))
    hf, info = getattr(transformers, hf_cls).from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    x = torch.tensor([tok.encode(shakespeare(20000)[i : i + 30]) for i in (0, 500)])
    with torch.no_grad():
        ours = model(x)
        theirs = hf(input_ids=x)
    if task_name == "classification":
        torch.testing.assert_close(theirs.logits, ours, **TOL)
        assert [hf.config.id2label[i] for i in range(3)] == labels
    else:
        torch.testing.assert_close(theirs.start_logits, ours[0], **TOL)
        torch.testing.assert_close(theirs.end_logits, ours[1], **TOL)


# ----------------------------------------------------------------------------- import
def foreign_tokenizer(d: Path, kind: str):
    """A tokenizer as other projects ship them: GPT-2 style byte-level BPE, BERT WordPiece."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    text = shakespeare(30000).splitlines()
    if kind == "bert":
        t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        t.normalizer = normalizers.BertNormalizer(lowercase=True)
        t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        t.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
        t.post_processor = processors.BertProcessing(
            ("[SEP]", t.token_to_id("[SEP]")), ("[CLS]", t.token_to_id("[CLS]"))
        )
        t.decoder = decoders.WordPiece()
        kw = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        t.train_from_iterator(
            text,
            trainers.BpeTrainer(
                vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
            ),
        )
        kw = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, **kw)
    hf_tok.save_pretrained(str(d))
    return hf_tok


HF_MODELS = {
    "gpt2": lambda V: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=V, n_positions=40, n_embd=32, n_layer=2, n_head=4)
    ),
    "llama": lambda V: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=40,
            tie_word_embeddings=False,
        )
    ),
    "bert": lambda V: transformers.BertForPreTraining(
        transformers.BertConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
        )
    ),
}


@pytest.mark.parametrize("arch", list(HF_MODELS))
def test_import_hf_model_and_round_trip(tmp_path, arch):
    src = tmp_path / "hf_src"
    hf_tok = foreign_tokenizer(src, "bert" if arch == "bert" else "gpt2")
    torch.manual_seed(0)
    hf = HF_MODELS[arch](320).eval()
    perturb(hf, seed=1)
    hf.save_pretrained(str(src))

    loaded = load_checkpoint(f"hf:{src}")
    assert loaded.model_cfg.name == arch
    # the foreign tokenizer: HF's ids without its post-processor, special ids mapped
    text = shakespeare(40000)[-500:] + TRICKY
    ids = loaded.tokenizer.encode(text)
    assert loaded.tokenizer.name == "hf"
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    if arch == "bert":
        assert loaded.tokenizer.mask_id == hf_tok.mask_token_id and loaded.tokenizer.cls_id == hf_tok.cls_token_id
    else:
        assert loaded.tokenizer.eos_id == hf_tok.eos_token_id

    x = torch.tensor([ids[:30], ids[30:60]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), hf_logits(hf, x), **TOL)

    # HF -> llmtrain -> HF: identical tensors, tokenizer included
    out = export_hf(loaded, tmp_path / "hf_out")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    again = transformers.AutoTokenizer.from_pretrained(str(out))
    assert again(text, add_special_tokens=False)["input_ids"] == ids


def test_unsupported_and_missing(tmp_path):
    d = tmp_path / "bart"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bart", "d_model": 32}))
    with pytest.raises(UserError, match=r"unsupported architecture 'bart'.*gpt2, llama, bert, t5"):
        load_checkpoint(f"hf:{d}")
    (d / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))  # T5 v1.0: relu MLP
    with pytest.raises(UserError, match=r"unsupported t5 variant .*gated-gelu"):
        load_checkpoint(f"hf:{d}")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(UserError, match="no config.json"):
        load_checkpoint(f"hf:{tmp_path}")


def test_export_never_clobbers(tmp_path, monkeypatch):
    import llmtrain.hf.export as exp

    tok = CharTokenizer.train([shakespeare(5000)])
    loaded = load_checkpoint(str(our_checkpoint(tmp_path, "gpt2", tok)))
    # a directory that is not an export is refused, and left alone
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an llmtrain export"):
        export_hf(loaded, other)
    assert (other / "notes.txt").read_text() == "keep me"
    # a failed re-export keeps the previous good export and leaves no temp dirs
    out = export_hf(loaded, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(exp, "hf_model", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_hf(loaded, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ----------------------------------------------------------------------------- CLI
def _evaluate_accepts_hf() -> bool:
    import inspect

    import llmtrain.stages.evaluate as ev

    return "hf:" in inspect.getsource(ev) or "HF_PREFIX" in inspect.getsource(ev)


def test_cli_export_then_finetune_and_evaluate_from_hf(tmp_path):
    tok = CharTokenizer.train([shakespeare(100000)])
    ck = our_checkpoint(tmp_path, "gpt2", tok)
    out = tmp_path / "export"
    p = run_cli("export", f"checkpoint={ck.parents[1]}", f"export.out={out}")  # a run dir -> its newest checkpoint
    assert p.returncode == 0, p.stderr[-2000:]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info

    small = tmp_path / "small.txt"
    small.write_text(shakespeare(30000), encoding="utf-8")
    p = run_cli(
        "finetune",
        f"init_from=hf:{out}",
        *TINY,
        "data=text",
        f"data.path={small}",
        "trainer.max_steps=3",
        "trainer.eval_every=3",
        f"hydra.run.dir={tmp_path / 'ft'}",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "initialised from" in p.stdout and list((tmp_path / "ft" / "checkpoints").glob("step_*"))

    bad = tmp_path / "opt"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "opt"}))
    assert_user_error(
        run_cli("finetune", f"init_from=hf:{bad}", f"hydra.run.dir={tmp_path / 'ft2'}"), "'opt'", "gpt2, llama, bert"
    )

    if not _evaluate_accepts_hf():
        pytest.skip(
            "llmtrain/stages/evaluate.py resolves checkpoint= itself and does not route hf: "
            "to load_checkpoint yet (see the HF interchange notes)"
        )
    p = run_cli(
        "evaluate",
        f"checkpoint=hf:{out}",
        "trainer.eval_batches=2",
        "data=text",
        f"data.path={small}",
        f"hydra.run.dir={tmp_path / 'ev'}",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["eval/loss"] > 0  # all of data.path


def test_export_stage_and_hub_errors(tmp_path, monkeypatch):
    from llmtrain.stages import export as export_stage

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="someorg/somemodel.*not a local directory"):
        load_checkpoint("hf:someorg/somemodel")
    with pytest.raises(UserError, match="format='onnx'"):
        export_stage.run(
            RunConfig(checkpoint=str(tmp_path), export=ExportConfig(out=str(tmp_path / "x"), format="onnx"))
        )
    with pytest.raises(UserError, match="out=DIR"):
        export_stage.run(RunConfig(checkpoint=str(tmp_path)))
