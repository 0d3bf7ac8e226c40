"""Load a transformers model directory (GPT-2, LLaMA or BERT) as one of our registry models with
its tokenizer: `init_from=hf:DIR` (finetune) and `checkpoint=hf:DIR` (evaluate, generate).

The tokenizer is our own when the directory was exported by llmtrain (llmtrain_tokenizer.json,
exact round trip), otherwise the directory's HF tokenizer wrapped as tokenizer `hf`.
Weights are read from safetensors (or pytorch_model.bin with torch.load(weights_only=True)).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from llmtrain.checkpoints import Info, Loaded
from llmtrain.config.schema import DataConfig, ModelConfig, RunConfig
from llmtrain.errors import UserError
from llmtrain.hf import ARCHS, BY_MODEL_TYPE, HF_PREFIX
from llmtrain.hf.tokenizer import SIDE_FILE
from llmtrain.tokenizers import Tokenizer, tokenizer_from_state

# Weights our model has that some HF classes lack (BertForMaskedLM has no pooler / NSP head,
# BertModel no MLM head): these start from our init, with a note on stderr.
OPTIONAL_HEADS = ("pooler.", "nsp.", "mlm_dense.", "mlm_norm.", "mlm_decoder.")
# HF weights that belong to task heads we do not load (sequence classification, QA)
IGNORED_HF = ("classifier.", "score.", "qa_outputs.")


def resolve_dir(spec: str) -> Path:
    """hf:DIR -> DIR; a Hub id is only fetched from the local HF cache (no network here)."""
    name = spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else spec
    if not name:
        raise UserError("hf: needs a directory or Hub id (e.g. init_from=hf:./my_model)")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"hf:{name} is a file; give the model directory")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"hf:{name}: directory not found")
    try:  # a Hub id: use the cache, or download when the network allows
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all one line
        raise UserError(
            f"hf:{name}: not a local directory and the Hugging Face Hub is unreachable "
            f"({_first_line(e)}); download it first and pass hf:LOCAL_DIR"
        ) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_config(path: Path):
    from transformers import AutoConfig

    f = path / "config.json"
    if not f.is_file():
        raise UserError(f"hf:{path}: no config.json (not a transformers model directory)")
    try:
        model_type = json.loads(f.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{f}: unreadable config ({e})") from None
    if model_type not in BY_MODEL_TYPE:
        raise UserError(f"{f}: unsupported architecture {model_type!r}; supported: {', '.join(BY_MODEL_TYPE)}")
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise UserError(f"{f}: transformers cannot read it ({_first_line(e)})") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        f = path / "pytorch_model.bin"
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling/format failure is a bad file
            raise UserError(f"{f}: unreadable weights ({_first_line(e)})") from None
    else:
        raise UserError(f"hf:{path}: no model.safetensors or pytorch_model.bin")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{f}: corrupt or unreadable weights ({_first_line(e)})") from None
    return sd


def _canonical(name: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the pretraining class names them (bare LlamaModel / BertModel files lack the prefix)."""
    prefix = {"llama": "model.", "bert": "bert."}.get(name)
    out = {}
    for k, v in sd.items():
        if k.startswith(IGNORED_HF):
            continue
        if name == "llama" and k.startswith("transformer."):  # LlamaFor{QuestionAnswering,...}
            k = "model." + k[len("transformer.") :]
        if prefix and not k.startswith((prefix, "lm_head.", "cls.")):
            k = prefix + k
        out[k] = v.float() if v.is_floating_point() else v
    return out


def with_sentinels(path: Path, model_cfg: ModelConfig) -> ModelConfig:
    """An encoder-decoder's extra_ids: the <extra_id_N> tokens its tokenizer.json adds (T5's
    sentinels; an llmtrain export puts them right above our tokenizer's vocabulary)."""
    f = path / "tokenizer.json"
    if model_cfg.name != "t5" or not f.is_file():
        return model_cfg
    try:
        added = json.loads(f.read_text()).get("added_tokens") or []
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{f}: unreadable tokenizer ({e})") from None
    n = sum(1 for t in added if str(t.get("content", "")).startswith("<extra_id_"))
    return dataclasses.replace(model_cfg, extra_ids=n)


# Files from which transformers builds a real tokenizer (fast or slow).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "merges.txt",
)


