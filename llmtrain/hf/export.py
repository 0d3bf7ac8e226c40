"""Export a checkpoint as a transformers model directory:

    OUT/config.json              GPT2LMHeadModel | LlamaForCausalLM | BertForPreTraining
    OUT/model.safetensors        float32 weights, HF names
    OUT/generation_config.json   bos/eos/pad ids of our tokenizer
    OUT/tokenizer.json, tokenizer_config.json     an equivalent fast tokenizer
    OUT/llmtrain_tokenizer.json  our tokenizer state (import prefers it: exact round trip)

config.json's vocab_size is the model's padded vocabulary (a multiple of 64); the tokenizer has
fewer tokens and never produces the extra ids. LoRA adapters are merged into the weights.
Everything is written to a temporary directory that replaces OUT only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from llmtrain.compress.prune import is_mask_key
from llmtrain.errors import UserError
from llmtrain.files import disk_full, file_mode, free_bytes, fsync_dir, fsync_tree, is_disk_full
from llmtrain.hf import ARCHS
from llmtrain.hf.tokenizer import SIDE_FILE, save_tokenizer

# files of a previous export: only such a directory (or an empty one) may be replaced
_EXPORT_MARKERS = ("config.json", SIDE_FILE)


# fine-tuned task models (llmtrain.tasks) with an exact transformers counterpart:
# (task model class, architecture) -> (HF class, name of its head layer)
TASK_CLASSES = {
    ("SequenceClassifier", "bert"): ("BertForSequenceClassification", "classifier"),
    ("SpanModel", "bert"): ("BertForQuestionAnswering", "qa_outputs"),
    ("SpanModel", "gpt2"): ("GPT2ForQuestionAnswering", "qa_outputs"),
    ("SpanModel", "llama"): ("LlamaForQuestionAnswering", "qa_outputs"),
    # reward models: one bias-free score on the last non-pad token, as HF pools it
    ("RewardModel", "gpt2"): ("GPT2ForSequenceClassification", "score"),
    ("RewardModel", "llama"): ("LlamaForSequenceClassification", "score"),
}
# where the backbone lives in our HF mapping (the pretraining classes)
_BASE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}


def merge_adapters(model: torch.nn.Module, source) -> torch.nn.Module:
    """LoRA adapters folded into their base weights (HF has no place for them)."""
    if not any("lora_" in n for n, _ in model.named_parameters()):
        return model
    try:
        from llmtrain.models.lora import merge_lora
    except ImportError:
        raise UserError(
            f"checkpoint {source} has LoRA adapters but llmtrain.models.lora is not available to merge them"
        ) from None
    return merge_lora(model)


def hf_model(model: torch.nn.Module, model_cfg, tokenizer, labels: list[str] | None = None):
    """Our model (a registry model, or a task model: backbone + head) as the equivalent
    transformers model, weights copied with a strict check."""
    import transformers

    mod, cls_name, _ = ARCHS[model_cfg.name]
    config = mod.hf_config(model_cfg)
    # our tokenizer's special ids (generation stops at eos; pad for batching)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id
    if getattr(config, "is_encoder_decoder", False):
        config.decoder_start_token_id = tokenizer.pad_id  # ours starts the decoder with pad, as T5
    head = getattr(model, "head", None) if hasattr(model, "backbone") else None
    head_name = None
    if head is not None:
        key = (type(model).__name__, model_cfg.name)
        if key not in TASK_CLASSES:
            raise UserError(
                f"a fine-tuned {type(model).__name__} on {model_cfg.name} has no exact transformers "
                "class (exportable task models: " + ", ".join(f"{a}/{b}" for a, b in TASK_CLASSES) + ")"
            )
        cls_name, head_name = TASK_CLASSES[key]
        if head_name in ("classifier", "score"):
            config.num_labels = head.out_features
            if labels and len(labels) == config.num_labels:
                config.id2label = dict(enumerate(labels))
                config.label2id = {v: i for i, v in config.id2label.items()}
        model = model.backbone
    config.architectures = [cls_name]
    # pruning masks are not weights: the pruned weights are zeros already
    state = {k: v for k, v in model.state_dict().items() if not is_mask_key(k)}
    sd = mod.to_hf_state_dict({k: v.detach().float().cpu() for k, v in state.items()})
    hf = getattr(transformers, cls_name)(config)
    if hasattr(mod, "prepare_hf_model"):
        mod.prepare_hf_model(hf, model_cfg)
    if head is not None:
        # the backbone under the task class's prefix; pretraining heads (lm_head, cls.*) and a
        # pooler the task class lacks are not part of the task model's function
        base, prefix = _BASE_PREFIX[model_cfg.name], hf.base_model_prefix + "."
        target = hf.state_dict().keys()
        sd = {prefix + k[len(base) :]: v for k, v in sd.items() if k.startswith(base)}
        sd = {k: v for k, v in sd.items() if k in target}
        sd[f"{head_name}.weight"] = head.weight.detach().float().cpu()
        if head.bias is not None:
            sd[f"{head_name}.bias"] = head.bias.detach().float().cpu()
    result = hf.load_state_dict(sd, strict=False)
    # tied output weights may be absent from (or extra in) our mapping; anything else is a bug
    tied = {"lm_head.weight", "cls.predictions.decoder.weight"} if model_cfg.tie_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"HF mapping mismatch: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return hf.eval()


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not all((out / m).exists() for m in _EXPORT_MARKERS):
        raise UserError(
            f"out={out} is a non-empty directory that is not an llmtrain export; choose a new or empty directory"
        )


def export_hf(loaded, out: str | Path, model: torch.nn.Module | None = None, labels: list[str] | None = None) -> Path:
    """Write `loaded` (llmtrain.checkpoints.Loaded; `model` overrides its model, e.g. a task model) to
    `out` in transformers format; returns `out`."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would clutter the CLI output

    out = Path(out).expanduser()
    _check_out(out)
    cfg = loaded.model_cfg
    if cfg.name not in ARCHS:
        raise UserError(
            f"checkpoint {loaded.path}: model {cfg.name!r} has no HF export (supported: {', '.join(ARCHS)})"
        )
    model = merge_adapters(model if model is not None else loaded.model, loaded.path)
    tok = loaded.tokenizer
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        # the tokenizer first: a tokenizer with no HF equivalent fails (UserError) before any work
        save_tokenizer(tok, tmp, max_len=cfg.max_seq_len, extra_ids=cfg.extra_ids)
        hf = hf_model(model, cfg, tok, labels)
        hf.save_pretrained(str(tmp), safe_serialization=True)
        gen = GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        if cfg.name == "t5":
            gen.decoder_start_token_id = tok.pad_id
        gen.save_pretrained(str(tmp))
        info = {
            "source_checkpoint": str(loaded.path),
            "step": loaded.meta.get("step"),
            "llmtrain_model": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        }
        (tmp / "llmtrain_export.json").write_text(json.dumps(info, indent=2, default=str))
        for f in tmp.iterdir():  # transformers saves weights through safetensors (0600): same mode as the rest
            if f.is_file():
                os.chmod(f, file_mode())
        fsync_tree(tmp)
        if out.exists():  # replace a previous export: move it aside, rename, then delete it
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        fsync_dir(out.parent)
    except Exception as e:
        free = free_bytes(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        needed = sum(p.numel() * 4 for p in model.parameters())  # float32 weights: most of the export
        if is_disk_full(e, free, needed):
            raise disk_full(out, needed, free) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
