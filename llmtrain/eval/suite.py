"""The evaluation tasks of `llmtrain evaluate` (eval.tasks=[...]).

Each task is `fn(ctx) -> TaskResult`: flat scalar metrics named "<task>/<metric>" (what the
table, eval.json and sweeps read) plus optional nested details (per-class scores, confusion
matrix, sample generations). Under torchrun every rank runs the task on its own shard; sums are
all-reduced and per-example outputs gathered, so every example counts exactly once.

    lm              loss, perplexity, bits per byte on a text source: data=... scored whole
                    (eval/*), or the checkpoint's own validation split (val/*); eval.split
    mlm, nsp        masked-LM / next-sentence accuracy of encoder checkpoints (their objective)
    span_corruption, denoising   an encoder-decoder's (t5) pretraining loss on its validation split
    generation      BLEU, ROUGE-1/2/L, exact match of greedy (or eval.num_beams) generations against references
    arithmetic      exact match of greedy answers to the held-out problems of task=arithmetic
    classification  accuracy, macro-F1, per-class P/R/F1, confusion matrix (llmtrain.tasks)
    qa              SQuAD exact match / F1 (llmtrain.tasks, task extractive_qa)
    sts             Spearman of embedding cosines vs gold scores, alignment, uniformity (llmtrain/eval/sts.py)
    preference      held-out preference pairs: chosen beats rejected (a reward model's score, or
                    a policy's log-prob)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from llmtrain.config.moved_keys import known_fields
from llmtrain.config.schema import DataConfig, ObjectiveConfig, RunConfig, SourceConfig, TaskConfig
from llmtrain.data.validation import shard, sum_losses
from llmtrain.distributed import barrier, gather_indexed, sum_across_ranks, world
from llmtrain.errors import UserError
from llmtrain.eval import metrics
from llmtrain.train.device import autocast


@dataclass
class TaskResult:
    metrics: dict[str, float | int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalContext:
    cfg: RunConfig
    device: torch.device
    precision: str
    run_dir: Path
    loader: Callable[[], Any]  # () -> llmtrain.checkpoints.Loaded, called once, on first use
    _loaded: Any = None

    def load(self):
        if self._loaded is None:
            self._loaded = self.loader()
        return self._loaded

    @property
    def model(self) -> torch.nn.Module:
        return self.load().model

    @property
    def tokenizer(self):
        return self.load().tokenizer

    @property
    def meta(self) -> dict[str, Any]:
        return self.load().meta

    def run_config(self, section: str) -> dict[str, Any]:
        """A section of the config the checkpoint was trained with ({} if unknown)."""
        return dict((self.meta.get("config") or {}).get(section) or {})


EVAL_TASKS: dict[str, Callable[[EvalContext], TaskResult]] = {}


def eval_task(name: str):
    def deco(fn):
        EVAL_TASKS[name] = fn
        return fn

    return deco


def task_config_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The TaskConfig dict a fine-tuned checkpoint stores (meta["task"]["config"]); {} if none."""
    task = meta.get("task")
    if not isinstance(task, dict):
        return {}
    return dict(task["config"]) if isinstance(task.get("config"), dict) else dict(task)


def default_tasks(meta: dict[str, Any]) -> list[str]:
    """What to evaluate when eval.tasks is empty: the checkpoint's own task or objective."""
    by_task = {
        "classification": "classification",
        "extractive_qa": "qa",
        "instruction": "generation",
        "summarization": "generation",
        "arithmetic": "arithmetic",
        "reward": "preference",
        "preference": "preference",
    }
    task = task_config_of(meta).get("name")
    if task in by_task:
        return [by_task[task]]
    if ((meta.get("config") or {}).get("data") or {}).get("path") == "task:arithmetic":  # data=arithmetic
        return ["arithmetic"]
    objective = meta.get("objective", "clm")
    by_objective = {"mlm": ["mlm"], "nsp": ["nsp"], "mlm_nsp": ["mlm", "nsp"], "contrastive": ["sts"]}
    by_objective.update({name: [name] for name in ("span_corruption", "denoising")})
    return by_objective.get(objective, ["lm"])


