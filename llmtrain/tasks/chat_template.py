"""Chat templates: messages -> text, shared by instruction tuning (training) and `llmtrain chat`.

Templates are plain text (no special-token strings), so they work with every tokenizer,
including the character tokenizer. The end of each assistant turn is the tokenizer's eos
token, appended as an id by encode_chat (format_chat marks the assistant segments) and used
by generation as the stop signal.

    segments = format_chat(messages, "default")   # [(text, is_assistant_turn), ...]
    ids, is_target = encode_chat(messages, "default", tokenizer)   # eos id after assistant turns
    prompt = render_prompt(messages, "default")   # text ending with the assistant header

default:
    ### System:\\n{system}\\n\\n### User:\\n{user}\\n\\n### Assistant:\\n{assistant}</s>\\n\\n
chatml:
    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n{assistant}<|im_end|></s>\\n
"""

from __future__ import annotations

from dataclasses import dataclass

from llmtrain.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    headers: dict[str, str]  # role -> text before the content
    end: str  # text after each message (for assistant turns: before the eos token)
    stop: tuple[str, ...]  # strings that mean "the assistant turn is over" when generating


TEMPLATES: dict[str, ChatTemplate] = {
    "default": ChatTemplate(
        headers={"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"},
        end="\n\n",
        stop=("\n### User:", "\n### System:", "\n### Assistant:"),
    ),
    "chatml": ChatTemplate(
        headers={r: f"<|im_start|>{r}\n" for r in ROLES},
        end="<|im_end|>\n",
        stop=("<|im_end|>", "<|im_start|>"),
    ),
}


def get_template(name: str, key: str = "task.chat_template") -> ChatTemplate:
    """The template called `name`; an unknown one is a UserError naming the config `key` that chose it."""
    if name not in TEMPLATES:
        raise UserError(f"unknown {key} {name!r}; available: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def check_messages(messages: object, where: str = "messages") -> list[dict]:
    """Validate a list of {"role", "content"} dicts; errors name `where` (file and record)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has unknown role {m['role']!r} (expected {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message {i} content is not a string")
    return messages


def format_chat(messages: list[dict], template: str = "default") -> list[tuple[str, bool]]:
    """Text segments (text, is_assistant_turn). An assistant turn is its content plus the
    template's end marker (chatml's "<|im_end|>"; none for default); encode_chat puts the
    eos token right after it, and training computes the loss on exactly those tokens."""
    t = get_template(template)
    marker = t.end.rstrip("\n")  # the learned part of the end text
    tail = t.end[len(marker) :]
    out: list[tuple[str, bool]] = []
    for m in messages:
        out.append((t.headers[m["role"]], False))
        if m["role"] == "assistant":
            out += [(m["content"] + marker, True), (tail, False)]
        else:
            out.append((m["content"] + t.end, False))
    return [(text, target) for text, target in out if text]


def encode_chat(
    messages: list[dict], template: str, tokenizer, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and which of them are assistant targets (content, end
    marker and the eos id after each assistant turn). With add_generation_prompt the ids end
    with the assistant header: feed them to generation and stop at eos."""
    ids: list[int] = []
    target: list[bool] = []
    for text, is_target in format_chat(messages, template):
        piece = tokenizer.encode(text)
        ids += piece
        target += [is_target] * len(piece)
        if is_target:
            ids.append(tokenizer.eos_id)
            target.append(True)
    if add_generation_prompt:
        piece = tokenizer.encode(get_template(template).headers["assistant"])
        ids += piece
        target += [False] * len(piece)
    return ids, target


def encode_response(content: str, template: str, tokenizer) -> list[int]:
    """The ids of one assistant reply as encode_chat trains on them: content, the template's end
    marker and eos (the header is the prompt's, from add_generation_prompt)."""
    marker = get_template(template).end.rstrip("\n")
    return tokenizer.encode(content + marker) + [tokenizer.eos_id]


def render_prompt(messages: list[dict], template: str = "default", add_generation_prompt: bool = True) -> str:
    """The conversation as text, ending with the assistant header so a model continues with the
    assistant's reply (generate until eos or one of stop_strings(template))."""
    t = get_template(template)
    text = "".join(t.headers[m["role"]] + m["content"] + t.end for m in messages)
    return text + (t.headers["assistant"] if add_generation_prompt else "")


def stop_strings(template: str = "default") -> list[str]:
    return list(get_template(template).stop)
