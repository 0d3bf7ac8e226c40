"""`llmtrain chat` (stdin turns -> replies) and `llmtrain generate` (samples, top_p, tokens/s),
each compared with the same decoding done directly through llmtrain.generation."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from conftest import ROOT, assert_user_error, run_cli
from llmtrain.checkpoints import load as load_checkpoint
from llmtrain.generation import generate, sample_text
from llmtrain.tasks.chat_template import render_prompt, stop_strings


def chat_cli(*args: str, input: str) -> subprocess.CompletedProcess:
    """run_cli with text on stdin."""
    return subprocess.run(
        [sys.executable, "-m", "llmtrain", "chat", *args],
        cwd=ROOT,
        input=input,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"},
    )


def test_chat_session_with_reset_and_exit(pretrained, tmp_path):
    turns = ["Good morrow, cousin.", "What news?", "/reset", "Good morrow, cousin.", "/exit", "never answered"]
    proc = chat_cli(
        f"checkpoint={pretrained}",
        "chat.max_new_tokens=12",
        "chat.temperature=1.0",
        "chat.top_k=null",
        f"hydra.run.dir={tmp_path}",
        input="\n".join(turns) + "\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert "/reset" in proc.stderr and "(conversation cleared)" in proc.stderr

    # Reference: the conversation rendered with the default template, sampled with one seeded
    # generator across turns, replies cut at the template's next-turn markers.
    loaded = load_checkpoint(str(pretrained))
    gen = torch.Generator().manual_seed(1337)
    history, replies = [], []
    for turn in turns[: turns.index("/exit")]:
        if turn == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": turn})
        reply = sample_text(
            loaded.model,
            loaded.tokenizer,
            render_prompt(history, "default"),
            max_new_tokens=12,
            temperature=1.0,
            top_k=None,
            stop_strings=stop_strings("default"),
            generator=gen,
        ).strip()
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
    assert proc.stdout == "".join(r + "\n" for r in replies)


def test_chat_ends_at_end_of_input_and_rejects_bad_template(pretrained, tmp_path):
    proc = chat_cli(f"checkpoint={pretrained}", "chat.max_new_tokens=3", f"hydra.run.dir={tmp_path}", input="hello\n")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip("\n").split("\n")) <= 3  # one short reply, then EOF ends the loop
    assert_user_error(
        chat_cli(f"checkpoint={pretrained}", "chat.template=nope", f"hydra.run.dir={tmp_path / 'b'}", input="hi\n"),
        "nope",
    )


def test_generate_samples_with_top_p_and_reports_speed(pretrained, tmp_path):
    proc = run_cli(
        "generate",
        f"checkpoint={pretrained}",
        "generate.prompt=ROMEO:",
        "generate.max_new_tokens=15",
        "generate.num_samples=3",
        "generate.temperature=0.9",
        "generate.top_k=null",
        "generate.top_p=0.8",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"generate: (\d+) tokens in [\d.]+s \(([\d.]+) tokens/s", proc.stderr)
    assert m and int(m.group(1)) > 0 and float(m.group(2)) > 0, proc.stderr
    # Reference: the three samples are one batch from a generator seeded with trainer.seed.
    loaded = load_checkpoint(str(pretrained))
    tok = loaded.tokenizer
    res = generate(
        loaded.model,
        [tok.encode("ROMEO:")] * 3,
        max_new_tokens=15,
        temperature=0.9,
        top_p=0.8,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        generator=torch.Generator().manual_seed(1337),
    )
    want = "".join(f"--- sample {i + 1} ---\nROMEO:{tok.decode(t)}\n" for i, t in enumerate(res.tokens))
    assert proc.stdout == want
    assert int(m.group(1)) == res.num_generated
    assert_user_error(
        run_cli("generate", f"checkpoint={pretrained}", "generate.top_p=1.5", f"hydra.run.dir={tmp_path / 'b'}"),
        "top_p",
    )