# ----------------------------------------------------------------------------- lm / mlm / nsp
def _data_config(ctx: EvalContext) -> tuple[DataConfig, str]:
    """(the data to score, eval.split): data=... from the command line, scored whole by default
    (eval.split=all), else the data the checkpoint was trained on, its validation split."""
    data = ctx.cfg.data
    given = bool(data.path or data.val_path)
    if not given:
        saved = ctx.run_config("data")
        if not saved.get("path"):
            if saved.get("sources"):
                raise UserError(
                    "evaluate: the checkpoint was trained on data.sources (a mixture); this task scores "
                    "one source: pass data=text data.path=FILE"
                )
            raise UserError("evaluate: no data to score; pass data=text data.path=FILE")
        data = DataConfig(**known_fields(DataConfig, saved))
    split = ctx.cfg.eval.split or ("all" if given else "val")
    return _fit_context(ctx, data), split


def _fit_context(ctx: EvalContext, data: DataConfig) -> DataConfig:
    max_len = int(getattr(getattr(ctx.model, "config", None), "max_seq_len", data.seq_len))
    return DataConfig(**{**data.__dict__, "seq_len": min(data.seq_len, max_len)})


def _mixture_sources(ctx: EvalContext) -> list[tuple[str, DataConfig]]:
    """[(name, data of the source)] of a checkpoint trained on a mixture (data.sources) when no data
    is given on the command line and eval.split is not all: each source is scored on its own
    validation split, as training validated it (val/loss/<name>). [] otherwise."""
    if ctx.cfg.data.path or ctx.cfg.data.val_path or ctx.cfg.eval.split == "all":
        return []
    saved = ctx.run_config("data")
    if saved.get("path") or not saved.get("sources"):
        return []
    from llmtrain.data.mixture import source_data, source_names

    sources = [SourceConfig(**known_fields(SourceConfig, s)) for s in saved["sources"]]
    base = _fit_context(ctx, DataConfig(**{**known_fields(DataConfig, saved), "sources": None}))
    return [(name, source_data(base, s)) for name, s in zip(source_names(sources), sources)]


@dataclass
class Scored:
    """The tokens a task scores (as the validation side of `splits`) and where they come from."""

    splits: Any
    path: str  # the source scored: data.path, or data.val_path
    split: str  # all | val
    prefix: str  # metric prefix: eval (a whole source) | val (a validation split)
    documents: int  # documents (or parts of one) scored
    key: str  # the config key that names `path`


def _scored_tokens(ctx: EvalContext, data: DataConfig, split: str) -> Scored:
    """eval.split=all: every document of data.path (data.val_path when only it is set);
    eval.split=val: data.val_path whole, else the last data.val_fraction of data.path (the split
    training used)."""
    from llmtrain.data.corpus import DocSplit, read_split, tokenize_split
    from llmtrain.data.sources import read_documents

    if split == "all" or data.val_path:  # one source, every document of it
        if split == "all":
            path, key = (data.path, "data.path") if data.path else (data.val_path, "data.val_path")
        else:
            path, key = data.val_path, "data.val_path"
        docs = read_documents(path, data.text_field, data.encoding_errors, data.doc_pattern, key)
        # Everything on the validation side: the objective scores only that side.
        splits = tokenize_split(DocSplit([], docs, False, "none"), ctx.tokenizer)
        splits.train = splits.val
        what, n_docs = f"{key} {path}", len(docs)
    else:  # the last data.val_fraction of data.path, as training split it
        path, key = data.path, "data.path"
        ds = read_split(data)
        # Only the validation side is scored: tokenizing the training side too was most of the
        # task's time outside the model (the validation tokens do not depend on it).
        splits = tokenize_split(DocSplit([], ds.val, False, ds.by), ctx.tokenizer)
        n_docs = len(ds.val)
        what = f"data {path}: the validation split (data.val_fraction={data.val_fraction})"
    prefix = "eval" if split == "all" else "val"
    if len(splits.val) < 2:
        raise UserError(f"{what} is empty" + ("; use eval.split=all to score the whole file" if split == "val" else ""))
    return Scored(splits, path, split, prefix, n_docs, key)


def _data_details(scored: Scored, tokenizer) -> dict[str, Any]:
    """What eval.json records of the scored data: the source, the split, each file's size and sha256."""
    from llmtrain.data.corpus import unk_count
    from llmtrain.run_records import data_files

    s = scored.splits
    return {
        "path": scored.path,
        "key": scored.key,
        "split": scored.split,
        "documents": scored.documents,
        "tokens": len(s.val),
        "unk_tokens": unk_count(s.val, tokenizer),
        "files": data_files([scored.path]),
    }


