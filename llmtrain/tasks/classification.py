"""Sequence (pair) classification: text [+ text pair] -> one of N labels.

Input layout: encoders get `[CLS] a [SEP] (b [SEP])` with token types 0/1 and are pooled at
[CLS] through BERT's pooler; decoders get `<s> a [SEP] b </s>` and are pooled at the last real
token (the only one that has seen the whole input under causal attention). Right padding, so
a decoder needs no attention mask. Metrics: accuracy and macro-F1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmtrain.errors import UserError
from llmtrain.eval.metrics import classification_metrics
from llmtrain.objectives.base import LossOutput
from llmtrain.registry import register
from llmtrain.tasks.base import HeadModel, Task, field_of, model_device, pad_rows, sequential_batches, train_val_records


class SequenceClassifier(HeadModel):
    """backbone + a linear head on the pooled representation."""

    def __init__(self, backbone: nn.Module, n_labels: int, dropout: float = 0.0):
        super().__init__(backbone, n_labels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.classify(self.hidden(input_ids, attention_mask, token_type_ids), input_ids, attention_mask)

    def classify(self, hidden, input_ids, attention_mask=None):
        """Logits from the backbone's hidden states (distillation also reads the hidden states)."""
        if self.is_decoder:  # the last real token (right padding: real tokens never see pads)
            last = (
                attention_mask.sum(1) - 1
                if attention_mask is not None
                else input_ids.new_full((input_ids.shape[0],), input_ids.shape[1] - 1)
            )
            pooled = hidden[torch.arange(input_ids.shape[0], device=hidden.device), last]
        else:
            pooled = self.backbone.pooled(hidden) if hasattr(self.backbone, "pooled") else hidden[:, 0]
        return self.head(self.dropout(pooled))


def _sort_labels(labels: set[str]) -> list[str]:
    try:
        return sorted(labels, key=lambda s: (float(s), s))  # "2" before "10"
    except ValueError:
        return sorted(labels)


@register("task", "classification")
class Classification(Task):
    name = "classification"

    def __init__(self, cfg, tokenizer, model_cfg, data_cfg, state=None, seed=0):
        super().__init__(cfg, tokenizer, model_cfg, data_cfg, state, seed)
        if cfg.labels is not None:
            self._state["labels"] = [str(x) for x in cfg.labels]
            if len(set(self._state["labels"])) != len(self._state["labels"]) or not self._state["labels"]:
                raise UserError(f"task.labels={list(cfg.labels)} must be distinct and non-empty")

    @property
    def labels(self) -> list[str]:
        if "labels" not in self._state:
            self._ensure_loaded()  # infers them from the training data
        return self._state["labels"]

    def build_model(self, backbone):
        return SequenceClassifier(backbone, len(self.labels), self.model_cfg.dropout)

    # ------------------------------------------------------------------ data
    def load(self):
        c = self.cfg
        train, val, train_file, val_file = train_val_records(c, self.data_cfg)
        if "labels" not in self._state:
            found = {str(field_of(r, c.label_field, train_file, n)).strip() for n, r in train}
            if len(found) < 2:
                raise UserError(
                    f"{train_file}: found {len(found)} distinct value(s) of {c.label_field!r}; "
                    "classification needs at least 2 labels"
                )
            self._state["labels"] = _sort_labels(found)
        index = {lab: i for i, lab in enumerate(self._state["labels"])}
        return self._encode_all(train, train_file, index), self._encode_all(val, val_file, index)

    def _encode_all(self, records, path, index) -> list[dict]:
        c, tok = self.cfg, self.tokenizer
        out = []
        for n, rec in records:
            label = str(field_of(rec, c.label_field, path, n)).strip()
            if label not in index:
                raise UserError(
                    f"{path}: record {n} has label {label!r} outside the label set {list(index)} (task.labels)"
                )
            a = self.encode(str(field_of(rec, c.text_field, path, n)))
            b = self.encode(str(field_of(rec, c.text_pair_field, path, n))) if c.text_pair_field else None
            if not a:
                raise UserError(f"{path}: record {n} has an empty {c.text_field!r}")
            # special tokens around the text(s): 2 for a single text, 3 for a pair
            room = self.seq_len - (3 if b is not None else 2)
            if len(a) + len(b or []) > room:
                self.count("truncated")
                while len(a) + len(b or []) > room:  # longest first, as HF's default
                    if b is not None and len(b) > len(a):
                        b.pop()
                    else:
                        a.pop()
            if self.is_decoder:
                ids = [tok.bos_id, *a] + ([tok.sep_id, *b] if b is not None else []) + [tok.eos_id]
                types = [0] * len(ids)
            else:
                ids = [tok.cls_id, *a, tok.sep_id] + ([*b, tok.sep_id] if b is not None else [])
                types = [0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2)
            out.append({"ids": ids, "types": types, "label": index[label]})
        return out

    def collate(self, examples):
        ids = pad_rows([e["ids"] for e in examples], self.tokenizer.pad_id)
        mask = pad_rows([[1] * len(e["ids"]) for e in examples], 0, ids.shape[1])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": pad_rows([e["types"] for e in examples], 0, ids.shape[1]),
            "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long),
        }

    # ------------------------------------------------------------------ loss / metrics
    def loss(self, model, batch):
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels)
        correct = (logits.argmax(-1) == labels).sum()
        n = torch.tensor(labels.numel(), device=labels.device)
        return LossOutput(loss=loss, n_targets=n, extras={"accuracy": (correct, n)})

    @torch.no_grad()
    def predict(self, model, examples, device=None, batch_size: int = 0) -> list[int]:
        """Predicted label ids, in batches of batch_size (0: data.batch_size); one host sync at the end."""
        device = device or model_device(model)
        was = model.training
        model.eval()
        preds: list[torch.Tensor] = []
        try:
            for batch in sequential_batches(examples, batch_size or self.data_cfg.batch_size, self.collate):
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                preds.append(logits.argmax(-1))
        finally:
            model.train(was)
        return torch.cat(preds).tolist() if preds else []

    def evaluate(self, model, device=None, max_examples=0):
        examples = self.val_examples()
        if max_examples > 0:
            examples = examples[:max_examples]
        preds = self.predict(model, examples, device)
        m = classification_metrics(preds, [e["label"] for e in examples], self.labels)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "examples": m["n"]}
