"""GRPO's pieces (llmtrain/grpo.py) and the arithmetic task (llmtrain/tasks/arithmetic.py), in
process on tiny tensors and models; the CLI runs (preset end to end, kill -9 resume) are in
tests/test_rl_cli.py."""

from __future__ import annotations

import copy

import pytest
import torch

from llmtrain.config.schema import DataConfig, ModelConfig, RLConfig, TaskConfig
from llmtrain.errors import UserError
from llmtrain.grpo import GRPO, group_advantages, grpo_loss, kl_k3, token_logprobs
from llmtrain.models import build_model
from llmtrain.tasks import arithmetic as ar, build_task
from llmtrain.tokenizers.byte import ByteTokenizer


def tiny_gpt(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="gpt2", n_layer=1, n_head=2, d_model=32, vocab_size=320, max_seq_len=32))


# ----------------------------------------------------------------------------- GRPO maths
def test_advantages_are_normalised_within_each_group():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(5 * 4, generator=g)
    rewards[8:12] = 0.7  # one group where every completion scored the same
    adv = group_advantages(rewards, 4).view(5, 4)
    for i, group in enumerate(adv):
        if i == 2:
            assert torch.equal(group, torch.zeros(4))  # no signal in a group without spread
            continue
        assert group.mean().abs() < 1e-6
        assert abs(group.std().item() - 1) < 1e-3
    # each group only sees its own rewards: changing group 0 leaves the others alone
    changed = rewards.clone()
    changed[:4] += torch.tensor([5.0, -3.0, 0.0, 1.0])
    assert torch.equal(group_advantages(changed, 4).view(5, 4)[1:], adv[1:])
    # ordering within a group is kept: the best completion gets the largest advantage
    assert adv[0].argmax() == rewards[:4].argmax()


def test_kl_estimate_is_zero_when_policy_equals_reference():
    policy = tiny_gpt()
    reference = copy.deepcopy(policy)
    ids = torch.randint(7, 263, (3, 12), generator=torch.Generator().manual_seed(1))
    logp, ref = token_logprobs(policy, ids), token_logprobs(reference, ids)
    assert torch.equal(kl_k3(logp, ref), torch.zeros_like(logp))
    mask = torch.ones_like(logp)
    _, kl, _ = grpo_loss(logp, logp.detach(), ref, torch.tensor([1.0, -1.0, 0.5]), mask, 0.2, 0.1)
    assert torch.equal(kl, torch.zeros(3))
    with torch.no_grad():  # a different policy: the estimate is positive
        for p in policy.blocks.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    assert (kl_k3(token_logprobs(policy, ids), ref) >= 0).all()
    assert kl_k3(token_logprobs(policy, ids), ref).mean() > 1e-4