def _report_unk(scored: Scored, tokenizer) -> None:
    from llmtrain.data.corpus import unk_count, unk_report

    line = unk_report(unk_count(scored.splits.val, tokenizer), len(scored.splits.val), f"data {scored.path}")
    if line and world()[0] == 0:
        print(line, flush=True)


def _objective(ctx: EvalContext, name: str, splits, data: DataConfig):
    from llmtrain.objectives import build_objective

    ocfg = ObjectiveConfig(**{**known_fields(ObjectiveConfig, ctx.run_config("objective")), "name": name})
    return build_objective(ocfg, ctx.tokenizer, splits, data, ctx.cfg.trainer.seed, ctx.load().model_cfg)


def _check_backbone_task(ctx: EvalContext, eval_name: str) -> None:
    """lm / mlm / nsp / generation score the language-model head; a classifier or a span model has none."""
    task = ctx.load().task
    if task is not None and getattr(task, "name", "") in ("classification", "extractive_qa"):
        raise UserError(
            f"eval task {eval_name} needs a language model; checkpoint has a {task.name} head "
            f"(use eval.tasks=[{'qa' if task.name == 'extractive_qa' else task.name}])"
        )


def score_objective(ctx: EvalContext, objective) -> tuple[float, float, dict[str, float]]:
    """(summed loss over targets, number of targets, {extra: mean}) over this rank's share of the
    validation batches, summed over ranks."""
    rank, world_size = world()
    model = ctx.model.eval()

    def loss(batch):
        with autocast(ctx.device, ctx.precision):
            return objective.loss(model, batch)

    batches = objective.val_batches(ctx.cfg.trainer.eval_batches, rank, world_size)
    sums = sum_losses(loss, batches, ctx.device).all_reduce()
    return float(sums.total), float(sums.count), sums.extra_means()


@eval_task("lm")
def lm_task(ctx: EvalContext) -> TaskResult:
    """Causal-LM loss on a text source: all of it (eval/*) or its validation split (val/*, see
    _data_config). Bits per byte divide the summed
    NLL by the UTF-8 bytes of the scored text, so models with different tokenizers compare."""
    _check_backbone_task(ctx, "lm")
    if getattr(ctx.model, "is_encoder_decoder", False):
        raise UserError(
            "eval task lm needs a decoder checkpoint; use eval.tasks=[span_corruption] or [denoising] for t5"
        )
    if not getattr(ctx.model, "is_decoder", True):
        raise UserError("eval task lm needs a decoder checkpoint; use eval.tasks=[mlm] for encoders")
    sources = _mixture_sources(ctx)
    if sources:  # a mixture: each source's validation split, then all of them together
        out: dict[str, float | int] = {}
        parts, details = [], []
        for name, data in sources:
            scored = _scored_tokens(ctx, data, "val")
            _report_unk(scored, ctx.tokenizer)
            parts.append(_lm_sums(ctx, scored, data))
            out.update({f"{k}/{name}": v for k, v in _lm_metrics("val", *parts[-1]).items()})
            details.append({"name": name, **_data_details(scored, ctx.tokenizer)})
        total, count, n_bytes = (sum(p[i] for p in parts) for i in range(3))
        return TaskResult({**_lm_metrics("val", total, count, n_bytes), **out}, {"data": {"sources": details}})
    data, split = _data_config(ctx)
    scored = _scored_tokens(ctx, data, split)
    _report_unk(scored, ctx.tokenizer)
    sums = _lm_sums(ctx, scored, data)
    return TaskResult(_lm_metrics(scored.prefix, *sums), {"data": _data_details(scored, ctx.tokenizer)})


def _lm_sums(ctx: EvalContext, scored: Scored, data: DataConfig) -> tuple[float, float, int]:
    """(summed NLL, targets, UTF-8 bytes of the targets) of the clm loss over scored's tokens."""
    splits = scored.splits
    total, count, _ = score_objective(ctx, _objective(ctx, "clm", splits, data))
    if count == 0:
        raise UserError(f"data {scored.path}: no tokens to score")
    # The windows are scored in order, so the scored targets are val[1 : 1 + count].
    n_bytes = metrics.utf8_num_bytes(ctx.tokenizer.decode(splits.val[1 : 1 + int(count)].tolist()))
    return total, count, n_bytes


