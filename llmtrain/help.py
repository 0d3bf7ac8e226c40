"""`llmtrain VERB --help`: a verb's purpose, its config groups, its main keys and the experiments
that fit it, rendered from the tables below, the verb's composed config and the conf/ tree.

Defaults are not written here: they are read from the verb's config as Hydra composes it (the
schema dataclasses in llmtrain/config/schema.py, then the verb's YAML), so they cannot drift.

Which experiments fit a verb (no composition needed, only each file's `defaults:` list): an
experiment fits when the verb's primary config has every group the experiment overrides (Hydra
refuses the override otherwise), and the experiment overrides `task` exactly when the verb's
config has a task group. So presets naming a task are fine-tuning presets (finetune) and the
others train from scratch (pretrain, bench); verbs that take the architecture from a checkpoint
(evaluate, generate, chat, export) have none. An experiment that sets a verb's own group (e.g.
`distill:`) fits that verb only, with or without a task, and such a verb takes only those.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from llmtrain.config import CONF_DIR, register_configs
from llmtrain.config.ranges import RANGES


@dataclass(frozen=True)
class Verb:
    purpose: str
    keys: str  # dotted keys, space-separated; "group.*" stands for every field of that schema group


VERBS: dict[str, Verb] = {
    "pretrain": Verb(
        "Train a model from scratch with a pretraining objective (causal LM, masked LM, NSP, contrastive "
        "sentence embeddings; span corruption or denoising for the t5 encoder-decoder) on data.path; "
        "init_from=PATH starts from a checkpoint's weights and tokenizer instead.",
        "data.path data.sources data.val_fraction data.val_path data.seq_len data.batch_size model.n_layer "
        "model.d_model optim.lr scheduler.warmup_steps trainer.max_steps trainer.eval_every trainer.ckpt_every "
        "trainer.precision "
        "trainer.devices trainer.strategy trainer.resume trainer.compile trainer.chunked_loss "
        "trainer.defer_head_grad trainer.threads "
        "objective.noise_density "
        "objective.mean_span_length objective.permute_sentences model.extra_ids init_from objective.temperature "
        "objective.pooling objective.pair_columns objective.positive_threshold objective.hard_negative_threshold "
        "data.document_mask optimize_metric",
    ),
    "finetune": Verb(
        "Fine-tune a checkpoint (init_from=PATH) on a task: more causal-LM text (task=lm), classification, "
        "extractive QA, instruction tuning, summarization or seq2seq, a reward model (task=reward) or preference "
        "tuning (task=preference: DPO, IPO, SimPO); architecture and tokenizer come from the "
        "checkpoint.",
        "init_from task.* finetune.lora.r finetune.lora.alpha finetune.lora.targets finetune.freeze_backbone "
        "finetune.qat finetune.qat_group_size "
        "data.path data.seq_len data.batch_size data.val_fraction data.val_path data.document_mask optim.lr "
        "trainer.max_steps trainer.eval_every eval.max_examples",
    ),
    "rl": Verb(
        "Reinforcement learning with GRPO from a checkpoint (init_from=PATH): rl.group_size sampled completions "
        "per prompt of the task, group-normalised advantages, a clipped policy ratio and a k3 KL penalty to the "
        "frozen init_from; the reward is the task's verifiable one (arithmetic), a reward model or your function.",
        "init_from rl.* task.name task.digits task.ops data.batch_size optim.lr trainer.max_steps "
        "trainer.eval_every trainer.resume",
    ),
    "distill": Verb(
        "Distil a teacher checkpoint (teacher=PATH) into a student: model=PRESET from scratch or "
        "init_from=PATH, with the teacher's tokenizer. Causal LM or masked LM on data.path (task=lm), or a "
        "fine-tuned classifier's logits (task=classification).",
        "teacher init_from distill.* objective.name task.name task.train_path task.val_path data.path "
        "data.seq_len data.batch_size model.n_layer model.d_model optim.lr trainer.max_steps trainer.eval_every "
        "trainer.resume",
    ),
    "evaluate": Verb(
        "Evaluate a checkpoint (checkpoint=PATH): loss, perplexity and bits per byte, or its task's metrics, "
        "on its own data or on the data you name.",
        "checkpoint eval.tasks eval.split eval.max_examples eval.batch_size eval.max_new_tokens eval.num_beams "
        "eval.length_penalty eval.length_normalize task.val_path data.path data.val_path eval.sts_path "
        "eval.sts_columns eval.sts_positive eval.pooling trainer.eval_batches trainer.device",
    ),
    "embed": Verb(
        "Write sentence embeddings of an encoder checkpoint (checkpoint=PATH) to a .npy file: one row per line "
        "or record of embed.input.",
        "checkpoint embed.input embed.out embed.pooling embed.normalize embed.batch_size data.text_field "
        "trainer.device",
    ),
    "generate": Verb(
        "Sample text from a checkpoint (checkpoint=PATH) after a prompt.",
        "checkpoint generate.prompt generate.max_new_tokens generate.temperature generate.top_k "
        "generate.top_p generate.num_samples generate.num_beams generate.length_penalty trainer.seed trainer.device",
    ),
    "chat": Verb(
        "Chat with an instruction-tuned checkpoint (checkpoint=PATH): stdin lines are user turns, replies go "
        "to stdout (a t5 checkpoint: each line alone is the encoder input).",
        "checkpoint chat.template chat.max_new_tokens chat.temperature chat.top_k chat.top_p trainer.seed "
        "trainer.device",
    ),
    "export": Verb(
        "Export a checkpoint (checkpoint=PATH) to a Hugging Face model directory (export.out=DIR).",
        "checkpoint export.out export.format",
    ),
    "bench": Verb(
        "Benchmark the training step of a preset on synthetic tokens (CLM; span corruption for t5): tokens/s, "
        "MFU, step time, memory, against a plain PyTorch loop.",
        "bench.steps bench.warmup bench.rounds bench.baseline bench.out data.seq_len data.batch_size "
        "trainer.precision trainer.compile trainer.device",
    ),
    "tokenizer train": Verb(
        "Train a tokenizer on the training split of the text data.path names: tokenizer=sentencepiece (BPE or "
        "unigram), wordpiece (BERT-style) or bpe (GPT-2-style byte-level), the last two with Hugging Face tokenizers.",
        "data.path data.val_fraction data.val_path tokenizer.path tokenizer.vocab_size tokenizer.model_type "
        "tokenizer.character_coverage tokenizer.byte_fallback tokenizer.input_sentence_size tokenizer.lowercase "
        "tokenizer.special_tokens",
    ),
    "quantize": Verb(
        "Quantize a checkpoint's linear layers (checkpoint=PATH): int8 per channel or int4 group-wise "
        "weights, or int8 weights with dynamic int8 activations; writes a checkpoint that evaluate, generate "
        "and chat load, and a before/after report (compression.json, compression.md).",
        "checkpoint quant.method quant.group_size quant.calibration quant.report data.path trainer.eval_batches",
    ),
    "prune": Verb(
        "Prune a checkpoint (checkpoint=PATH): magnitude (unstructured), 2:4 semi-structured, or structured "
        "(whole heads and FFN channels removed: a smaller model); masks stay in the checkpoint and hold through "
        "a recovery `llmtrain finetune init_from=RUN`; writes a before/after report.",
        "checkpoint prune.method prune.sparsity prune.scope prune.heads prune.calibration prune.report data.path "
        "trainer.eval_batches",
    ),
    "data prepare": Verb(
        "Tokenize data.path once into cached, memory-mapped token shards (pretrain does this itself when the "
        "cache is missing).",
        "data.path data.text_field data.doc_pattern data.encoding_errors data.cache_dir data.num_proc tokenizer.path",
    ),
}

# One line per key, shown next to its default.
KEYS: dict[str, str] = {
    "checkpoint": "what to load: a run dir, step dir, best_checkpoint, task or LoRA run, or hf:DIR",
    "init_from": "the checkpoint to start from (any form `checkpoint` accepts)",
    "teacher": "distill: the checkpoint to learn from (any form `checkpoint` accepts)",
    "distill.alpha": "weight of the KD term; 1 - alpha weighs the task loss on the labels",
    "distill.temperature": "softmax temperature of both distributions (the KD term is scaled by T^2)",
    "distill.hidden_weight": "weight of a hidden-state MSE through a learned projection (0 = off)",
    "objective.name": "clm | mlm (choose with objective=NAME)",
    "optimize_metric": "the metric a sweep optimises (returned by the run)",
    "data.path": "text file, directory, glob or hf:NAME[:CONFIG][@SPLIT]",
    "data.sources": "a weighted mixture instead of data.path (data=mixture): [{path: A, weight: 0.7}, "
    "{path: B, weight: 0.3, name: b}]; windows drawn by weight, val/loss/<name> per source",
    "data.seq_len": "tokens per training window",
    "data.batch_size": "windows per step (per device)",
    "data.val_fraction": "last fraction of the text by characters, cut at a document boundary when one is near "
    "(or of the task records), used for validation",
    "data.val_path": "a separate validation source (file, directory, glob); set: all of data.path trains",
    "data.text_field": "field holding the text in .jsonl/.json/.csv/.tsv/.parquet files",
    "data.doc_pattern": "regex of a line that starts a new document inside a text file",
    "data.encoding_errors": "strict | replace: undecodable bytes are an error or U+FFFD",
    "data.cache_dir": "where prepared shards and tokenizers are cached (default ~/.cache/llmtrain)",
    "data.num_proc": "processes that tokenize",
    "data.streaming": "pretrain (clm): tokenize data.path (e.g. hf:NAME) on the fly, no prepared copy; "
    "resumes by re-reading to the step's window",
    "data.document_mask": "packed documents stay apart: block-diagonal causal attention, positions restart, "
    "no target across a boundary (gpt2/llama; clm, or task.packing=true)",
    "model.n_layer": "transformer blocks",
    "model.d_model": "hidden size",
    "optim.lr": "peak learning rate",
    "scheduler.warmup_steps": "linear warm-up steps",
    "trainer.max_steps": "optimizer steps",
    "trainer.threads": "CPU threads per process (0 = OMP_NUM_THREADS if set, else cores / local processes)",
    "trainer.eval_every": "steps between validations",
    "trainer.eval_batches": "validation batches (0 = the whole validation split)",
    "trainer.ckpt_every": "steps between checkpoints (0 = by time only, trainer.ckpt_every_minutes=30, and the end)",
    "trainer.precision": "auto | bf16 | fp16 | fp32",
    "trainer.devices": "processes on this machine (>1 launches DDP/FSDP workers)",
    "trainer.strategy": "auto | single | ddp | fsdp",
    "trainer.resume": "never | auto (continue from the run directory's last checkpoint)",
    "trainer.compile": "torch.compile the model",
    "trainer.chunked_loss": "LM-head cross-entropy a few rows at a time, gradients formed in forward: "
    "never the whole [tokens, vocab] logits (same loss; false = the plain full-logits path; "
    "unset = on for CPU runs, off on GPUs)",
    "trainer.defer_head_grad": "with trainer.chunked_loss: form the LM head weight's gradient at the end of the "
    "backward, when the blocks' activations are freed (lower peak memory, one more head matmul)",
    "trainer.device": "auto | cpu | cuda | cuda:N | mps",
    "trainer.seed": "random seed",
    "task.name": "the task (choose with task=NAME, which also sets its defaults)",
    "task.train_path": "training file (.json/.jsonl/.csv/.tsv); required by every task but lm",
    "task.val_path": "validation file; unset = the last data.val_fraction of the training records",
    "task.text_field": "classification: the text field",
    "task.text_pair_field": "classification: the second text of a pair (e.g. NLI hypothesis)",
    "task.label_field": "classification: the label field",
    "task.columns": "names of the columns of a .tsv/.csv without a header row, e.g. [label,text]",
    "task.labels": "classification: the label set (unset = inferred from the training file)",
    "task.source_field": "summarization, seq2seq: the source field",
    "task.target_field": "summarization, seq2seq: the target field",
    "task.chat_template": "instruction: default | chatml",
    "task.packing": "instruction, summarization: pack several examples into one window (data.document_mask: apart)",
    "task.doc_stride": "extractive_qa: overlap (tokens) between windows of a long context",
    "task.max_answer_len": "extractive_qa: longest predicted answer, in tokens",
    "task.max_examples": "use at most this many records (0 = all)",
    "task.max_new_tokens": "generative tasks: tokens generated per validation answer",
    "task.temperature": "generative tasks: sampling temperature of validation answers (0 = greedy)",
    "task.prompt_suffix": "summarization, seq2seq on decoders: text between the source and the target",
    "task.num_beams": "generative tasks: beams of validation answers (1 = greedy/sampled)",
    "task.length_penalty": "beam search: score = log-prob / length ** length_penalty",
    "task.all_targets": "summarization: one training example per target (else the first)",
    "task.null_threshold": 'extractive_qa: answer "no answer" when [CLS] beats the best span by more',
    "task.digits": "arithmetic: operands are drawn from [0, 10**digits)",
    "task.ops": "arithmetic: operators, any of + - *",
    "task.problem_seed": "arithmetic: the seed of the problems and of which are held out",
    "task.num_train": "arithmetic: training problems",
    "task.num_val": "arithmetic: held-out problems (never among the training ones)",
    "rl.reward": "arithmetic (verifiable) | model (rl.reward_model=RUN) | python:module:function(prompts, responses)",
    "rl.reward_model": "rl.reward=model: the reward checkpoint (task=reward)",
    "rl.reward_batch_size": "rl.reward=model: responses scored per forward",
    "rl.group_size": "completions sampled per prompt (advantages are normalised within each group)",
    "rl.max_new_tokens": "tokens per completion",
    "rl.temperature": "sampling temperature of the rollouts (validation is greedy)",
    "rl.top_k": "rollouts sample from the k most likely tokens (null = all)",
    "rl.kl_coef": "weight of the k3 KL estimate to the frozen reference",
    "rl.clip_eps": "the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps]",
    "rl.iterations": "optimizer steps per rollout (GRPO's mu)",
    "rl.eval_prompts": "held-out prompts scored at each evaluation (0 = all)",
    "rl.num_samples": "samples per evaluation written to samples.jsonl",
    "task.loss": "preference: dpo | ipo | simpo",
    "task.beta": "preference: strength of the pull to the reference (SimPO: reward scale)",
    "task.gamma": "preference, loss simpo: target reward margin",
    "task.rpo_alpha": "preference: weight of the chosen reply's per-token NLL added to the loss (RPO; 0 = none)",
    "task.pairs": "reward, preference: file (task.train_path) | arithmetic (generated right vs wrong answers)",
    "finetune.lora.r": "LoRA rank (0 = train all weights)",
    "finetune.lora.alpha": "LoRA scale numerator",
    "finetune.lora.targets": "module-name substrings that get adapters",
    "finetune.freeze_backbone": "train only the new task head",
    "eval.sts_path": "sts: sentence pairs with gold scores (e.g. STS-B dev.tsv)",
    "eval.sts_columns": "sts: columns of sentence A, B, score (digits: 1-based, headerless file; else field names)",
    "eval.pooling": "sts: mean | cls (null = the checkpoint's objective.pooling)",
    "embed.input": "sentences: one per line (text) or record (.jsonl/.json/.csv/.tsv, data.text_field)",
    "embed.out": "the .npy file to write (float32, one row per line or record)",
    "embed.pooling": "mean | cls (null = the checkpoint's objective.pooling)",
    "embed.normalize": "L2-normalise each row",
    "embed.batch_size": "sentences per forward pass",
    "objective.temperature": "contrastive: InfoNCE temperature",
    "objective.pooling": "contrastive: mean | cls, how token states become a sentence vector",
    "objective.pair_columns": "contrastive: [A,B,score] columns of a pair file ([] = unsupervised sentences)",
    "objective.positive_threshold": "contrastive: a pair with score >= this is a positive",
    "objective.hard_negative_threshold": "contrastive: a pair with score <= this gives a hard negative (null = none)",
    "finetune.qat": "int8 | int4: quantization-aware training (fake-quantized weights), quantized at the end",
    "finetune.qat_group_size": "finetune.qat=int4: inputs per scale",
    "quant.method": "int8 (weights, per channel) | int4 (weights, group-wise) | int8_dynamic (+ int8 activations)",
    "quant.group_size": "int4: inputs sharing one scale and zero point",
    "quant.calibration": "int4: training batches for the per-row clipping search (0 = plain min/max)",
    "quant.report": "measure source vs quantized model (compression.json, compression.md)",
    "prune.method": "magnitude | 2:4 | structured",
    "prune.sparsity": "magnitude: fraction of weights zeroed; structured: fraction of heads and FFN channels removed",
    "prune.scope": "magnitude: global (one threshold) | layer (same fraction per layer)",
    "prune.heads": "structured: also remove attention heads (false: FFN channels only)",
    "prune.calibration": "structured: training batches for the importance scores",
    "prune.report": "measure source vs pruned model (compression.json, compression.md)",
    "eval.tasks": "lm | classification | qa | generation | mlm | nsp | preference | span_corruption | denoising "
    "| sts | arithmetic ([] = the checkpoint's own)",
    "eval.sts_positive": "sts: alignment is over the pairs scoring >= this",
    "eval.num_beams": "generation task: beams (1 = greedy)",
    "eval.length_penalty": "beam search: score = log-prob / length ** length_penalty",
    "generate.num_beams": "beam search with this many beams (1 = sample / greedy)",
    "generate.length_penalty": "beam search: score = log-prob / length ** length_penalty",
    "objective.noise_density": "span_corruption / denoising: fraction of tokens corrupted",
    "objective.mean_span_length": "span_corruption: mean span length; denoising: Poisson lambda",
    "objective.permute_sentences": "denoising: also shuffle the sentences of the input",
    "model.extra_ids": "t5: sentinel ids above the tokenizer's vocabulary (<extra_id_N>)",
    "eval.split": "all | val: score all of the data (eval/*) or its validation split (val/*); "
    "unset = all of data.path given here, else the checkpoint's validation split",
    "eval.max_examples": "examples scored by generative and task evaluations (0 = all)",
    "eval.batch_size": "examples per batch",
    "eval.max_new_tokens": "generation task: tokens generated per example",
    "eval.length_normalize": "preference task: compare a policy's per-token log-probs, not their sums",
    "generate.prompt": "the text to continue",
    "generate.max_new_tokens": "tokens to generate",
    "generate.temperature": "sampling temperature (0 = greedy)",
    "generate.top_k": "sample from the k most likely tokens (null = all)",
    "generate.top_p": "nucleus sampling: the smallest set with this probability (null = off)",
    "generate.num_samples": "continuations of the prompt",
    "chat.template": "chat template name (null = the checkpoint's own)",
    "chat.max_new_tokens": "tokens per reply",
    "chat.temperature": "sampling temperature (0 = greedy)",
    "chat.top_k": "sample from the k most likely tokens (null = all)",
    "chat.top_p": "nucleus sampling (null = off)",
    "export.out": "the directory to write",
    "export.format": "hf: a Hugging Face transformers model directory",
    "bench.steps": "timed steps",
    "bench.warmup": "untimed steps first",
    "bench.rounds": "timed rounds, alternating with the baseline; the best counts",
    "bench.baseline": "also time a plain PyTorch loop of the same model",
    "bench.out": "results JSON (default RUN_DIR/bench.json)",
    "tokenizer.vocab_size": "vocabulary size",
    "tokenizer.model_type": "sentencepiece: bpe | unigram",
    "tokenizer.character_coverage": "fraction of characters covered",
    "tokenizer.byte_fallback": "encode unknown characters as bytes",
    "tokenizer.input_sentence_size": "sentences sampled for training",
    "tokenizer.path": "sentencepiece: a .model file; wordpiece / bpe: a tokenizer.json (trained there if missing); "
    "hf: a Hugging Face tokenizer directory",
    "tokenizer.lowercase": "wordpiece: lowercase and strip accents (bert-base-uncased)",
    "tokenizer.special_tokens": "wordpiece / bpe: extra special tokens after the built-in ones",
}

USAGE = """Everything after the verb goes to Hydra unchanged:
  +experiment=NAME          start from an experiment preset
  key=value                 override any config key (e.g. optim.lr=3e-4 trainer.max_steps=2000)
  group=option              choose a config group option (e.g. model=gpt2_124m)
  --cfg job                 print the composed config and exit
  -m / --multirun           sweep (e.g. -m optim.lr=1e-3,3e-4), one directory per job
  hydra.run.dir=DIR         where this run writes (hydra.sweep.dir=DIR for sweeps)
  --hydra-help              Hydra's own help"""