def load_tokenizer(path: Path, model_cfg: ModelConfig) -> Tokenizer:
    side = path / SIDE_FILE
    if side.is_file():
        try:
            tok = tokenizer_from_state(json.loads(side.read_text()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{side}: unreadable tokenizer state ({e})") from None
    else:
        from llmtrain.tokenizers.hf import HFTokenizer

        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            # AutoTokenizer would build an empty tokenizer from config.json alone, and training
            # would fail much later with "0 training tokens" (after caching its empty shards).
            raise UserError(
                f"hf:{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); "
                "save the tokenizer into the directory too (tokenizer.save_pretrained(DIR))"
            )
        tok = HFTokenizer.from_pretrained(str(path))
        if tok.vocab_size < 2:
            raise UserError(
                f"hf:{path}: its tokenizer has {tok.vocab_size} token(s); the tokenizer files are incomplete"
            )
    if tok.vocab_size > model_cfg.vocab_size:
        raise UserError(
            f"hf:{path}: the tokenizer has {tok.vocab_size} tokens but the model only {model_cfg.vocab_size} embeddings"
        )
    return tok


def load_hf(spec: str) -> Loaded:
    """hf:DIR -> the model with weights, its config, tokenizer and a synthesized checkpoint meta
    (through llmtrain.checkpoints.load, like every other checkpoint)."""
    from llmtrain.models import build_model
    from llmtrain.train.checkpoint import load_model_state

    path = resolve_dir(spec)
    hf_cfg = read_config(path)
    name = BY_MODEL_TYPE[hf_cfg.model_type]
    mod = ARCHS[name][0]
    try:
        model_cfg = mod.config_from_hf(hf_cfg)
    except (ValueError, AttributeError, TypeError) as e:
        raise UserError(f"{path / 'config.json'}: unsupported {name} variant ({e})") from None
    model_cfg = with_sentinels(path, model_cfg)
    sd = _canonical(name, read_weights(path))
    try:
        sd = mod.from_hf_state_dict(sd)
    except KeyError as e:
        raise UserError(f"hf:{path}: weights lack {e} (not a complete {name} model)") from None
    model = build_model(model_cfg)
    missing, unexpected = load_model_state(model, sd, f"hf:{path}", strict=False)
    required = [k for k in missing if not k.startswith(OPTIONAL_HEADS)]
    if required or unexpected:
        raise UserError(
            f"hf:{path}: weights do not match a {name} model (e.g. {', '.join((required or unexpected)[:3])})"
        )
    if missing:
        import sys

        heads = sorted({k.split(".")[0] for k in missing})
        print(
            f"note: hf:{path} has no weights for {', '.join(heads)}; they start from random init",
            file=sys.stderr,
            flush=True,
        )
    tokenizer = load_tokenizer(path, model_cfg)
    meta = synthesized_meta(path, model_cfg, tokenizer)
    return Loaded(path=path, meta=meta, model_cfg=model_cfg, tokenizer=tokenizer, model=model)


def synthesized_meta(path: Path, model_cfg: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """What an llmtrain checkpoint's meta.json would hold, so stages' defaults work: evaluate
    defaults to the bundled Tiny Shakespeare with the model's context."""
    from omegaconf import OmegaConf

    from llmtrain.config import asset_path

    objective = {"bert": "mlm", "t5": "span_corruption"}.get(model_cfg.name, "clm")
    data = DataConfig(path=asset_path("tinyshakespeare.txt.gz"), seq_len=min(128, model_cfg.max_seq_len))
    cfg = RunConfig(model=model_cfg, data=data, stage="import", init_from=f"{HF_PREFIX}{path}")
    cfg.objective.name = objective
    return {
        "format": "hf",
        "step": 0,
        "model": dataclasses.asdict(model_cfg),
        "tokenizer": tokenizer.state(),
        "objective": objective,
        "stage": "import",
        "source": f"{HF_PREFIX}{path}",
        "config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
    }


def hf_info(spec: str) -> Info:
    """hf:DIR -> what it is (synthesized meta, model config, tokenizer) without reading the
    weights: for stages that look at a checkpoint before loading it."""
    path = resolve_dir(spec)
    hf_cfg = read_config(path)
    mod = ARCHS[BY_MODEL_TYPE[hf_cfg.model_type]][0]
    try:
        model_cfg = mod.config_from_hf(hf_cfg)
    except (ValueError, AttributeError, TypeError) as e:
        raise UserError(f"{path / 'config.json'}: unsupported variant ({e})") from None
    model_cfg = with_sentinels(path, model_cfg)
    tokenizer = load_tokenizer(path, model_cfg)
    return Info(path=path, meta=synthesized_meta(path, model_cfg, tokenizer), model_cfg=model_cfg, tokenizer=tokenizer)