def _lm_metrics(prefix: str, total: float, count: float, n_bytes: int) -> dict[str, float | int]:
    return {
        f"{prefix}/loss": total / count,
        f"{prefix}/ppl": metrics.perplexity(total, int(count)),
        f"{prefix}/bits_per_byte": metrics.bits_per_byte(total, max(n_bytes, 1)),
        f"{prefix}/tokens": int(count),
    }


def _encoder_task(ctx: EvalContext, want: str) -> TaskResult:
    _check_backbone_task(ctx, want)
    if getattr(ctx.model, "is_decoder", False):
        raise UserError(f"eval task {want} needs an encoder (bert) checkpoint")
    trained = ctx.meta.get("objective", "")
    name = trained if want in trained.split("_") else want  # mlm_nsp scores both heads at once
    data, split = _data_config(ctx)
    scored = _scored_tokens(ctx, data, split)
    _report_unk(scored, ctx.tokenizer)
    total, count, extras = score_objective(ctx, _objective(ctx, name, scored.splits, data))
    out: dict[str, float | int] = {f"{want}/accuracy": extras.get(f"{want}_accuracy", math.nan)}
    if name == want:  # the loss is this head's own
        out[f"{want}/loss"] = total / max(count, 1.0)
    return TaskResult(out, {"data": _data_details(scored, ctx.tokenizer), "objective": name})


def _encoder_decoder_task(ctx: EvalContext, name: str) -> TaskResult:
    """The loss of an encoder-decoder's pretraining objective on a text source (as lm: all of it
    or its validation split)."""
    _check_backbone_task(ctx, name)
    if not getattr(ctx.model, "is_encoder_decoder", False):
        raise UserError(f"eval task {name} needs an encoder-decoder (t5) checkpoint")
    data, split = _data_config(ctx)
    scored = _scored_tokens(ctx, data, split)
    _report_unk(scored, ctx.tokenizer)
    total, count, _ = score_objective(ctx, _objective(ctx, name, scored.splits, data))
    if count == 0:
        raise UserError(f"data {scored.path}: no tokens to score")
    return TaskResult(
        {
            f"{name}/loss": total / count,
            f"{name}/ppl": metrics.perplexity(total, int(count)),
            f"{name}/tokens": int(count),
        },
        {"data": _data_details(scored, ctx.tokenizer)},
    )


@eval_task("span_corruption")
def span_corruption_task(ctx: EvalContext) -> TaskResult:
    return _encoder_decoder_task(ctx, "span_corruption")


@eval_task("denoising")
def denoising_task(ctx: EvalContext) -> TaskResult:
    return _encoder_decoder_task(ctx, "denoising")


@eval_task("mlm")
def mlm_task(ctx: EvalContext) -> TaskResult:
    return _encoder_task(ctx, "mlm")


@eval_task("nsp")
def nsp_task(ctx: EvalContext) -> TaskResult:
    return _encoder_task(ctx, "nsp")


# ----------------------------------------------------------------------------- generation
def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(v.strip() for v in value)  # SciTLDR: a source is a list of sentences
    raise UserError(f"{what} must be a string or a list of strings")


