"""A verifiable task that needs no files: problems such as "37+58=" generated from a seed.

    task=arithmetic task.digits=2 task.ops=[+,-] task.problem_seed=0

Operands are drawn uniformly from [0, 10**digits). Whether a problem is held out is a hash of
its text and the seed (1 in 10), so the training and held-out sets are disjoint by construction,
whatever num_train / num_val ask for, and the same on every machine.

The same problems serve every stage:
- finetune (SFT): prompt "37+58=", response "95" then eos; loss on the response only;
- pretrain (`corpus_texts`): lines "37+58=95";
- rl: the prompts, with `reward` (1 for the right answer, else 0) as the verifiable reward;
- evaluate (eval.tasks=[arithmetic]) and validation: `exact_match` of batched greedy answers;
- preference tuning: `preference_pairs` (chosen = the right answer, rejected = a wrong one).
"""

from __future__ import annotations

import re
import zlib

import numpy as np

from llmtrain.errors import UserError
from llmtrain.registry import register
from llmtrain.tasks.generative import GenerativeTask

OPS = ("+", "-", "*")
HELD_OUT_ONE_IN = 10
# the problem part of a prompt (anything before it, e.g. a chat template, is ignored)
_PROBLEM = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*$")


def check_ops(ops: list[str]) -> None:
    bad = [o for o in ops if o not in OPS]
    if not ops or bad:
        raise UserError(f"task.ops: {bad[0] if bad else 'nothing'!r} is not an operator (choose from {' '.join(OPS)})")


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def held_out(problem: str, seed: int) -> bool:
    return zlib.crc32(f"{seed}:{problem}".encode()) % HELD_OUT_ONE_IN == 0


def problems(digits: int, ops: list[str], seed: int, split: str, n: int) -> list[tuple[str, str]]:
    """n distinct (prompt, answer) pairs of `split` ("train" or "val"), e.g. ("37+58=", "95");
    fewer when the problem space holds fewer. Deterministic in (digits, ops, seed, split)."""
    check_ops(ops)
    want_val = split == "val"
    space = (10**digits) ** 2 * len(ops)
    rng = np.random.default_rng([seed, digits, int(want_val)])
    out: dict[str, str] = {}
    tries = 0
    while len(out) < n and tries < 50 * n + 1000 and tries < 20 * space:
        a, b = (int(x) for x in rng.integers(0, 10**digits, size=2))
        op = ops[int(rng.integers(len(ops)))]
        tries += 1
        prompt = f"{a}{op}{b}="
        if prompt not in out and held_out(prompt, seed) == want_val:
            out[prompt] = str(solve(a, op, b))
    return list(out.items())


def answer_of(prompt: str) -> str | None:
    """The right answer to the problem a prompt ends with, or None if it ends with none."""
    m = _PROBLEM.search(prompt)
    return str(solve(int(m.group(1)), m.group(2), int(m.group(3)))) if m else None


def parse_answer(response: str) -> str:
    """What a response answers: its first line, stripped."""
    return response.split("\n", 1)[0].strip()


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 where the response's answer is right, else 0.0 (the `rl.reward=arithmetic` reward)."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        right = answer_of(p)
        out.append(float(right is not None and parse_answer(r) == right))
    return out


def wrong_answer(right: str, rng: np.random.Generator) -> str:
    """A plausible wrong answer: off by a small amount, or one digit changed."""
    value = int(right)
    if rng.random() < 0.5 or len(right.lstrip("-")) < 2:
        delta = int(rng.integers(1, 10)) * (1 if rng.random() < 0.5 else -1)
        return str(value + delta)
    digits = list(right)
    pos = [i for i, c in enumerate(digits) if c.isdigit()]
    i = pos[int(rng.integers(len(pos)))]
    digits[i] = str((int(digits[i]) + int(rng.integers(1, 10))) % 10)
    wrong = "".join(digits)
    return wrong if int(wrong) != value and not (len(wrong) > 1 and wrong.lstrip("-")[0] == "0") else str(value + 1)


def preference_pairs(
    n: int, *, digits: int = 2, ops: list[str] | None = None, seed: int = 0, split: str = "train"
) -> list[dict[str, str]]:
    """n preference pairs in the flat layout {prompt, chosen, rejected}: chosen is the right
    answer, rejected a wrong one. The prompts are the task's `split` problems (train and val
    pairs never share a problem)."""
    ops = list(ops or ["+"])
    rng = np.random.default_rng([seed, digits, 7])
    return [
        {"prompt": p, "chosen": a, "rejected": wrong_answer(a, rng)} for p, a in problems(digits, ops, seed, split, n)
    ]


def corpus_texts(digits: int, ops: list[str], seed: int, n_train: int, n_val: int) -> tuple[list[str], list[str]]:
    """Training and held-out problems as text lines "37+58=95", for causal-LM pretraining."""
    train = [p + a for p, a in problems(digits, ops, seed, "train", n_train)]
    val = [p + a for p, a in problems(digits, ops, seed, "val", n_val)]
    return train, val


@register("task", "arithmetic")
class Arithmetic(GenerativeTask):
    name = "arithmetic"

    def __init__(self, cfg, tokenizer, model_cfg, data_cfg, state=None, seed=0):
        super().__init__(cfg, tokenizer, model_cfg, data_cfg, state, seed)
        check_ops(list(cfg.ops))

    def stop_strings(self) -> list[str]:
        return ["\n"]  # a model pretrained on lines ends its answer with a newline, an SFT'd one with eos

    def load(self):
        c = self.cfg
        return (
            self._examples(problems(c.digits, list(c.ops), c.problem_seed, "train", c.num_train), "train"),
            self._examples(problems(c.digits, list(c.ops), c.problem_seed, "val", c.num_val), "val"),
        )

    def _examples(self, pairs, split) -> list[dict]:
        out = []
        for n, (prompt, answer) in enumerate(pairs, 1):
            p, a = self.encode(prompt), self.encode(answer) + [self.tokenizer.eos_id]
            ex = self.make_example(p + a, [False] * len(p) + [True] * len(a), p, [answer], f"{split} problem {n}")
            if ex is not None:
                out.append(ex)
        return self.check_kept(out, len(pairs), f"task arithmetic ({split})")

    def reward(self, prompts: list[str], responses: list[str]) -> list[float]:
        return reward(prompts, responses)

    def evaluate(self, model, device=None, max_examples=0):
        examples = self.val_examples()[: max_examples or None]
        hyps = self.generate_responses(model, examples, device)
        right = [parse_answer(h) == e["refs"][0] for h, e in zip(hyps, examples)]
        self.samples = [(e["where"], h, e["refs"]) for e, h in zip(examples, hyps)]
        return {"exact_match": sum(right) / max(len(right), 1), "n": float(len(right))}
