"""chat: talk to an instruction-tuned checkpoint. Each stdin line is a user turn; the reply is
generated from the whole conversation rendered with the chat template used in fine-tuning, and
stops at eos or where the template would start the next turn. An encoder-decoder (a t5
seq2seq or summarization checkpoint) has no chat template: each line is its own encoder input
(cut to the model's max_seq_len, with </s>), and there is no history to carry.

    /reset   forget the conversation        /exit (or end of input)   quit
"""

from __future__ import annotations

import sys

import torch

from llmtrain import checkpoints
from llmtrain.config.schema import RunConfig
from llmtrain.errors import UserError
from llmtrain.eval.suite import generate_texts
from llmtrain.runtime import setup_runtime


def template_of(meta: dict, override: str | None) -> str:
    """chat.template from the command line, else the checkpoint's own, else "default"."""
    if override is not None:
        return override
    task = meta.get("task") if isinstance(meta.get("task"), dict) else {}
    task_cfg = task.get("config") if isinstance(task.get("config"), dict) else task
    return task_cfg.get("chat_template") or "default"


def run(cfg: RunConfig) -> None:
    if not cfg.checkpoint:
        raise UserError("chat needs checkpoint=PATH (an instruction-tuned checkpoint or run directory)")
    from llmtrain.tasks.chat_template import encode_chat, get_template, stop_strings

    rt = setup_runtime(cfg)
    loaded = checkpoints.load(cfg.checkpoint, rt.device)
    model, tok, meta = loaded.model, loaded.tokenizer, loaded.meta
    enc_dec = bool(getattr(model, "is_encoder_decoder", False))
    if not getattr(model, "is_decoder", True) and not enc_dec:
        raise UserError(f"checkpoint {cfg.checkpoint} is an encoder; chat needs a decoder or an encoder-decoder")
    if enc_dec:
        stops, mode = [], "encoder-decoder: each line is the encoder input"
    else:
        template = template_of(meta, cfg.chat.template)
        get_template(template, "chat.template")  # unknown name -> UserError before reading input
        stops, mode = stop_strings(template), f"template {template}"
    gen = torch.Generator(device=rt.device).manual_seed(cfg.trainer.seed)
    interactive = sys.stdin.isatty()
    print(
        f"chat: {cfg.checkpoint} ({mode}); /reset clears the conversation, /exit quits",
        file=sys.stderr,
        flush=True,
    )
    history: list[dict] = []
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        if not command:
            continue
        if enc_dec:  # one turn: the message alone, as a seq2seq source
            ids = tok.encode(text)[: model.config.max_seq_len - 1] + [tok.eos_id]
        else:
            history.append({"role": "user", "content": text})
            ids = encode_chat(history, template, tok, add_generation_prompt=True)[0]
        c = cfg.chat
        texts, _ = generate_texts(
            model,
            tok,
            [ids],
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            stop_strings=stops,
            generator=gen,
        )
        reply = texts[0].strip()
        if not enc_dec:
            history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