def test_grpo_loss_is_the_clipped_surrogate_plus_kl():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, -0.4]])  # ratios e^0.5 (clipped at 1.2), 1, e^-0.1
    ref = torch.tensor([[-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the last token is padding
    adv = torch.tensor([2.0])
    loss, kl, clipped = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.5)
    r = torch.exp(torch.tensor([0.5, 0.0]))
    surr = torch.minimum(r * 2, r.clamp(0.8, 1.2) * 2)
    d = torch.tensor([0.0, 1.0])
    k3 = torch.exp(d) - d - 1
    assert torch.allclose(loss, -(surr - 0.5 * k3).mean())
    assert torch.allclose(kl, k3.mean().view(1))
    assert clipped.item() == pytest.approx(0.5)
    loss.backward()
    assert logp.grad[0, 0] == 0  # the clipped token passes no policy gradient (its KL term is 0 here)
    assert logp.grad[0, 2] == 0  # padding passes none at all


# ----------------------------------------------------------------------------- arithmetic
def test_arithmetic_train_and_held_out_sets_are_disjoint_and_deterministic():
    train = ar.problems(2, ["+", "-"], 3, "train", 2000)
    val = ar.problems(2, ["+", "-"], 3, "val", 200)
    assert len(train) == 2000 and len(val) == 200
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert len({p for p, _ in train}) == 2000  # distinct
    assert ar.problems(2, ["+", "-"], 3, "train", 2000) == train  # same seed, same problems
    assert ar.problems(2, ["+", "-"], 4, "val", 200) != val  # another seed, other problems
    for prompt, answer in train[:50] + val[:50]:
        a, op, b = prompt.rstrip("=").replace("-", " - ").replace("+", " + ").split()
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    # a small space: every problem is either train or held out, never both
    tr, va = ar.problems(1, ["*"], 0, "train", 1000), ar.problems(1, ["*"], 0, "val", 1000)
    assert len(tr) + len(va) == 100 and not {p for p, _ in tr} & {p for p, _ in va}
    with pytest.raises(UserError, match="task.ops"):
        ar.problems(2, ["/"], 0, "train", 5)


def test_arithmetic_reward_and_preference_pairs():
    assert ar.reward(["12+30=", "9*9=", "5-7=", "3+4="], ["42\n", " 81", "-2\nand more", "8"]) == [1.0, 1.0, 1.0, 0.0]
    assert ar.reward(["not a problem"], ["1"]) == [0.0]
    pairs = ar.preference_pairs(100, digits=2, ops=["+", "*"], seed=1)
    assert len(pairs) == 100 and set(pairs[0]) == {"prompt", "chosen", "rejected"}
    for p in pairs:
        assert ar.reward([p["prompt"]], [p["chosen"]]) == [1.0]
        assert ar.reward([p["prompt"]], [p["rejected"]]) == [0.0]
        int(p["rejected"])  # a number, not noise
    held = ar.preference_pairs(50, digits=2, ops=["+", "*"], seed=1, split="val")
    assert not {p["prompt"] for p in pairs} & {p["prompt"] for p in held}
    assert ar.preference_pairs(100, digits=2, ops=["+", "*"], seed=1) == pairs


def test_arithmetic_task_examples_train_on_the_answer_only():
    tok = ByteTokenizer()
    cfg = TaskConfig(name="arithmetic", num_train=20, num_val=5)
    task = build_task(cfg, tok, ModelConfig(max_seq_len=32, vocab_size=320), DataConfig(seq_len=32, batch_size=4))
    ex = task.train_examples()[0]
    prompt = tok.decode(ex["prompt"])
    answer = [t for t in ex["labels"] if t != -100]
    assert tok.decode(answer) == ar.answer_of(prompt) and answer[-1] == tok.eos_id
    assert len(task.val_examples()) == 5


# ----------------------------------------------------------------------------- the trainee
def test_rollout_batch_holds_groups_with_masks_on_the_completions():
    tok = ByteTokenizer()
    policy = tiny_gpt()
    prompts = [(tok.encode(p), p) for p, _ in ar.problems(2, ["+"], 0, "train", 8)]
    cfg = RLConfig(group_size=4, max_new_tokens=5, kl_coef=0.1)
    trainee = GRPO(
        cfg, policy, copy.deepcopy(policy).eval(), tok, prompts, prompts[:2], ar.reward,
        batch_size=2, grad_accum=1, seed=0, device=torch.device("cpu"), stop_strings=["\n"],
    )  # fmt: skip
    source = trainee.train_source()
    batch = source.batch(0)
    assert batch["input_ids"].shape[0] == 8 and batch["mask"].shape == batch["ref_logp"].shape
    lens = batch["mask"].sum(1)
    assert torch.equal(lens, batch["response_len"]) and (lens >= 1).all() and (lens <= 5).all()
    assert trainee.tokens_done() == lens.sum().item()  # the trainer's train/tokens: tokens sampled
    assert group_advantages(batch["reward"], 4).allclose(batch["advantages"])
    out = trainee.loss(policy, batch)
    assert torch.isfinite(out.loss) and out.extras["kl"][0].abs() < 1e-5  # policy == reference
    # the generator's state is the train state: restoring it reproduces the next rollout
    state = copy.deepcopy(trainee.state_dict())
    nxt = source.batch(1)
    trainee.load_state_dict(state)
    assert trainee.tokens_done() == lens.sum().item()
    again = source.batch(1)
    assert all(torch.equal(nxt[k], again[k]) for k in nxt)
    assert trainee.tokens_done() == lens.sum().item() + again["response_len"].sum().item()


def test_bad_reward_spec_and_missing_reward_model_are_one_line_errors():
    from llmtrain.grpo import reward_function

    task = build_task(
        TaskConfig(name="arithmetic", num_train=5, num_val=2), ByteTokenizer(), ModelConfig(), DataConfig()
    )
    with pytest.raises(UserError, match="no 'nope'"):
        reward_function(RLConfig(reward="python:llmtrain.tasks.arithmetic:nope"), task, "cpu")
    with pytest.raises(UserError, match="cannot import"):
        reward_function(RLConfig(reward="python:no_such_module_xyz:f"), task, "cpu")
    assert reward_function(RLConfig(reward="python:llmtrain.tasks.arithmetic:reward"), task, "cpu") is ar.reward


def test_rl_config_checks_and_presets_fit_the_rl_verb():
    from llmtrain.config import compose, register_configs
    from llmtrain.help import experiments_for

    assert "grpo_arithmetic" in experiments_for("rl") and "grpo_arithmetic" not in experiments_for("finetune")
    assert "sft_alpaca" not in experiments_for("rl") and "arithmetic_lm" in experiments_for("pretrain")
    register_configs()
    with compose.hydra_session("rl"):
        cfg = compose.validate(compose.compose_run("rl", ["+experiment=grpo_arithmetic", "init_from=x"]))
        assert cfg.task.name == "arithmetic" and cfg.rl.reward == "arithmetic"
        for bad, needle in [
            (["rl.reward=model"], "rl.reward_model"),
            (["rl.reward=python:nofunction"], "python:module:function"),
            (["rl.reward=bleu"], "choose arithmetic, model"),
            (["rl.group_size=1"], "rl.group_size"),
            (["task.ops=[+,/]"], "task.ops"),
        ]:
            with pytest.raises(UserError, match=needle):
                compose.validate(compose.compose_run("rl", ["init_from=x", *bad]))


def test_iterations_reuse_a_rollout_with_the_sampling_policy_as_old():
    tok = ByteTokenizer()
    policy = tiny_gpt()
    prompts = [(tok.encode(p), p) for p, _ in ar.problems(2, ["+"], 0, "train", 8)]
    cfg = RLConfig(group_size=2, max_new_tokens=3, iterations=2)
    trainee = GRPO(
        cfg, policy, copy.deepcopy(policy).eval(), tok, prompts, prompts[:2], ar.reward,
        batch_size=2, grad_accum=1, seed=0, device=torch.device("cpu"),
    )  # fmt: skip
    source = trainee.train_source()
    first = source.batch(0)
    assert source.batch(1) is first and source.batch(2) is not first  # steps 0-1 share a rollout
    assert torch.allclose(first["old_logp"], token_logprobs(policy, first["input_ids"]))
    assert list(trainee.state_dict()["rollouts"]) == [1]  # only the rollout in use is kept