_ABSENT = object()


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _defaults_list(path: Path) -> list[Any]:
    return OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []


def primary_groups(verb: str) -> dict[str, str | None]:
    """The config groups of the verb's primary config, with the option it picks (None = none)."""
    return {
        k: v
        for entry in _defaults_list(CONF_DIR / f"{verb.replace(' ', '_')}.yaml")
        if isinstance(entry, dict)
        for k, v in entry.items()
    }


def overridden_groups(experiment: str) -> set[str]:
    return {
        k.removeprefix("override").strip().lstrip("/")
        for entry in _defaults_list(CONF_DIR / "experiment" / f"{experiment}.yaml")
        if isinstance(entry, dict)
        for k in entry
    }


def experiments_for(verb: str) -> list[str]:
    """The rule in this module's docstring."""
    groups, names = primary_groups(verb), group_options("experiment")
    owners = {name: verb_group_of(name) for name in names}
    own = [name for name in names if owners[name] == verb.replace(" ", "_")]
    if own:
        return own
    return [
        name
        for name in names
        if owners[name] is None
        and overridden_groups(name) <= groups.keys()
        and ("task" in overridden_groups(name)) == ("task" in groups)
    ]


def verb_group_of(experiment: str) -> str | None:
    """The verb whose own group the experiment sets (a top-level key named like a verb), if any."""
    keys = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml")).keys()
    return next((k for k in keys if k in {v.replace(" ", "_") for v in VERBS}), None)


