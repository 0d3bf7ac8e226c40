"""Preference pairs: a prompt (chat messages) with a chosen and a rejected reply, read from .json
or .jsonl in three common layouts, and the data side of the tasks trained on them (task=reward,
task=preference):

    flat:      {"prompt": "...", "chosen": "...", "rejected": "..."}        (optional "system")
    ShareGPT:  {"conversations": [{"from": "human", "value": ...}, ...],
                "chosen": {"from": "gpt", "value": ...}, "rejected": {...}}
    messages:  {"chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [...]}
               (the prompt is what both lists share; or an explicit "prompt" message list)

The prompt is rendered with instruction tuning's chat template (task.chat_template), so an SFT
checkpoint, its preference tuning and `llmtrain chat` see the same text. A bad record is one
line naming the file, the record and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmtrain.errors import UserError
from llmtrain.tasks.base import Task, pad_rows, train_val_records
from llmtrain.tasks.chat_template import encode_chat, encode_response, get_template

# ShareGPT speaker names -> chat roles
ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Pair:
    prompt: list[dict]  # {"role", "content"} messages, ending with a user turn
    chosen: str
    rejected: str


def _bad(where: str, field: str, problem: str) -> UserError:
    return UserError(f"{where} field {field!r}: {problem}")


def _message(m: Any, where: str, field: str) -> dict:
    """One message as {"role", "content"}, from either spelling ({"role","content"} or {"from","value"})."""
    if not isinstance(m, dict):
        raise _bad(where, field, "expected a message object ({'role', 'content'} or {'from', 'value'})")
    role, content = (m.get("role"), m.get("content")) if "role" in m else (m.get("from"), m.get("value"))
    if role not in ROLE_OF:
        raise _bad(where, field, f"unknown role {role!r} (expected one of {', '.join(ROLE_OF)})")
    if not isinstance(content, str):
        raise _bad(where, field, "message content is not a string")
    return {"role": ROLE_OF[role], "content": content}


def _messages(v: Any, where: str, field: str) -> list[dict]:
    if isinstance(v, str):  # a plain prompt string is one user turn
        return [{"role": "user", "content": v}]
    if not isinstance(v, list) or not v:
        raise _bad(where, field, "expected a non-empty list of messages")
    return [_message(m, where, f"{field}[{i}]") for i, m in enumerate(v)]


def _reply(v: Any, where: str, field: str) -> str:
    """A reply given as text, one assistant message, or a list whose last message is the reply."""
    if isinstance(v, list):
        if not v:
            raise _bad(where, field, "empty message list")
        v = v[-1]
        field = f"{field}[-1]"
    if isinstance(v, dict):
        m = _message(v, where, field)
        if m["role"] != "assistant":
            raise _bad(where, field, f"the reply must be an assistant message, not {m['role']!r}")
        v = m["content"]
    if not isinstance(v, str):
        raise _bad(where, field, "expected a string or an assistant message")
    if not v.strip():
        raise _bad(where, field, "empty reply")
    return v


def record_pair(rec: dict, where: str) -> Pair:
    """One record of any of the three layouts as a Pair; errors name `where` and the field."""
    for key in ("chosen", "rejected"):
        if key not in rec or rec[key] is None:
            raise UserError(f"{where} has no field {key!r} (fields: {', '.join(map(str, rec))})")
    if "conversations" in rec:  # ShareGPT
        prompt, field = _messages(rec["conversations"], where, "conversations"), "conversations"
    elif "prompt" in rec:  # flat, or an explicit prompt with message-list replies
        prompt, field = _messages(rec["prompt"], where, "prompt"), "prompt"
        if isinstance(rec.get("system"), str) and rec["system"].strip():
            prompt = [{"role": "system", "content": rec["system"]}, *prompt]
    elif isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list):  # implicit prompt
        chosen, rejected = _messages(rec["chosen"], where, "chosen"), _messages(rec["rejected"], where, "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise _bad(where, "rejected", "the message lists must share everything but the last reply")
        prompt, field = chosen[:-1], "chosen"
    else:
        raise UserError(
            f"{where}: no prompt: expected 'prompt' (flat), 'conversations' (ShareGPT) "
            "or 'chosen'/'rejected' message lists"
        )
    if not prompt or prompt[-1]["role"] != "user":
        raise _bad(where, field, "the prompt must end with a user message")
    if not prompt[-1]["content"].strip():
        raise _bad(where, field, "empty prompt (user message)")
    return Pair(prompt, _reply(rec["chosen"], where, "chosen"), _reply(rec["rejected"], where, "rejected"))


class PairTask(Task):
    """Shared by task=reward and task=preference: pairs tokenized as (prompt, chosen, rejected) ids,
    each reply ending with the template's end marker and eos, as instruction tuning trains it."""

    needs_decoder = True

    def __init__(self, cfg, tokenizer, model_cfg, data_cfg, state=None, seed=0):
        super().__init__(cfg, tokenizer, model_cfg, data_cfg, state, seed)
        get_template(cfg.chat_template)  # unknown template: error before any work

    def load(self):
        if self.cfg.pairs == "arithmetic":
            return self._arithmetic("train", self.cfg.num_train), self._arithmetic("val", self.cfg.num_val)
        train, val, train_file, val_file = train_val_records(self.cfg, self.data_cfg)
        return self._encode_all(train, train_file), self._encode_all(val, val_file)

    def _arithmetic(self, split: str, n: int) -> list[dict]:
        """task.pairs=arithmetic: the arithmetic task's problems of `split`, chosen = the right answer,
        rejected = a wrong one, tokenized as task=arithmetic's SFT saw them (prompt_ids / response_ids:
        the raw prompt "37+58=", the answer then eos; no chat template)."""
        from llmtrain.tasks.arithmetic import check_ops, preference_pairs

        c = self.cfg
        check_ops(list(c.ops))
        pairs = preference_pairs(n, digits=c.digits, ops=list(c.ops), seed=c.problem_seed, split=split)
        return self._encode_all(list(enumerate(pairs, 1)), f"task.pairs=arithmetic ({split})")

    def _encode_all(self, records, path) -> list[dict]:
        out = []
        for n, rec in records:
            where = f"{path}: record {n}"
            out.append(self.encode_pair(record_pair(rec, where), where))
        return out

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if self.cfg.pairs == "arithmetic":  # the raw problem text, as task=arithmetic's SFT saw it
            return self.tokenizer.encode("".join(m["content"] for m in messages))
        ids, _ = encode_chat(messages, self.cfg.chat_template, self.tokenizer, add_generation_prompt=True)
        return ids

    def response_ids(self, text: str) -> list[int]:
        if self.cfg.pairs == "arithmetic":  # the answer, then eos
            ids = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        else:
            ids = encode_response(text, self.cfg.chat_template, self.tokenizer)
        self.count("tokens", len(ids))
        self.count("unk_tokens", sum(1 for i in ids if i == self.tokenizer.unk_id))
        return ids

    def encode_pair(self, pair: Pair, where: str) -> dict:
        p = self.prompt_ids(pair.prompt)
        self.count("tokens", len(p))
        self.count("unk_tokens", sum(1 for i in p if i == self.tokenizer.unk_id))
        c, r = self.response_ids(pair.chosen), self.response_ids(pair.rejected)
        p, (c, r) = self.truncate(p, [c, r])
        if c == r:  # the replies differ only past the window: no signal, reported
            self.count("pairs_identical_after_truncation")
        return {"prompt": p, "chosen": c, "rejected": r, "where": where}

    def truncate(self, prompt: list[int], replies: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        """Fit prompt + each reply into data.seq_len tokens, as instruction tuning does: first drop
        the start of the prompt (down to half the window, keeping its end, the assistant header),
        then the end of the replies. The same prompt cut for both replies of a pair (counted as
        prompt_truncated / response_truncated)."""
        budget = self.seq_len
        longest = max(len(x) for x in replies)
        if len(prompt) + longest <= budget:
            return prompt, replies
        keep = min(len(prompt), max(budget // 2, budget - longest))
        if keep < len(prompt):
            self.count("prompt_truncated")
            prompt = prompt[len(prompt) - keep :]
        room = budget - len(prompt)
        if longest > room:
            self.count("response_truncated")
            replies = [x[:room] for x in replies]
        return prompt, replies

    # ------------------------------------------------------------------ batches
    def sequences(self, examples: list[dict]) -> tuple[list[list[int]], list[int]]:
        """Rows prompt + chosen for every example, then prompt + rejected; and each prompt's length."""
        rows = [e["prompt"] + e["chosen"] for e in examples] + [e["prompt"] + e["rejected"] for e in examples]
        return rows, [len(e["prompt"]) for e in examples] * 2

    def collate_lm(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Shifted (input, label) rows as the instruction task builds them: labels on reply tokens only."""
        rows, plens = self.sequences(examples)
        inputs = pad_rows([r[:-1] for r in rows], self.tokenizer.pad_id)
        labels = pad_rows([[-100] * (n - 1) + r[n:] for r, n in zip(rows, plens)], -100, inputs.shape[1])
        return {"input_ids": inputs, "labels": labels}

    def collate_scored(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Whole rows for a scalar head: ids and the position of each row's last real token."""
        rows, _ = self.sequences(examples)
        return {
            "input_ids": pad_rows(rows, self.tokenizer.pad_id),
            "last": torch.tensor([len(r) - 1 for r in rows], dtype=torch.long),
        }


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's labelled tokens (float32) and how many there are."""
    logits = model(input_ids)
    nll = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )  # [N, T], 0 where ignored
    return -nll.sum(-1), (labels != -100).sum(-1)
