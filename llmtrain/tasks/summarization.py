"""Summarization: for decoders `{source}\nTL;DR: {target}</s>`, loss on the target only; for an
encoder-decoder (t5) the source goes to the encoder and the decoder predicts `{target}</s>`.
`task=seq2seq` is the same for any source/target pairs (translation, ...), with no stop string.

Records are JSON/JSONL/CSV/TSV with task.source_field and task.target_field; a field may be a
list (SciTLDR: `source` = the abstract's sentences, joined with spaces; `target` = several
one-sentence TLDRs). Training uses the FIRST target of each record (task.all_targets=true:
one example per target); evaluation scores generated summaries with ROUGE/BLEU against ALL
targets (best match). Long sources are cut at the end so the prompt suffix and target fit in
data.seq_len; targets are capped at half of it (both counted as truncated)."""

from __future__ import annotations

from llmtrain.errors import UserError
from llmtrain.registry import register
from llmtrain.tasks.base import field_of, train_val_records
from llmtrain.tasks.generative import GenerativeTask


def _texts(value, where: str, what: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(x, str) for x in items):
        raise UserError(f"{where}: {what} must be a string or a list of strings")
    return [x.strip() for x in items]


@register("task", "summarization")
class Summarization(GenerativeTask):
    name = "summarization"
    supports_encoder_decoder = True

    @property
    def suffix(self) -> str:
        return self.cfg.prompt_suffix

    def stop_strings(self):
        return [] if self.is_encoder_decoder else ["\n"]

    def load(self):
        train, val, train_file, val_file = train_val_records(self.cfg, self.data_cfg)
        tr = self.check_kept(self._examples(train, train_file, train=True), len(train), train_file)
        va = self.check_kept(self._examples(val, val_file, train=False), len(val), val_file)
        packing = self.cfg.packing and not self.is_encoder_decoder  # encoder-decoder rows are pairs
        return (self.pack(tr) if packing else tr), va

    def _examples(self, records, path, train: bool) -> list[dict]:
        c, tok = self.cfg, self.tokenizer
        all_targets = c.all_targets
        suffix = self.encode(self.suffix)
        out = []
        for n, rec in records:
            where = f"{path}: record {n}"
            source = " ".join(_texts(field_of(rec, c.source_field, path, n), where, c.source_field)).strip()
            targets = [t for t in _texts(field_of(rec, c.target_field, path, n), where, c.target_field) if t]
            if not source:
                raise UserError(f"{where}: empty {c.source_field!r} (prompt)")
            if not targets:
                raise UserError(f"{where}: empty {c.target_field!r} (response)")
            src = self.encode(source)
            for target in targets if train and all_targets else targets[:1]:
                full = self.encode(target)
                if self.is_encoder_decoder:
                    out.append(self.encoder_decoder_example(src, full, targets, where))
                    continue
                tgt = full[: self.seq_len // 2]
                room = self.seq_len + 1 - len(suffix) - len(tgt) - 1
                cut = src[: max(room, 1)]
                if len(cut) < len(src) or len(tgt) < len(full):
                    self.count("truncated")
                prompt = cut + suffix
                ids = prompt + tgt + [tok.eos_id]
                ex = self.make_example(ids, [False] * len(prompt) + [True] * (len(tgt) + 1), prompt, targets, where)
                if ex is not None:
                    out.append(ex)
        return out


@register("task", "seq2seq")
class Seq2Seq(Summarization):
    """Any source -> target pairs (task.source_field / task.target_field of a .json, .jsonl,
    .csv or .tsv file); generation ends at </s> only."""

    name = "seq2seq"

    def stop_strings(self):
        return []
