"""The task contract: a fine-tuning task is a data format + a head/loss + metrics.

    task = build_task(cfg.task, tokenizer, model_cfg, cfg.data, seed=cfg.trainer.seed)  # kind "task"
    model = task.build_model(backbone)        # backbone + new head (or the backbone itself)
    # what the trainer trains, like an objective (Trainee, llmtrain/objectives/base.py):
    source = task.train_source(rank, world)   # .batch(step) -> dict
    for batch in task.val_batches(max_batches): out = task.loss(model, batch)
    task.evaluate(model, device) -> {"accuracy": ..., "f1": ...}     # llmtrain/eval/metrics.py
    task.state()                              # JSON (e.g. label names), stored in meta["task"]
    task.prepare(model, device, run_dir)      # before training, on the initial model (e.g. DPO's reference)

Tasks read their own files (task.train_path / task.val_path); the `lm` task reads data.path
(or takes the token splits it is built with). Examples are tokenized once; batches are a pure
function of (seed, step, rank).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from llmtrain.config.schema import DataConfig, ModelConfig, TaskConfig
from llmtrain.data.loader import step_generator
from llmtrain.data.sources import read_text, valid_text
from llmtrain.data.validation import shard, sum_losses
from llmtrain.errors import UserError
from llmtrain.objectives.base import LossOutput, Trainee
from llmtrain.tokenizers import Tokenizer


class HeadModel(nn.Module):
    """A backbone plus one new linear head (`head`) on its hidden states; task models subclass it."""

    def __init__(self, backbone: nn.Module, out_features: int):
        super().__init__()
        self.backbone = backbone
        self.is_decoder = bool(getattr(backbone, "is_decoder", True))
        self.head = nn.Linear(backbone.config.d_model, out_features)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self):
        return self.backbone.config

    def hidden(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        # Decoders see right padding only after the real tokens, so they need no mask.
        if self.is_decoder:
            return self.backbone.encode(input_ids)
        return self.backbone.encode(input_ids, attention_mask, token_type_ids)


class Task(Trainee):
    name = "base"
    needs_decoder: bool | None = None  # True: generative (gpt2/llama); False: encoder only; None: any
    supports_encoder_decoder = False  # True: also trains an encoder-decoder (t5), source -> target
    token_loss = False  # see Trainee; generative and LM tasks set it
    chunked_loss = False  # trainer.chunked_loss, set by the Trainer (instruction, lm: the LM head's loss)

    def __init__(
        self,
        cfg: TaskConfig,
        tokenizer: Tokenizer,
        model_cfg: ModelConfig,
        data_cfg: DataConfig,
        state: dict | None = None,
        seed: int = 0,
    ):
        self.cfg, self.tokenizer, self.model_cfg, self.data_cfg = cfg, tokenizer, model_cfg, data_cfg
        self.seed = seed  # of the training batches
        self._state = dict(state or {})
        from llmtrain.models import model_class

        model_cls = model_class(model_cfg.name)
        self.is_decoder = bool(getattr(model_cls, "is_decoder", True))
        self.is_encoder_decoder = bool(getattr(model_cls, "is_encoder_decoder", False))
        if self.is_encoder_decoder and not self.supports_encoder_decoder:
            raise UserError(
                f"task={self.name} does not fit the {model_cfg.name!r} encoder-decoder checkpoint "
                "(its tasks: seq2seq, summarization)"
            )
        if self.needs_decoder is True and not self.is_decoder and not self.is_encoder_decoder:
            raise UserError(
                f"task={self.name} needs a decoder checkpoint (gpt2, llama), "
                f"but the checkpoint is a {model_cfg.name!r} encoder"
            )
        if self.needs_decoder is False and self.is_decoder:
            raise UserError(
                f"task={self.name} needs an encoder checkpoint (bert), "
                f"but the checkpoint is a {model_cfg.name!r} decoder"
            )
        self.seq_len = min(data_cfg.seq_len, model_cfg.max_seq_len)
        self.report: dict[str, int] = {}  # counts worth telling the user (truncated, unk tokens)
        self._train: list | None = None
        self._val: list | None = None

    # -------------------------------------------------------------------- contract
    def build_model(self, backbone: nn.Module) -> nn.Module:
        return backbone

    def train_source(self, rank: int = 0, world: int = 1) -> ExampleSource:
        return ExampleSource(self.train_examples(), self.data_cfg.batch_size, self.seed, self.collate, rank, world)

    def val_batches(self, max_batches: int = 0, rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        return sequential_batches(self.val_examples(), self.data_cfg.batch_size, self.collate, max_batches, rank, world)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        raise NotImplementedError

    def evaluate(
        self, model: nn.Module, device: torch.device | str | None = None, max_examples: int = 0
    ) -> dict[str, float]:
        raise NotImplementedError

    def state(self) -> dict:
        return dict(self._state)

    def prepare(self, model: nn.Module, device, run_dir: Path, rank: int = 0, world: int = 1) -> str | None:
        """Work on the initial model before training starts (e.g. preference tuning's reference
        log-probs); nothing for most tasks. Returns a line to print, or None."""
        return None

    def write_files(self, run_dir: Path) -> None:
        """Files the task keeps in the run directory (written once every check has passed)."""

    def val_loss(self, model, device=None, max_batches: int = 0) -> float:
        """Mean loss over the validation set (response tokens only for generative tasks); used for
        the before/after-training report."""
        device = device or model_device(model)
        was = model.training
        model.eval()
        try:
            # Every target of the whole set, in one process; without autocast (full precision).
            sums = sum_losses(lambda batch: self.loss(model, batch), self.val_batches(max_batches), device)
        finally:
            model.train(was)
        return sums.mean_loss()

    # -------------------------------------------------------------------- data
    def load(self) -> tuple[list, list]:
        """(train examples, val examples), tokenized; each task implements this."""
        raise NotImplementedError

    def _ensure_loaded(self) -> None:
        if self._train is None:
            self._train, self._val = self.load()
            if not self._train:
                raise UserError(f"task {self.name}: no training examples in {self.cfg.train_path}")
            if not self._val:
                raise UserError(
                    f"task {self.name}: no validation examples (set task.val_path or data.val_fraction > 0)"
                )

    def train_examples(self) -> list:
        self._ensure_loaded()
        return self._train  # type: ignore[return-value]

    def val_examples(self) -> list:
        self._ensure_loaded()
        return self._val  # type: ignore[return-value]

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def count(self, key: str, n: int = 1) -> None:
        self.report[key] = self.report.get(key, 0) + n

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        unk = sum(1 for i in ids if i == self.tokenizer.unk_id)
        if unk:  # chars the checkpoint's vocabulary lacks: kept as unk, and reported
            self.count("unk_tokens", unk)
        self.count("tokens", len(ids))
        return ids

    def summary(self) -> str:
        n_train, n_val = len(self.train_examples()), len(self.val_examples())
        parts = [f"task {self.name}: {n_train:,} train / {n_val:,} val examples"]
        for k, v in self.report.items():
            if k != "tokens" and v:
                parts.append(f"{k.replace('_', ' ')} {v:,}")
                if k == "unk_tokens":  # characters the checkpoint's vocabulary lacks
                    parts[-1] += f" ({100 * v / max(self.report.get('tokens', 0), 1):.2f}% of tokens)"
        return ", ".join(parts)


# ------------------------------------------------------------------------ batching
class ExampleSource:
    """Epoch-shuffled batches of examples; batch(step) depends only on (seed, step, rank)."""

    def __init__(
        self, examples: list, batch_size: int, seed: int, collate: Callable, rank: int = 0, world_size: int = 1
    ):
        self.examples, self.batch_size, self.seed, self.collate = examples, batch_size, seed, collate
        self.rank, self.world_size = rank, world_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(len(self.examples), generator=step_generator(self.seed, 0x7A5C, epoch)))
        return self._perm[1]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        first = (step * self.world_size + self.rank) * self.batch_size
        picked = []
        for g in range(first, first + self.batch_size):
            epoch, idx = divmod(g, len(self.examples))
            picked.append(self.examples[int(self._epoch(epoch)[idx])])
        return self.collate(picked)


def sequential_batches(
    examples: list, batch_size: int, collate: Callable, max_batches: int = 0, rank: int = 0, world: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """The examples in order, collated in batches: this rank's share (llmtrain.data.validation.shard)."""
    for _, chunk in shard(examples, batch_size, max_batches, rank, world):
        yield collate(chunk)