def _summary(experiment: str) -> str:
    """The first sentence of an experiment file's header comment."""
    text = []
    for line in (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text().splitlines():
        if not line.startswith("#") or line.startswith("#   llmtrain"):
            break
        if "@package" not in line:
            text.append(line.lstrip("#").strip())
    sentence = re.split(r"\.\s+(?=[A-Z])", " ".join(text))[0].rstrip(".:")
    return sentence if len(sentence) <= 90 else sentence[:87].rsplit(" ", 1)[0] + " ..."


def _composed(verb: str) -> dict[str, Any]:
    from llmtrain.config import compose

    register_configs()
    name = verb.replace(" ", "_")
    with compose.hydra_session(name):
        cfg = compose.job_config(compose.compose_run(name, []))
    return OmegaConf.to_container(cfg, resolve=False)  # interpolations shown as written


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def expand_keys(verb: str, tree: dict[str, Any] | None = None) -> list[str]:
    """The verb's keys with each "group.*" replaced by that group's fields."""
    tree = _composed(verb) if tree is None else tree
    keys: list[str] = []
    for key in VERBS[verb].keys.split():
        if key.endswith(".*"):
            group = _lookup(tree, key[:-2])
            keys += [f"{key[:-2]}.{f}" for f in group] if isinstance(group, dict) else []
        else:
            keys.append(key)
    return keys


def _show(value: Any) -> str:
    """A default as it would be written on the command line."""
    if value is _ABSENT:
        return ""
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and (not value.strip() or value != value.strip() or "\n" in value):
        return repr(value)  # e.g. generate.prompt's "\n", which printed raw would break the line
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def verb_help(verb: str) -> str:
    spec, tree = VERBS[verb], _composed(verb)
    out = [
        f"Usage: llmtrain {verb} [HYDRA OVERRIDES...]",
        "",
        textwrap.fill(spec.purpose, 100),
        "",
        USAGE,
        "",
        "Config groups (group=option):",
    ]
    for group, chosen in primary_groups(verb).items():
        options = ", ".join(group_options(group)) or "none"
        out.append(
            textwrap.fill(
                f"{group} (default {chosen or 'none'}): {options}", 100, initial_indent="  ", subsequent_indent="      "
            )
        )
    out += ["", "Main keys (key=value; default):"]
    keys = expand_keys(verb, tree)
    width = max(len(k) for k in keys) + 2
    for key in keys:
        default = _show(_lookup(tree, key))
        default = f" [{default}]" if default else ""
        allowed = f" ({RANGES[key]})" if key in RANGES else ""
        out.append(f"  {key:<{width}}{KEYS.get(key, '')}{allowed}{default}")
    fits = experiments_for(verb)
    out += ["", "Experiments (+experiment=NAME):" if fits else "Experiments: none for this verb"]
    name_width = max((len(n) for n in fits), default=0) + 2
    out += [f"  {name:<{name_width}}{_summary(name)}" for name in fits]
    return "\n".join(out) + "\n"