def read_references(path: str, task: TaskConfig, max_examples: int = 0) -> list[dict[str, Any]]:
    """[{"prompt" or "messages", "references": [str, ...]}] from a .jsonl (or .json list) file.

    Fields: task.source_field / task.target_field (SciTLDR: `source` list of sentences, joined;
    `target` list of alternative summaries, all kept as references); records without them may use
    prompt/response, or chat `messages` whose last (assistant) turn is the reference."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"generation references file not found: {path} (task.val_path)")
    raw = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            records = [(i + 1, r) for i, r in enumerate(json.loads(raw))]
        else:
            records = [(i + 1, json.loads(line)) for i, line in enumerate(raw.splitlines()) if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    out = []
    for line, rec in records:
        where = f"{path} record {line}"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object")
        if task.source_field in rec:
            src, tgt = task.source_field, task.target_field
        elif "prompt" in rec:
            src, tgt = "prompt", "response"
        elif "messages" in rec:
            msgs = rec["messages"]
            if not (
                isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant"
            ):
                raise UserError(f"{where}: messages must end with an assistant turn (the reference)")
            out.append({"messages": msgs[:-1], "references": [_text(msgs[-1].get("content"), where)]})
            continue
        else:
            raise UserError(f"{where}: no field {task.source_field!r} (task.source_field)")
        if tgt not in rec:
            raise UserError(f"{where}: no field {tgt!r} (task.target_field)")
        target = rec[tgt]
        refs = [target] if isinstance(target, str) else target
        if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
            raise UserError(f"{where}: {tgt!r} must be a string or a non-empty list of strings")
        out.append({"prompt": _text(rec[src], f"{where} field {src!r}"), "references": refs})
        if max_examples and len(out) >= max_examples:
            break
    if not out:
        raise UserError(f"{path}: no examples")
    return out[:max_examples] if max_examples else out


def chat_template_name(meta: dict[str, Any]) -> str | None:
    """The chat template of an instruction- or preference-tuned checkpoint (None: a plain LM)."""
    task = task_config_of(meta)
    if task.get("name") not in ("instruction", "preference") or task.get("pairs") == "arithmetic":
        return None
    return task.get("chat_template") or "default"


def prompt_ids(example: dict[str, Any], tokenizer, template: str | None, prompt_format: str | None) -> list[int]:
    """Token ids of an example's prompt: a chat template (tokenized per segment, as in training),
    eval.prompt_format ("{source} TL;DR:"), or the raw source text."""
    if template is not None and not prompt_format:
        from llmtrain.tasks.chat_template import encode_chat

        msgs = example.get("messages") or [{"role": "user", "content": example["prompt"]}]
        return encode_chat(msgs, template, tokenizer, add_generation_prompt=True)[0]
    if "messages" in example:
        text = "\n".join(m.get("content", "") for m in example["messages"]) + "\n"
    else:
        text = example["prompt"]
    ids = tokenizer.encode(prompt_format.format(source=text) if prompt_format else text)
    return ids or [tokenizer.bos_id]


def generate_texts(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_strings: list[str] | None = None,
    generator: torch.Generator | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
):
    """Batched, left-padded generation from token-id prompts; texts cut at eos and at stop strings."""
    from llmtrain.generation import generate, trim_at_stop

    stops = [s for s in (stop_strings or []) if s]
    stop_fn = (lambda _row, new: trim_at_stop(tokenizer.decode(new), stops)[1]) if stops else None
    res = generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id or 0,
        generator=generator,
        stop_fn=stop_fn,
        num_beams=num_beams,
        length_penalty=length_penalty,
    )
    texts = [trim_at_stop(tokenizer.decode(t), stops)[0] for t in res.tokens]
    return texts, res


def _generation_examples(ctx: EvalContext) -> tuple[list[list[int]], list[list[str]], list[str]]:
    """(prompt ids, references, stop strings). A checkpoint fine-tuned on a generative task uses
    its task's validation examples (prompts formatted as in training; task.val_path=FILE picks
    other data); a plain LM reads prompt/reference records from task.val_path."""
    cfg = ctx.cfg
    task = ctx.load().task
    stops = list(cfg.eval.stop)
    if task is not None and hasattr(task, "generate_responses"):
        examples = [e for e in task.val_examples() if e.get("prompt")]
        if cfg.eval.max_examples:
            examples = examples[: cfg.eval.max_examples]
        return (
            [list(e["prompt"]) for e in examples],
            [list(e["refs"]) for e in examples],
            stops + list(task.stop_strings()),
        )
    path = cfg.task.val_path
    if not path:
        raise UserError("eval task generation needs task.val_path=FILE.jsonl (prompt/response or source/target)")
    examples = read_references(path, _task_config(ctx), cfg.eval.max_examples)
    template = chat_template_name(ctx.meta)
    fmt = cfg.eval.prompt_format
    if template is not None and not fmt:
        from llmtrain.tasks.chat_template import stop_strings

        stops += stop_strings(template)
    prompts = [prompt_ids(ex, ctx.tokenizer, template, fmt) for ex in examples]
    if getattr(ctx.model, "is_encoder_decoder", False):  # the encoder input ends with </s>, as in training
        prompts = [p + [ctx.tokenizer.eos_id] for p in prompts]
    return prompts, [ex["references"] for ex in examples], stops


@eval_task("generation")
def generation_task(ctx: EvalContext) -> TaskResult:
    cfg = ctx.cfg
    _check_backbone_task(ctx, "generation")
    if not getattr(ctx.model, "is_decoder", True) and not getattr(ctx.model, "is_encoder_decoder", False):
        raise UserError("eval task generation needs a decoder or encoder-decoder (t5) checkpoint")
    prompts, refs, stops = _generation_examples(ctx)
    rank, world_size = world()
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.trainer.seed + rank)
    pairs, n_tokens, seconds = [], 0, 0.0
    for _, batch in shard(list(enumerate(prompts)), cfg.eval.batch_size, rank=rank, world=world_size):
        texts, res = generate_texts(
            ctx.model,
            ctx.tokenizer,
            [p for _, p in batch],
            max_new_tokens=cfg.eval.max_new_tokens,
            temperature=cfg.eval.temperature,
            top_k=cfg.eval.top_k,
            top_p=cfg.eval.top_p,
            stop_strings=stops,
            generator=gen,
            num_beams=cfg.eval.num_beams,
            length_penalty=cfg.eval.length_penalty,
        )
        pairs += [(i, t.strip()) for (i, _), t in zip(batch, texts)]
        n_tokens, seconds = n_tokens + res.num_generated, seconds + res.seconds
    hyps = gather_indexed(pairs)
    n_tokens, seconds = sum_across_ranks([n_tokens, seconds])
    rouge = metrics.rouge(hyps, refs)
    out = {
        "generation/bleu": metrics.bleu(hyps, refs),
        "generation/rouge1": rouge["rouge1"],
        "generation/rouge2": rouge["rouge2"],
        "generation/rougeL": rouge["rougeL"],
        "generation/exact_match": metrics.exact_match(hyps, refs),
        "generation/examples": len(hyps),
        "generation/tokens_per_s": n_tokens / seconds if seconds > 0 else 0.0,  # per process
    }
    samples = [
        {"prompt": ctx.tokenizer.decode(p), "generated": h, "references": r} for p, h, r in zip(prompts, hyps, refs)
    ]
    return TaskResult(out, {"samples": samples})


# ----------------------------------------------------------------------------- fine-tuning tasks
def task_overrides(cfg: TaskConfig) -> dict[str, Any]:
    """task.* keys given on the command line (those that differ from the schema defaults)."""
    default = TaskConfig()
    return {k: v for k, v in cfg.__dict__.items() if k != "name" and v != getattr(default, k)}


def _task_config(ctx: EvalContext) -> TaskConfig:
    """task.* from the command line over the checkpoint's own task config (fine-tuned checkpoints)."""
    return TaskConfig(**{**known_fields(TaskConfig, task_config_of(ctx.meta)), **task_overrides(ctx.cfg.task)})


