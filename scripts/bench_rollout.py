#!/usr/bin/env python
"""Rollout speed: sampled tokens/s of GRPO's rollout (llmtrain/grpo.py, the KV-cache engine of
llmtrain/generation.py) against transformers' `generate` on the exported policy, with the same
batch, prompt lengths, new tokens and sampling, in the same process, taking turns.

    .venv/bin/python scripts/bench_rollout.py runs/arith_rl --batch 128 --new 6 --new 64

Both sample at temperature 1 with no early stop, so every row yields exactly --new tokens.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from llmtrain import checkpoints
from llmtrain.config.schema import RLConfig
from llmtrain.grpo import GRPO
from llmtrain.hf.export import export_hf
from llmtrain.tasks import arithmetic as ar


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--batch", type=int, default=128, help="rows (prompts x group_size)")
    ap.add_argument("--new", type=int, action="append", help="new tokens per row (repeatable)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = checkpoints.load(args.checkpoint)
    tok, policy = loaded.tokenizer, loaded.backbone
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        export_hf(loaded, d)
        hf = AutoModelForCausalLM.from_pretrained(d).eval()
    problems = ar.problems(2, ["+"], 0, "train", args.batch)
    prompts = [tok.encode(p) for p, _ in problems]
    print("| batch | prompt len | new tokens | llmtrain rollout tok/s | transformers generate tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for new in args.new or [6, 64]:
        cfg = RLConfig(max_new_tokens=new, temperature=1.0)
        grpo = GRPO(cfg, policy, copy.deepcopy(policy), tok, [(p, "") for p in prompts], [(prompts[0], "")],
                    ar.reward, batch_size=1, grad_accum=1, seed=0, device=torch.device("cpu"))  # fmt: skip
        grpo.tok = _NoStop(tok)  # every row runs the full length, as HF's min_new_tokens does
        L = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_id] * (L - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
        ours, theirs = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            out = grpo.sample(prompts, 1.0, torch.Generator().manual_seed(0))
            ours.append(sum(map(len, out)) / (time.perf_counter() - t))
            t = time.perf_counter()
            with torch.no_grad():
                res = hf.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                    max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_id,
                )  # fmt: skip
            theirs.append((res.shape[1] - L) * len(prompts) / (time.perf_counter() - t))
        a, b = max(ours), max(theirs)
        print(f"| {len(prompts)} | {L} | {new} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |")


class _NoStop:
    """The tokenizer with an eos no sampled token can equal: rollouts never stop early."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_id = -1

    def __getattr__(self, name):
        return getattr(self._tok, name)


if __name__ == "__main__":
    main()
