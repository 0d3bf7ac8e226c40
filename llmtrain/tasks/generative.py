"""Shared by the generative tasks (instruction tuning, summarization, seq2seq): prompt -> response
examples for decoders, loss only on response tokens, optional packing, and evaluation by
generating responses (llmtrain/generation.py, greedy/sampled or task.num_beams) scored with
ROUGE/BLEU. Tasks with supports_encoder_decoder also train a t5: the source is the encoder
input, the target what the decoder predicts."""

from __future__ import annotations

import torch

from llmtrain.data.documents import document_kwargs
from llmtrain.errors import UserError
from llmtrain.eval.metrics import bleu, rouge
from llmtrain.generation import generate
from llmtrain.objectives.base import LossOutput, encoder_decoder_loss, seq2seq_batch
from llmtrain.objectives.chunked_ce import lm_loss
from llmtrain.tasks.base import Task, model_device, pad_rows


class GenerativeTask(Task):
    needs_decoder = True
    token_loss = True  # response tokens only

    def make_example(
        self, ids: list[int], target: list[bool], prompt: list[int], refs: list[str], where: str
    ) -> dict | None:
        """Shifted (input, label) pair with labels only on target tokens. An over-long example
        (counted as truncated) first loses the start of its prompt, down to half the window, so
        the prompt's end (the assistant header) and the response start stay; then the end of the
        response. One left with no target token is dropped (counted; all dropped is an error)."""
        budget = self.seq_len + 1
        if len(ids) > budget:
            self.count("truncated")
            first = target.index(True) if True in target else len(ids)
            drop = max(0, min(first - budget // 2, len(ids) - budget))
            ids, target = ids[drop:][:budget], target[drop:][:budget]
        labels = [t if m else -100 for t, m in zip(ids[1:], target[1:])]
        if all(x == -100 for x in labels):
            self.count("dropped_no_response_left")
            return None
        return {"ids": ids[:-1], "labels": labels, "prompt": prompt, "refs": refs, "where": where}

    def encoder_decoder_example(self, source: list[int], target: list[int], refs: list[str], where: str) -> dict:
        """The source (cut to data.seq_len with its </s>) for the encoder, the target + </s> (cut
        to data.seq_len) for the decoder; the prompt that evaluation generates from is the source."""
        eos = self.tokenizer.eos_id
        src, tgt = source[: self.seq_len - 1] + [eos], (target + [eos])[: self.seq_len]
        if len(source) > self.seq_len - 1 or len(target) >= self.seq_len:
            self.count("truncated")
        return {"src": src, "tgt": tgt, "prompt": src, "refs": refs, "where": where}

    def check_kept(self, examples: list, n_records: int, path: str) -> list:
        if n_records and not examples:
            raise UserError(
                f"{path}: every example was truncated to nothing at data.seq_len={self.seq_len} "
                "(the response starts after the context); raise data.seq_len"
            )
        return examples

    def pack(self, examples: list[dict]) -> list[dict]:
        """Concatenate consecutive short examples into rows of at most seq_len tokens; labels
        stay on each example's response only. Packed examples attend to earlier ones in the row,
        as in most SFT recipes, unless data.document_mask=true: then each row carries its
        examples' document ids ("docs"), and attention and positions stay inside each example."""
        rows: list[dict] = []
        cur: dict | None = None
        docs = self.data_cfg.document_mask
        for e in examples:
            if cur is not None and len(cur["ids"]) + len(e["ids"]) <= self.seq_len:
                cur["ids"] = cur["ids"] + e["ids"]
                cur["labels"] = cur["labels"] + e["labels"]
                if docs:
                    cur["docs"] = cur["docs"] + [cur["docs"][-1] + 1] * len(e["ids"])
            else:
                cur = {"ids": list(e["ids"]), "labels": list(e["labels"])}
                if docs:
                    cur["docs"] = [0] * len(e["ids"])
                rows.append(cur)
        self.report["packed_rows"] = len(rows)
        return rows

    def collate(self, examples):
        if self.is_encoder_decoder:
            pairs = [(torch.tensor(e["src"]), torch.tensor(e["tgt"])) for e in examples]
            return seq2seq_batch(pairs, self.tokenizer.pad_id)
        ids = pad_rows([e["ids"] for e in examples], self.tokenizer.pad_id)
        batch = {"input_ids": ids, "labels": pad_rows([e["labels"] for e in examples], -100, ids.shape[1])}
        if "docs" in examples[0]:  # packed rows under data.document_mask; the padding is a document of its own
            batch["document_ids"] = pad_rows([e["docs"] for e in examples], -1, ids.shape[1])
        return batch

    def loss(self, model, batch):
        if "decoder_input_ids" in batch:
            return encoder_decoder_loss(model, batch)
        # right padding under causal attention: real tokens never see the pads, no mask needed
        hidden = model.encode(batch["input_ids"], **document_kwargs(batch))
        loss, n = lm_loss(model, hidden, batch["labels"], self.chunked_loss)
        return LossOutput(loss=loss, n_targets=n)

    # ------------------------------------------------------------------ evaluation
    def stop_strings(self) -> list[str]:
        return []

    def generate_responses(self, model, examples: list[dict], device=None) -> list[str]:
        max_new = self.cfg.max_new_tokens
        stops = self.stop_strings()
        tok = self.tokenizer
        model = model.to(device) if device is not None else model
        outs: list[str] = []
        bs = max(1, self.data_cfg.batch_size)
        for i in range(0, len(examples), bs):
            chunk = examples[i : i + bs]

            def stop_fn(_row: int, new: list[int]) -> bool:
                text = tok.decode(new)
                return any(s in text for s in stops)

            res = generate(
                model,
                [e["prompt"] for e in chunk],
                max_new_tokens=max_new,
                temperature=self.cfg.temperature,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                stop_fn=stop_fn if stops else None,
                num_beams=self.cfg.num_beams,
                length_penalty=self.cfg.length_penalty,
            )
            for new in res.tokens:
                text = tok.decode(new)
                for s in stops:
                    text = text.split(s)[0]
                outs.append(text.strip())
        return outs

    def evaluate(self, model, device=None, max_examples=0):
        examples = [e for e in self.val_examples() if e.get("prompt")]
        n = max_examples if max_examples > 0 else len(examples)
        examples = examples[:n]
        device = device or model_device(model)
        hyps = self.generate_responses(model, examples, device)
        refs = [e["refs"] for e in examples]
        self.samples = list(zip([e["where"] for e in examples], hyps, refs))
        out = {f"{k}": v for k, v in rouge(hyps, refs).items()}
        out["bleu"] = bleu(hyps, refs)
        out["examples"] = len(hyps)
        return out