def report_task_output(prefix: str, out: dict[str, Any]) -> TaskResult:
    """Split a task's evaluate() dict into flat scalar metrics and nested details."""
    scalars, details = {}, {}
    for k, v in out.items():
        name = k.split("/", 1)[1] if k.startswith(prefix + "/") or k.startswith("val/") else k
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            details[name] = v
        else:
            scalars[f"{prefix}/{name}"] = v
    return TaskResult(scalars, details)


def _require_task(ctx: EvalContext, eval_name: str, task_name: str):
    task = ctx.load().task
    if task is None:
        raise UserError(
            f"eval task {eval_name} needs a checkpoint fine-tuned on task {task_name} (this one has no task)"
        )
    if getattr(task, "name", task_name) != task_name:
        raise UserError(f"eval task {eval_name} needs a {task_name} checkpoint; this one is {task.name}")
    return task


def _rank0_evaluate(ctx: EvalContext, task, eval_name: str) -> TaskResult:
    """The contract's single-process Task.evaluate: rank 0 scores every example, the others wait."""
    out: dict[str, Any] = {}
    if world()[0] == 0:
        out = task.evaluate(ctx.model, ctx.device, max_examples=ctx.cfg.eval.max_examples)
    barrier()
    return report_task_output(eval_name, out)


def classification_result(preds: list[int], labels: list[int], names: list[str]) -> TaskResult:
    m = metrics.classification_metrics(preds, labels, names)
    out: dict[str, float | int] = {
        "classification/accuracy": m["accuracy"],
        "classification/macro_f1": m["macro_f1"],
        "classification/examples": m["n"],
    }
    for name, s in m["per_class"].items():
        out[f"classification/precision[{name}]"] = s["precision"]
        out[f"classification/recall[{name}]"] = s["recall"]
    return TaskResult(out, {k: m[k] for k in ("labels", "per_class", "confusion_matrix")})


