"""Instruction tuning (SFT) on Alpaca JSON ({instruction, input, output}) or chat JSONL
({"messages": [{"role": system|user|assistant, "content"}]}). A chat template
(llmtrain/tasks/chat_template.py, task.chat_template) turns each record into tokens; the loss
is on the assistant tokens only (their content, end marker and eos). task.packing=true packs
short examples into full rows. Evaluation generates the last assistant turn of each validation
conversation and scores it with ROUGE/BLEU against the reference."""

from __future__ import annotations

from llmtrain.errors import UserError
from llmtrain.registry import register
from llmtrain.tasks.base import train_val_records
from llmtrain.tasks.chat_template import check_messages, encode_chat, get_template, stop_strings
from llmtrain.tasks.generative import GenerativeTask


def record_messages(rec: dict, where: str) -> list[dict]:
    """One record (chat or Alpaca) as validated messages; empty prompts/responses are errors."""
    if "messages" in rec:
        messages = check_messages(rec["messages"], where)
    elif "instruction" in rec:
        instruction = rec.get("instruction")
        extra = rec.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str) or not isinstance(rec.get("output"), str):
            raise UserError(f"{where}: 'instruction', 'input' and 'output' must be strings")
        user = instruction.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
        messages = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": rec["output"]},
        ]
    else:
        raise UserError(f"{where}: neither 'messages' (chat) nor 'instruction' (Alpaca) found")
    for m in messages:
        if m["role"] in ("user", "assistant") and not m["content"].strip():
            what = "prompt (user message)" if m["role"] == "user" else "response (assistant message)"
            raise UserError(f"{where}: empty {what}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message to train on")
    if not any(m["role"] == "user" for m in messages):
        raise UserError(f"{where}: no user message (empty prompt)")
    return messages


@register("task", "instruction")
class Instruction(GenerativeTask):
    name = "instruction"

    def __init__(self, cfg, tokenizer, model_cfg, data_cfg, state=None, seed=0):
        super().__init__(cfg, tokenizer, model_cfg, data_cfg, state, seed)
        get_template(cfg.chat_template)  # unknown template: error before any work

    def stop_strings(self):
        return stop_strings(self.cfg.chat_template)

    def load(self):
        train, val, train_file, val_file = train_val_records(self.cfg, self.data_cfg)
        tr = self.check_kept(self._examples(train, train_file), len(train), train_file)
        va = self.check_kept(self._examples(val, val_file), len(val), val_file)
        return (self.pack(tr) if self.cfg.packing else tr), va

    def _examples(self, records, path) -> list[dict]:
        out = []
        tpl = self.cfg.chat_template
        for n, rec in records:
            where = f"{path}: record {n}"
            messages = record_messages(rec, where)
            ids, target = encode_chat(messages, tpl, self.tokenizer)
            self.count("tokens", len(ids))
            self.count("unk_tokens", sum(1 for i in ids if i == self.tokenizer.unk_id))
            # evaluation: generate the last assistant turn from everything before it
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt, _ = encode_chat(messages[:last], tpl, self.tokenizer, add_generation_prompt=True)
            ex = self.make_example(ids, target, prompt, [messages[last]["content"]], where)
            if ex is not None:
                out.append(ex)
        return out
