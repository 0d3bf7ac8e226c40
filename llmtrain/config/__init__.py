"""Config: the typed schema (schema.py), the conf/ tree location and semantic checks."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmtrain.config.ranges import check_ranges
from llmtrain.config.schema import ModelConfig, RunConfig, register_configs
from llmtrain.errors import UserError

__all__ = ["CONF_DIR", "ModelConfig", "RunConfig", "asset_path", "register_configs", "to_run_config", "validate_config"]


def _find_conf_dir() -> Path:
    env = os.environ.get("LLMTRAIN_CONF")
    if env:
        return Path(env).resolve()
    # conf/ ships inside the package, so an installed wheel finds it as well as a checkout.
    return Path(str(resources.files("llmtrain") / "conf")).resolve()


CONF_DIR = _find_conf_dir()
PAIR_SOURCES = ("file", "arithmetic")  # task.pairs of task=reward / task=preference


def asset_path(name: str) -> str:
    """Path of a file bundled with the package (e.g. the default Shakespeare corpus)."""
    return str(resources.files("llmtrain") / "assets" / name)


if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", asset_path)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The composed DictConfig as the typed dataclass tree (interpolations resolved)."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def validate_config(cfg: RunConfig) -> None:
    """Checks that need more than types: registry names, sizes, objective/model compatibility."""
    from llmtrain.models import model_class
    from llmtrain.objectives import objective_class
    from llmtrain.tokenizers import tokenizer_class
    from llmtrain.train.optim import check_optimizer

    model_cls = model_class(cfg.model.name)
    # pretrain's model and distill's student are built from model=PRESET unless init_from names a checkpoint
    from_scratch = cfg.stage in ("pretrain", "distill") and not cfg.init_from
    if from_scratch and cfg.task.name == "lm":
        objective_cls = objective_class(cfg.objective.name)
        needs = getattr(objective_cls, "needs_decoder", None)
        is_decoder = getattr(model_cls, "is_decoder", True)
        enc_dec = getattr(model_cls, "is_encoder_decoder", False)
        if getattr(objective_cls, "needs_encoder_decoder", False) != enc_dec:
            if enc_dec:
                raise UserError(
                    f"objective={cfg.objective.name} does not fit model {cfg.model.name!r}, an encoder-decoder "
                    "(use objective=span_corruption or denoising)"
                )
            raise UserError(
                f"objective={cfg.objective.name} needs an encoder-decoder, but model {cfg.model.name!r} is "
                f"{'a causal decoder' if is_decoder else 'an encoder'} (use model=t5_tiny, t5_small or t5_base)"
            )
        if needs is True and not is_decoder:
            raise UserError(
                f"objective={cfg.objective.name} needs a causal decoder, but model "
                f"{cfg.model.name!r} is an encoder (use objective=mlm, nsp, mlm_nsp or contrastive)"
            )
        if needs is False and is_decoder:
            raise UserError(
                f"objective={cfg.objective.name} needs a bidirectional encoder, but model "
                f"{cfg.model.name!r} is a causal decoder (use objective=clm or model=bert_*)"
            )
    tokenizer_class(cfg.tokenizer.name)
    check_document_mask(cfg, model_cls if from_scratch else None)
    if cfg.data.sources is not None:
        from llmtrain.data.mixture import check_sources

        check_sources(cfg, objective_class(cfg.objective.name))
    check_required_files(cfg)
    check_ranges(cfg)  # first: the size checks below divide by these
    m, d = cfg.model, cfg.data
    check_optimizer(cfg.optim, sharded=cfg.trainer.strategy == "fsdp")
    if not from_scratch:  # the checkpoint decides the architecture; checked when loaded
        m = ModelConfig(max_seq_len=max(d.seq_len, 1))
    if m.d_model % m.n_head and not m.head_dim:
        raise UserError(f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}")
    if m.n_kv_heads is not None and m.n_head % m.n_kv_heads:
        raise UserError(f"model.n_head={m.n_head} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    if d.seq_len > m.max_seq_len:
        raise UserError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    t = cfg.trainer
    if t.defer_head_grad and t.chunked_loss is False:
        raise UserError("trainer.defer_head_grad=true needs the chunked loss; drop trainer.chunked_loss=false")
    if t.defer_head_grad and t.compile:
        raise UserError("trainer.defer_head_grad=true cannot be combined with trainer.compile=true")


def check_document_mask(cfg: RunConfig, model_cls=None) -> None:
    """data.document_mask=true is for the windows of objective=clm (pretrain, finetune task=lm) and
    the packed rows of instruction/summarization (task.packing=true), on a model whose encode()
    takes document ids (`model_cls`, when the config decides it; else checked when loaded)."""
    if not cfg.data.document_mask:
        return
    if cfg.stage == "pretrain":
        fits, what = cfg.objective.name == "clm", f"objective={cfg.objective.name}"
    elif cfg.stage == "finetune":
        packed = cfg.task.name in ("instruction", "summarization") and cfg.task.packing
        fits, what = cfg.task.name == "lm" or packed, f"task={cfg.task.name} task.packing={cfg.task.packing}"
    else:
        fits, what = False, f"llmtrain {cfg.stage.replace('_', ' ')}"
    if not fits:
        raise UserError(
            "data.document_mask=true is for pretrain with objective=clm and finetune with task=lm, or "
            f"task=instruction|summarization with task.packing=true; not {what}"
        )
    if model_cls is not None:
        check_document_model(model_cls, f"model {cfg.model.name!r}")


def check_document_model(model, what: str) -> None:
    """Refuse data.document_mask=true for a model (or model class) without document ids (bert, t5)."""
    if not getattr(model, "supports_document_mask", False):
        raise UserError(f"data.document_mask=true needs a gpt2 or llama decoder; {what} is not one")


def check_required_files(cfg: RunConfig) -> None:
    """Presets mark the user's files `???`, but OmegaConf's merge keeps the schema's None under a
    `???`, so the composed config cannot tell; check here, before Hydra creates the run directory."""
    reads_data = cfg.stage in ("pretrain", "tokenizer_train", "data_prepare") or (
        cfg.stage in ("finetune", "distill") and cfg.task.name == "lm"
    )
    if cfg.stage == "distill" and not cfg.teacher:
        raise UserError("distill needs teacher=PATH (the checkpoint or run directory to distill from)")
    if reads_data and not cfg.data.path and cfg.data.sources is None:
        mix = ", or data=mixture data.sources='[{path: A, weight: 0.7}, ...]'" if cfg.stage == "pretrain" else ""
        raise UserError(f"data.path is required: the text to train on (e.g. data.path=FILE{mix})")
    if cfg.stage == "rl":
        check_reward(cfg)
    if cfg.task.pairs not in PAIR_SOURCES:
        raise UserError(f"task.pairs must be one of {', '.join(PAIR_SOURCES)}, got {cfg.task.pairs!r}")
    generated_pairs = cfg.task.name in ("reward", "preference") and cfg.task.pairs == "arithmetic"
    if cfg.task.name == "arithmetic" or cfg.data.path == "task:arithmetic" or generated_pairs:
        from llmtrain.tasks.arithmetic import check_ops  # a bad operator: refused before any work

        check_ops(list(cfg.task.ops))
    if cfg.data.val_path and cfg.stage in ("finetune", "distill") and cfg.task.name != "lm":
        raise UserError(
            f"data.val_path is for text (task=lm); task={cfg.task.name} reads its validation file from task.val_path"
        )
    if cfg.eval.split not in (None, "all", "val"):
        raise UserError(f"eval.split must be all or val, got {cfg.eval.split!r}")
    needs_file = cfg.task.name not in ("lm", "arithmetic") and not generated_pairs
    if cfg.stage in ("finetune", "distill") and needs_file and not cfg.task.train_path:
        raise UserError(
            f"task.train_path is required for task={cfg.task.name}: the training file (e.g. task.train_path=FILE)"
        )


def check_reward(cfg: RunConfig) -> None:
    """rl.reward is `arithmetic`, `model` (with rl.reward_model) or `python:module:function`."""
    reward = cfg.rl.reward
    if reward == "model":
        if not cfg.rl.reward_model:
            raise UserError("rl.reward=model needs rl.reward_model=RUN_DIR (a reward checkpoint, task=reward)")
    elif reward.startswith("python:"):
        module, _, fn = reward.removeprefix("python:").partition(":")
        if not module or not fn:
            raise UserError(f"rl.reward={reward!r}: write a user function as python:module:function")
    elif reward != "arithmetic":
        raise UserError(f"rl.reward={reward!r}: choose arithmetic, model or python:module:function")