def pad_rows(rows: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    """Right-pad lists of ids into a [B, max_len] tensor."""
    T = length or max(len(r) for r in rows)
    # one tensor built from padded Python lists: a torch.tensor per row cost more than the model
    # at evaluation batch sizes
    return torch.tensor([r[:T] + [value] * (T - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), T)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------ files
TABULAR = (".tsv", ".csv")


def read_records(
    path: str | None, what: str = "task.train_path", columns: list[str] | None = None
) -> list[dict[str, Any]]:
    """Records of a .json (list, or {"data": [...]}), .jsonl, .csv or .tsv file. A .csv/.tsv has a
    header row, unless `columns` (task.columns) names its columns."""
    if not path:
        raise UserError(f"{what} is not set (the task's data file)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what}: file not found: {path}")
    suffix = p.suffix.lower()
    if columns is not None and suffix not in TABULAR:
        raise UserError(f"task.columns names the columns of .tsv/.csv files; {path} is {suffix or 'not one'}")
    text = read_text(p)
    if suffix in TABULAR:
        dialect = dict(
            delimiter="\t" if suffix == ".tsv" else ",",
            quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
        )
        if columns is None:
            reader = csv.DictReader(io.StringIO(text), **dialect)
            rows = [dict(r) for r in reader]
            if reader.fieldnames is None:
                raise UserError(f"{p}: empty file (a header row is needed, or task.columns=[...])")
            return rows
        names = [str(c) for c in columns]
        if not names or len(set(names)) != len(names):
            raise UserError(f"task.columns={names} must be distinct and non-empty")
        rows = []
        for n, row in enumerate(csv.reader(io.StringIO(text), **dialect), 1):
            if not row:
                continue
            if len(row) != len(names):
                raise UserError(
                    f"{p}: row {n} has {len(row)} columns but task.columns names {len(names)} ({', '.join(names)})"
                )
            rows.append(dict(zip(names, row)))
        if not rows:
            raise UserError(f"{p}: empty file")
        return rows
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}: record {n} is not valid JSON: {e.msg}") from None
            if not isinstance(rec, dict):
                raise UserError(f"{p}: record {n} is not a JSON object")
            out.append(valid_strings(rec, p, f"record {n}"))
        return out
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not valid JSON: {e.msg} (line {e.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{p}: expected a JSON list of objects")
        return [valid_strings(rec, p, f"record {n}") for n, rec in enumerate(data, 1)]
    raise UserError(f"{what}: unsupported file type {p.suffix!r} (use .json, .jsonl, .csv or .tsv): {path}")


def valid_strings(obj: Any, path: Path, where: str, key: str = "") -> Any:
    """`obj` with every string checked to be real text (JSON escapes can spell an unpaired
    surrogate, which no tokenizer can encode): a UserError names the record and field."""
    if isinstance(obj, str):
        return valid_text(obj, path, f"{where} field {key!r}" if key else where, hint="")
    if isinstance(obj, dict):
        for k, v in obj.items():
            valid_strings(v, path, where, f"{key}.{k}" if key else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            valid_strings(v, path, where, f"{key}[{i}]")
    return obj


def _looks_like_data(names: list) -> bool:
    """Header values that no one would name a column: numbers, blanks, sentences."""

    def datum(s) -> bool:
        s = str(s).strip()
        try:
            float(s)
            return True
        except ValueError:
            return not s or len(s.split()) > 3

    return any(datum(s) for s in names)


def field_of(rec: dict, key: str, path: str | None, n: int, required: bool = True) -> Any:
    if key not in rec or rec[key] is None:
        if not required:
            return None
        names = [k for k in rec if k is not None]
        if path and Path(path).suffix.lower() in TABULAR and _looks_like_data(names):
            # csv read the first record as the header: no *_field option can name these columns
            shown = ", ".join(repr(s if len(s) <= 30 else s[:27] + "...") for s in map(str, names))
            raise UserError(
                f"{path}: no column {key!r}; the header row ({shown}) looks like data: name the "
                f"columns of a file without a header with task.columns=[...] (e.g. task.columns=[label,text])"
            )
        raise UserError(
            f"{path}: record {n} has no field {key!r} (fields: {', '.join(map(str, rec))}); "
            f"set the task's *_field option"
        )
    return rec[key]


def split_off(records: list, val_fraction: float, what: str) -> tuple[list, list]:
    """Deterministic (seed-independent) shuffle by record, the last val_fraction validates."""
    if not 0 < val_fraction < 1:
        raise UserError(f"{what} has no task.val_path and data.val_fraction={val_fraction} is not in (0, 1)")
    perm = np.random.default_rng(0).permutation(len(records))
    n_val = max(1, int(round(val_fraction * len(records))))
    if n_val >= len(records):
        raise UserError(f"{what}: {len(records)} records are too few to split off a validation part")
    return [records[i] for i in perm[:-n_val]], [records[i] for i in perm[-n_val:]]


def cap(records: list, n: int) -> list:
    return records[:n] if n > 0 else records


def train_val_records(cfg: TaskConfig, data_cfg: DataConfig) -> tuple[list, list, str, str]:
    """Train and validation records as (record number in its file, record), with the file each
    came from (for error messages)."""
    columns = list(cfg.columns) if cfg.columns is not None else None
    train = list(enumerate(read_records(cfg.train_path, "task.train_path", columns), 1))
    if cfg.val_path:
        val = list(enumerate(read_records(cfg.val_path, "task.val_path", columns), 1))
        return cap(train, cfg.max_examples), cap(val, cfg.max_examples), cfg.train_path, cfg.val_path
    train, val = split_off(train, data_cfg.val_fraction, str(cfg.train_path))
    return cap(train, cfg.max_examples), cap(val, cfg.max_examples), cfg.train_path, cfg.train_path
