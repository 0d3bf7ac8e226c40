"""Extractive question answering (SQuAD v1.1 / v2.0 JSON): a start/end span head.

Input: `[CLS] question [SEP] context window [SEP]` (token types 0 / 1). Contexts longer than
the room left by the question are cut into overlapping windows; task.doc_stride is the overlap
in tokens (HF's meaning; at most half a window). A window that does not contain the whole answer,
and every window of an unanswerable (v2) question, is labelled with the span (0, 0) = [CLS].
Prediction per question: the best span (start <= end, at most task.max_answer_len tokens) over
all its windows, or "" (no answer) when the [CLS] score beats it by more than
task.null_threshold (v2 data only). Scores: squad_metrics (official normalisation; HasAns /
NoAns groups).

Token -> character offsets come from tokenizing the context word by word (a word with its
leading whitespace); a word that tokenizes to one token per character (char and byte
tokenizers) gets exact per-character offsets, otherwise every token spans its whole word.
Without task.val_path the LAST articles of the file validate (round(data.val_fraction *
articles), at least 1), so no paragraph is shared between train and validation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmtrain.data.sources import read_text
from llmtrain.errors import UserError
from llmtrain.eval.metrics import squad_metrics
from llmtrain.objectives.base import LossOutput
from llmtrain.registry import register
from llmtrain.tasks.base import HeadModel, Task, model_device, pad_rows, sequential_batches, valid_strings

_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])")


class SpanModel(HeadModel):
    """backbone + a linear layer giving start and end logits per token."""

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        start, end = self.head(self.hidden(input_ids, attention_mask, token_type_ids)).float().unbind(-1)
        return start, end


def read_squad(path: str | None, what: str) -> list[dict]:
    if not path:
        raise UserError(f"{what} is not set (a SQuAD JSON file)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what}: file not found: {path}")
    try:
        data = json.loads(read_text(p))
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UserError(f"{p}: not SQuAD JSON (expected {{'data': [articles]}})")
    return [valid_strings(art, p, f"article {i}") for i, art in enumerate(data["data"])]


def questions(articles: list[dict], path: str) -> list[dict]:
    out = []
    for a, art in enumerate(articles):
        for p, para in enumerate(art.get("paragraphs") or []):
            context = para.get("context")
            if not isinstance(context, str) or not context.strip():
                raise UserError(f"{path}: article {a} paragraph {p} has no 'context'")
            for q in para.get("qas") or []:
                where = f"{path}: question {q.get('id', '?')}"
                if not isinstance(q.get("question"), str) or not q["question"].strip():
                    raise UserError(f"{where}: empty 'question' (prompt)")
                answers = [x for x in q.get("answers") or [] if isinstance(x, dict) and x.get("text")]
                impossible = bool(q.get("is_impossible", False)) or not answers
                if not impossible and any(not isinstance(x.get("answer_start"), int) for x in answers):
                    raise UserError(f"{where}: answers need 'text' and an integer 'answer_start'")
                out.append(
                    {
                        "id": str(q.get("id", f"{a}-{p}-{len(out)}")),
                        "question": q["question"],
                        "context": context,
                        "answers": [] if impossible else answers,
                        "where": where,
                    }
                )
    return out


@register("task", "extractive_qa")
class ExtractiveQA(Task):
    name = "extractive_qa"
    needs_decoder = False  # the answer start must see the whole context: bidirectional encoder

    def build_model(self, backbone):
        return SpanModel(backbone)

    # ------------------------------------------------------------------ data
    def load(self):
        c = self.cfg
        train_arts = read_squad(c.train_path, "task.train_path")
        if c.val_path:
            val_arts, val_file = read_squad(c.val_path, "task.val_path"), c.val_path
        else:
            n_val = max(1, int(round(self.data_cfg.val_fraction * len(train_arts))))
            if n_val >= len(train_arts):
                raise UserError(
                    f"{c.train_path}: {len(train_arts)} article(s) are too few to split off "
                    "validation articles; set task.val_path"
                )
            train_arts, val_arts, val_file = train_arts[:-n_val], train_arts[-n_val:], c.train_path
        train_q = questions(train_arts, str(c.train_path))
        val_q = questions(val_arts, str(val_file))
        if c.max_examples > 0:
            train_q, val_q = train_q[: c.max_examples], val_q[: c.max_examples]
        if "with_negative" not in self._state:
            self._state["with_negative"] = any(not q["answers"] for q in train_q)
        self.val_questions = {q["id"]: q for q in val_q}
        self._offsets_cache: dict[str, tuple] = {}
        return self._features(train_q), self._features(val_q)

    def _context_tokens(self, context: str):
        hit = self._offsets_cache.get(context)
        if hit is None:
            ids, spans = [], []
            for m in _PIECE.finditer(context):
                piece = m.group()
                toks = self.encode(piece)
                if len(toks) == len(piece):  # one token per character: exact offsets
                    spans += [(m.start() + i, m.start() + i + 1) for i in range(len(piece))]
                else:
                    word_start = m.start() + len(piece) - len(piece.lstrip())
                    spans += [(word_start, m.end())] * len(toks)
                ids += toks
            hit = self._offsets_cache[context] = (ids, spans)
        return hit

    def _features(self, qs: list[dict]) -> list[dict]:
        tok, T = self.tokenizer, self.seq_len
        feats = []
        for q in qs:
            q_ids = self.encode(q["question"])
            if len(q_ids) > T // 2:
                q_ids = q_ids[: T // 2]
                self.count("questions_truncated")
            ctx_ids, spans = self._context_tokens(q["context"])
            room = T - len(q_ids) - 3
            overlap = min(max(self.cfg.doc_stride, 0), room // 2)
            a_start = a_end = None
            if q["answers"]:
                a = q["answers"][0]
                a_start = a["answer_start"]
                if q["context"][a_start : a_start + len(a["text"])] != a["text"]:
                    found = q["context"].find(a["text"])  # off-by-some answer_start: realign
                    if found < 0:
                        raise UserError(f"{q['where']}: answer {a['text']!r} is not in the context")
                    a_start = found
                a_end = a_start + len(a["text"])
            ws = 0
            while True:
                we = min(ws + room, len(ctx_ids))
                ids = [tok.cls_id, *q_ids, tok.sep_id, *ctx_ids[ws:we], tok.sep_id]
                off = len(q_ids) + 2
                start = end = 0
                if a_start is not None:
                    inside = [i for i in range(ws, we) if spans[i][1] > a_start and spans[i][0] < a_end]
                    if inside and spans[inside[0]][0] <= a_start and spans[inside[-1]][1] >= a_end:
                        start, end = off + inside[0] - ws, off + inside[-1] - ws
                feats.append({"ids": ids, "ctx": (off, ws, we), "start": start, "end": end, "qid": q["id"]})
                if we >= len(ctx_ids):
                    break
                ws = we - overlap
            if len(ctx_ids) > room:
                self.count("long_contexts_windowed")
        return feats

    def collate(self, examples):
        ids = pad_rows([e["ids"] for e in examples], self.tokenizer.pad_id)
        B, L = ids.shape
        mask = torch.zeros(B, L, dtype=torch.long)
        types = torch.zeros(B, L, dtype=torch.long)
        ctx = torch.zeros(B, L, dtype=torch.bool)
        for i, e in enumerate(examples):
            off, ws, we = e["ctx"]
            mask[i, : len(e["ids"])] = 1
            types[i, off : len(e["ids"])] = 1
            ctx[i, 0] = True  # [CLS] = no answer
            ctx[i, off : off + we - ws] = True
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": types,
            "context_mask": ctx,
            "start_positions": torch.tensor([e["start"] for e in examples]),
            "end_positions": torch.tensor([e["end"] for e in examples]),
        }

    # ------------------------------------------------------------------ loss / metrics
    @staticmethod
    def _logits(model, batch):
        start, end = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        keep = batch["context_mask"]  # answers lie in the context (or at [CLS])
        return start.masked_fill(~keep, -1e4), end.masked_fill(~keep, -1e4)

    def loss(self, model, batch):
        start, end = self._logits(model, batch)
        sp, ep = batch["start_positions"], batch["end_positions"]
        loss = (F.cross_entropy(start, sp) + F.cross_entropy(end, ep)) / 2
        correct = ((start.argmax(-1) == sp) & (end.argmax(-1) == ep)).sum()
        n = torch.tensor(sp.numel(), device=sp.device)
        return LossOutput(loss=loss, n_targets=n, extras={"span_accuracy": (correct, n)})

    @torch.no_grad()
    def predict(self, model, feats: list[dict], device=None) -> dict[str, str]:
        device = device or model_device(model)
        max_len = max(1, self.cfg.max_answer_len)
        best: dict[str, tuple[float, str]] = {}
        null: dict[str, float] = {}
        was = model.training
        model.eval()
        try:
            i0 = 0
            for batch in sequential_batches(feats, self.data_cfg.batch_size, self.collate):
                batch = {k: v.to(device) for k, v in batch.items()}
                start, end = self._logits(model, batch)
                # score[i, s, e] = start[s] + end[e] for s <= e < s + max_len, inside the context
                score = start[:, :, None] + end[:, None, :]
                L = score.shape[1]
                s_idx = torch.arange(L, device=device)
                ok = (s_idx[None, :] >= s_idx[:, None]) & (s_idx[None, :] < s_idx[:, None] + max_len)
                ok = ok[None] & batch["context_mask"][:, :, None] & batch["context_mask"][:, None, :]
                ok[:, 0, :] = False
                ok[:, :, 0] = False
                score = score.masked_fill(~ok, float("-inf"))
                flat = score.flatten(1).max(-1)
                for r in range(score.shape[0]):
                    f = feats[i0 + r]
                    qid, (off, ws, _) = f["qid"], f["ctx"]
                    null[qid] = min(null.get(qid, float("inf")), float(start[r, 0] + end[r, 0]))
                    val = float(flat.values[r])
                    if val == float("-inf"):
                        continue
                    s, e = divmod(int(flat.indices[r]), L)
                    q = self.val_questions.get(qid)
                    _, spans = self._context_tokens(q["context"])
                    text = q["context"][spans[ws + s - off][0] : spans[ws + e - off][1]].strip()
                    if qid not in best or val > best[qid][0]:
                        best[qid] = (val, text)
                i0 += score.shape[0]
        finally:
            model.train(was)
        threshold = self.cfg.null_threshold
        preds = {}
        for qid in null:
            score, text = best.get(qid, (float("-inf"), ""))
            no_answer = self._state.get("with_negative", True) and null[qid] > score + threshold
            preds[qid] = "" if no_answer else text
        return preds

    def evaluate(self, model, device=None, max_examples=0):
        feats = self.val_examples()
        qids = list(dict.fromkeys(f["qid"] for f in feats))
        if max_examples > 0:
            keep = set(qids[:max_examples])
            feats, qids = [f for f in feats if f["qid"] in keep], qids[:max_examples]
        preds = self.predict(model, feats, device)
        refs = {q: [a["text"] for a in self.val_questions[q]["answers"]] or [""] for q in qids}
        self.samples = [(self.val_questions[q]["question"], preds.get(q, ""), refs[q]) for q in qids[:5]]
        m = squad_metrics(preds, refs)
        return {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