@eval_task("classification")
def classification_task(ctx: EvalContext) -> TaskResult:
    task = _require_task(ctx, "classification", "classification")
    if not hasattr(task, "predict"):
        return _rank0_evaluate(ctx, task, "classification")
    examples = task.val_examples()
    if ctx.cfg.eval.max_examples:
        examples = examples[: ctx.cfg.eval.max_examples]
    rank, world_size = world()
    bs = ctx.cfg.eval.batch_size
    # this rank's batches in one call: full batches of bs, so predict batches them the same way
    mine = [ie for _, batch in shard(list(enumerate(examples)), bs, rank=rank, world=world_size) for ie in batch]
    preds = task.predict(ctx.model, [e for _, e in mine], ctx.device, batch_size=bs)
    preds = gather_indexed([(i, int(p)) for (i, _), p in zip(mine, preds)])
    return classification_result(preds, [int(e["label"]) for e in examples], list(task.labels))


@eval_task("qa")
def qa_task(ctx: EvalContext) -> TaskResult:
    """SQuAD EM/F1 (official normalisation). Questions (with all their doc-stride features) are
    sharded over ranks; the answers are gathered and scored once."""
    task = _require_task(ctx, "qa", "extractive_qa")
    if not (hasattr(task, "predict") and hasattr(task, "val_examples")):
        return _rank0_evaluate(ctx, task, "qa")
    feats = task.val_examples()
    by_q: dict[str, list] = {}
    for f in feats:
        by_q.setdefault(f["qid"], []).append(f)
    qids = list(by_q)
    if ctx.cfg.eval.max_examples:
        qids = qids[: ctx.cfg.eval.max_examples]
    rank, world_size = world()
    pairs = []
    for _, batch in shard(list(enumerate(qids)), ctx.cfg.eval.batch_size, rank=rank, world=world_size):
        preds = task.predict(ctx.model, [f for _, q in batch for f in by_q[q]], ctx.device)
        pairs += [(i, (q, preds.get(q, ""))) for i, q in batch]
    preds = dict(gather_indexed(pairs))
    refs = {q: [a["text"] for a in task.val_questions[q]["answers"]] or [""] for q in qids}
    res = report_task_output("qa", metrics.squad_metrics(preds, refs))
    res.details["samples"] = [
        {"prompt": task.val_questions[q]["question"], "generated": preds[q], "references": refs[q]} for q in qids[:5]
    ]
    return res


@eval_task("arithmetic")
def arithmetic_task(ctx: EvalContext) -> TaskResult:
    """Exact match of batched greedy answers on the held-out problems of task=arithmetic (the
    checkpoint's own task settings, or task.digits / task.ops / task.problem_seed given here).
    Sharded over ranks like generation."""
    from llmtrain.tasks import build_task

    _check_backbone_task(ctx, "arithmetic")
    if not getattr(ctx.model, "is_decoder", True):
        raise UserError("eval task arithmetic needs a decoder checkpoint")
    own = task_config_of(ctx.meta)
    generated = own.get("name") == "arithmetic" or own.get("pairs") == "arithmetic"  # SFT, or DPO on its pairs
    base = known_fields(TaskConfig, own) if generated else {}
    given = task_overrides(ctx.cfg.task) if ctx.cfg.task.name == "arithmetic" else {}
    tcfg = TaskConfig(**{**base, **given, "name": "arithmetic"})
    info = ctx.load()
    max_len = int(info.model_cfg.max_seq_len)
    data = DataConfig(seq_len=max_len, batch_size=ctx.cfg.eval.batch_size)
    task = build_task(tcfg, ctx.tokenizer, info.model_cfg, data)
    examples = task.val_examples()[: ctx.cfg.eval.max_examples or None]
    rank, world_size = world()
    pairs, n_tokens, seconds = [], 0, 0.0
    for _, batch in shard(list(enumerate(examples)), ctx.cfg.eval.batch_size, rank=rank, world=world_size):
        texts, res = generate_texts(
            ctx.model,
            ctx.tokenizer,
            [e["prompt"] for _, e in batch],
            max_new_tokens=tcfg.max_new_tokens,
            stop_strings=task.stop_strings(),
        )
        pairs += [(i, t.strip()) for (i, _), t in zip(batch, texts)]
        n_tokens, seconds = n_tokens + res.num_generated, seconds + res.seconds
    hyps = gather_indexed(pairs)
    n_tokens, seconds = sum_across_ranks([n_tokens, seconds])
    right = [h == e["refs"][0] for h, e in zip(hyps, examples)]
    out = {
        "arithmetic/exact_match": sum(right) / max(len(right), 1),
        "arithmetic/examples": len(right),
        "arithmetic/tokens_per_s": n_tokens / seconds if seconds > 0 else 0.0,
    }
    samples = [
        {"prompt": ctx.tokenizer.decode(e["prompt"]), "generated": h, "references": e["refs"]}
        for e, h in zip(examples[:20], hyps)
    ]
    return TaskResult(out, {"samples": samples})


# ----------------------------------------------------------------------------- sentence embeddings
@eval_task("sts")
def sts_task(ctx: EvalContext) -> TaskResult:
    """STS Spearman, alignment and uniformity of an encoder's sentence embeddings (eval.sts_path)."""
    from llmtrain.eval.sts import sts_eval

    return TaskResult(*sts_eval(ctx))


# ----------------------------------------------------------------------------- preference pairs
def _pair_task(ctx: EvalContext):
    """The held-out pairs: a reward/preference checkpoint's own validation split (or task.* given
    here), else task.train_path / task.val_path read as preference pairs with data.val_fraction,
    rendered with the checkpoint's chat template unless task.chat_template is given."""
    task = ctx.load().task
    if task is not None and getattr(task, "name", None) in ("reward", "preference"):
        return task
    from llmtrain.tasks import build_task

    given = task_overrides(ctx.cfg.task)
    if not (given.get("train_path") or given.get("val_path") or given.get("pairs") == "arithmetic"):
        raise UserError(
            "eval task preference needs pairs: pass task.val_path=FILE "
            "(or task.train_path=FILE, or task.pairs=arithmetic)"
        )
    if given.get("pairs") != "arithmetic":
        given.setdefault("train_path", given.get("val_path"))
    own = task_config_of(ctx.meta).get("chat_template")
    if own and "chat_template" not in given:
        given["chat_template"] = own
    task_cfg = TaskConfig(**{**known_fields(TaskConfig, {}), **given, "name": "preference"})
    model_cfg = ctx.load().model_cfg
    data = DataConfig(**{**ctx.cfg.data.__dict__, "seq_len": min(ctx.cfg.data.seq_len, model_cfg.max_seq_len)})
    return build_task(task_cfg, ctx.tokenizer, model_cfg, data)


@eval_task("preference")
def preference_task(ctx: EvalContext) -> TaskResult:
    """Held-out preference pairs: a reward model (task=reward) is right when it scores the chosen
    reply higher; any other decoder (a policy) when it gives the chosen reply the higher log-prob,
    summed over the reply's tokens (per token with eval.length_normalize=true)."""
    from llmtrain.tasks.preference import pair_logps

    task = _pair_task(ctx)
    model = ctx.model
    is_reward = getattr(task, "name", None) == "reward" and ctx.load().task is task
    if not is_reward and hasattr(model, "head"):
        raise UserError(f"eval task preference needs a decoder LM or a reward model; this checkpoint is a {task.name}")
    examples = task.val_examples()
    if ctx.cfg.eval.max_examples:
        examples = examples[: ctx.cfg.eval.max_examples]
    rank, world_size = world()
    pairs = []
    for _, batch in shard(list(enumerate(examples)), ctx.cfg.eval.batch_size, rank=rank, world=world_size):
        chunk = [e for _, e in batch]
        if is_reward:
            scores = task.rewards(model, chunk, ctx.device, ctx.cfg.eval.batch_size)
        else:
            scores, lens = pair_logps(model, task, chunk, ctx.device, ctx.cfg.eval.batch_size)
            if ctx.cfg.eval.length_normalize:
                scores = scores / lens.clamp(min=1)
        pairs += [(i, s) for (i, _), s in zip(batch, scores.tolist())]
    scores = torch.tensor(gather_indexed(pairs), dtype=torch.float64).reshape(-1, 2)
    right = (scores[:, 0] > scores[:, 1]).double()
    n = len(right)
    acc = float(right.mean()) if n else 0.0
    by = (
        "reward model"
        if is_reward
        else f"policy log-prob ({'per token' if ctx.cfg.eval.length_normalize else 'summed'})"
    )
    return TaskResult(
        {
            "preference/accuracy": acc,
            "preference/accuracy_se": math.sqrt(acc * (1 - acc) / n) if n else 0.0,
            "preference/margin": float((scores[:, 0] - scores[:, 1]).mean()) if n else 0.0,
            "preference/examples": n,
        },
        {"scored_by": by},
    )
