"""Preference data, reward models (Bradley-Terry) and the DPO family (task=reward, task=preference)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmtrain.config.schema import DataConfig, LoraConfig, ModelConfig, TaskConfig
from llmtrain.errors import UserError
from tests.conftest import SHARED, TINY, assert_user_error, run_cli

PAIRS = [
    {"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": f"no {w[::-1]}"}
    for w in ("yes", "tea", "blue", "seven", "rain", "moon", "oak", "salt")
]


def _write(path: Path, records, jsonl=False) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


def _task(name, path, seq_len=64, arch="gpt2", **kw):
    from llmtrain.tasks import build_task
    from llmtrain.tokenizers.char import CharTokenizer

    tok = CharTokenizer("".join(chr(c) for c in range(32, 127)) + "\n")
    mc = ModelConfig(name=arch, n_layer=1, n_head=2, d_model=16, vocab_size=128, max_seq_len=128)
    cfg = TaskConfig(name=name, train_path=str(path), **kw)
    return build_task(cfg, tok, mc, DataConfig(seq_len=seq_len, batch_size=3, val_fraction=0.25)), tok, mc


def _model(mc):
    from llmtrain.models import build_model

    torch.manual_seed(0)
    return build_model(mc)


# ----------------------------------------------------------------------------- losses
def test_losses_equal_the_papers_formulas():
    from llmtrain.tasks.preference import dpo_loss, ipo_loss, simpo_loss

    pc, pr, rc, rr = (
        torch.tensor([-12.0, -3.5]),
        torch.tensor([-10.0, -9.0]),
        torch.tensor([-11.0, -4.0]),
        torch.tensor([-10.5, -8.0]),
    )
    nc, nr = torch.tensor([6.0, 2.0]), torch.tensor([4.0, 5.0])
    beta, gamma = 0.3, 0.7
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i in range(2):
        h = (pc[i] - rc[i]).item() - (pr[i] - rr[i]).item()
        assert dpo_loss(pc, pr, rc, rr, beta)[i].item() == pytest.approx(-math.log(sig(beta * h)), rel=1e-6)
        assert ipo_loss(pc, pr, rc, rr, beta)[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-6)
        s = beta * pc[i].item() / nc[i].item() - beta * pr[i].item() / nr[i].item() - gamma
        assert simpo_loss(pc, pr, nc, nr, beta, gamma)[i].item() == pytest.approx(-math.log(sig(s)), rel=1e-6)
    # at the reference DPO is log 2 and IPO (1 / 2beta)^2, whatever the log-probs
    assert torch.allclose(dpo_loss(pc, pr, pc, pr, beta), torch.full((2,), math.log(2)))
    assert torch.allclose(ipo_loss(pc, pr, pc, pr, beta), torch.full((2,), (1 / (2 * beta)) ** 2))


def test_bradley_terry_gradients_push_chosen_up_and_rejected_down():
    from llmtrain.tasks.reward import bradley_terry_loss

    chosen = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0, 2.5], requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    expect = -(torch.sigmoid(-(chosen - rejected))) / 3  # d/dr_c of -mean log sigmoid(r_c - r_r)
    assert torch.allclose(chosen.grad, expect.detach())
    assert loss.item() == pytest.approx(
        -sum(math.log(1 / (1 + math.exp(-(c - r)))) for c, r in [(0.5, 0), (-1, 1), (2, 2.5)]) / 3
    )


# ----------------------------------------------------------------------------- data
def test_three_layouts_give_the_same_tokens(tmp_path):
    flat = _write(tmp_path / "flat.json", PAIRS)
    share = _write(
        tmp_path / "share.jsonl",
        [
            {
                "conversations": [{"from": "human", "value": r["prompt"]}],
                "chosen": {"from": "gpt", "value": r["chosen"]},
                "rejected": {"from": "gpt", "value": r["rejected"]},
            }
            for r in PAIRS
        ],
        jsonl=True,
    )
    msgs = _write(
        tmp_path / "msgs.json",
        [
            {
                k: [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[k]}]
                for k in ("chosen", "rejected")
            }
            for r in PAIRS
        ],
    )
    encoded = []
    for path in (flat, share, msgs):
        task, tok, _ = _task("preference", path)
        encoded.append([(e["prompt"], e["chosen"], e["rejected"]) for e in task.train_examples() + task.val_examples()])
    assert encoded[0] == encoded[1] == encoded[2]
    # the prompt as instruction tuning renders it, the reply as it trains it (end marker, eos)
    from llmtrain.tasks.chat_template import encode_chat

    e = task.train_examples()[0]
    msgs_ = [{"role": "user", "content": _prompt_of(task, e, tok)}, {"role": "assistant", "content": "x"}]
    ids, _ = encode_chat(msgs_[:1], "default", tok, add_generation_prompt=True)
    assert e["prompt"] == ids and e["chosen"][-1] == tok.eos_id


def _prompt_of(task, e, tok):
    text = tok.decode(e["prompt"])
    return text.split("### User:\n", 1)[1].rsplit("\n\n### Assistant:\n", 1)[0]


def test_long_pairs_are_truncated_and_reported(tmp_path):
    path = _write(tmp_path / "long.json", [{"prompt": "p" * 80, "chosen": "c" * 60, "rejected": "r" * 10}] * 4)
    task, _, _ = _task("reward", path, seq_len=64)
    for e in task.train_examples():
        assert len(e["prompt"]) + len(e["chosen"]) <= 64 and len(e["prompt"]) == 32  # half the window
        assert e["prompt"][-1] == task.prompt_ids([{"role": "user", "content": "p"}])[-1]  # the header's end kept
    assert "prompt truncated 4" in task.summary() and "response truncated 4" in task.summary()


@pytest.mark.parametrize(
    "record, needles",
    [
        ({"prompt": "hi", "chosen": "a"}, ["record 2", "'rejected'"]),
        ({"prompt": "hi", "chosen": "", "rejected": "b"}, ["record 2", "'chosen'", "empty"]),
        (
            {"conversations": [{"from": "alien", "value": "x"}], "chosen": "a", "rejected": "b"},
            ["'conversations[0]'", "role"],
        ),
        (
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
            },
            ["'rejected'", "share"],
        ),
        ({"prompt": "hi", "chosen": {"from": "human", "value": "a"}, "rejected": "b"}, ["'chosen'", "assistant"]),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, record, needles):
    path = _write(tmp_path / "bad.json", [PAIRS[0], record] + PAIRS[1:])
    task, _, _ = _task("preference", path)
    with pytest.raises(UserError) as e:
        task.summary()
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value)


# ----------------------------------------------------------------------------- reference log-probs
def _frozen_logps(model, e):
    """Summed reply log-probs of one pair, row by row, unpadded: what the cache must hold."""
    out = []
    with torch.no_grad():
        for reply in (e["chosen"], e["rejected"]):
            ids = torch.tensor([e["prompt"] + reply])
            logp = torch.log_softmax(model(ids[:, :-1]).double(), -1)[0]
            out.append(sum(logp[len(e["prompt"]) - 1 + j, t].item() for j, t in enumerate(reply)))
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_cached_reference_equals_the_frozen_model(tmp_path, lora):
    from llmtrain.models.lora import LoRALinear, apply_lora
    from llmtrain.tasks.preference import REFERENCE_CACHE

    path = _write(tmp_path / "pairs.json", PAIRS)
    task, _, mc = _task("preference", path)
    model = _model(mc)
    frozen = [_frozen_logps(model, e) for e in task.train_examples() + task.val_examples()]
    if lora:  # the reference is the base with the adapters off
        apply_lora(model, LoraConfig(r=2, targets=["attn"]))
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B)
    msg = task.prepare(model, torch.device("cpu"), tmp_path, 0, 1)
    assert "computed" in msg
    got = [e["ref"] for e in task.train_examples() + task.val_examples()]
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(frozen, dtype=torch.float64), atol=1e-4)
    task.write_files(tmp_path)
    assert (tmp_path / REFERENCE_CACHE).is_file()
    # a second run reads the same numbers from the cache; other weights do not match its key
    again, _, _ = _task("preference", path)
    assert "read from" in again.prepare(model, torch.device("cpu"), tmp_path)
    assert [e["ref"] for e in again.train_examples()] == [e["ref"] for e in task.train_examples()]
    other, _, _ = _task("preference", path)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert "computed" in other.prepare(model, torch.device("cpu"), tmp_path)


def test_dpo_step_raises_the_implicit_reward_margin(tmp_path):
    path = _write(tmp_path / "pairs.json", PAIRS)
    task, _, mc = _task("preference", path, beta=0.5)
    model = _model(mc)
    task.prepare(model, torch.device("cpu"), tmp_path)
    batch = task.collate(task.train_examples())
    out = task.loss(model, batch)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert out.extras["pref_accuracy"][0].item() == 0  # no pair is ahead yet
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        task.loss(model, batch).loss.backward()
        opt.step()
    after = task.loss(model, batch)
    assert after.loss.item() < math.log(2) and after.extras["reward_margin"][0].item() > 0


# ----------------------------------------------------------------------------- reward model
@pytest.mark.parametrize(
    "arch, hf_class", [("gpt2", "GPT2ForSequenceClassification"), ("llama", "LlamaForSequenceClassification")]
)
def test_reward_scores_and_hf_export(tmp_path, arch, hf_class):
    from llmtrain.hf.export import hf_model

    path = _write(tmp_path / "pairs.json", PAIRS)
    task, tok, mc = _task("reward", path, arch=arch)
    model = task.build_model(_model(mc)).eval()
    torch.nn.init.normal_(model.head.weight)
    ex = task.train_examples()[:3]
    r = task.rewards(model, ex)
    # score() renders (prompt, response) exactly as training: the same numbers
    prompts = [_prompt_of(task, e, tok) for e in ex]
    replies = [tok.decode(e["chosen"][:-1]) for e in ex]
    assert torch.allclose(task.score(model, prompts, replies), r[:, 0], atol=1e-6)
    hf = hf_model(model, mc, tok)
    assert type(hf).__name__ == hf_class and hf.config.num_labels == 1
    batch = task.collate(ex)
    with torch.no_grad():
        theirs = hf(batch["input_ids"]).logits.squeeze(-1)  # HF pools at the last non-pad token
    assert torch.allclose(theirs, torch.cat([r[:, 0], r[:, 1]]), atol=1e-5)


def test_reward_export_refuses_an_encoder_head():
    from llmtrain.hf.export import hf_model
    from llmtrain.models import build_model
    from llmtrain.tasks.reward import RewardModel
    from llmtrain.tokenizers.char import CharTokenizer

    mc = ModelConfig(name="bert", n_layer=1, n_head=2, d_model=16, vocab_size=128, max_seq_len=32)
    with pytest.raises(UserError, match="no exact transformers"):
        hf_model(RewardModel(build_model(mc)), mc, CharTokenizer("abc"))


# ----------------------------------------------------------------------------- CLI, end to end
def test_bad_preference_file_exits_2(pretrained, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": 3, "rejected": "y"}) + "\n")
    proc = run_cli("finetune", "+experiment=dpo_demo", f"init_from={pretrained}", f"task.train_path={bad}", *TINY)
    assert_user_error(proc, str(bad), "record 2", "'chosen'")


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_reward_and_dpo_presets_end_to_end(pretrained, tmp_path):
    pairs = SHARED / "dpo_demo" / "train.json"
    small = ["task.max_examples=16", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.log_every=1"]
    runs = {}
    for preset, extra in (("reward_demo", []), ("dpo_demo", ["finetune.lora.r=4"])):  # full FT; LoRA
        run = tmp_path / preset
        proc = run_cli(
            "finetune",
            f"+experiment={preset}",
            f"init_from={pretrained}",
            f"task.train_path={pairs}",
            *TINY,
            *small,
            "data.batch_size=4",
            *extra,
            f"hydra.run.dir={run}",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = _rows(run)
        assert any("val/pref_accuracy" in r and "val/reward_margin" in r for r in rows), rows
        runs[preset] = run
    rows = _rows(runs["dpo_demo"])
    for k in ("pref_accuracy", "reward_margin", "chosen_logp", "rejected_logp"):
        assert any(f"train/{k}" in r for r in rows) and any(f"val/{k}" in r for r in rows), k
    # DDP (2 gloo ranks x 2 pairs) is the same computation: sharded reference, same losses
    ddp = tmp_path / "ddp"
    proc = run_cli(
        "finetune",
        "+experiment=dpo_demo",
        f"init_from={pretrained}",
        f"task.train_path={pairs}",
        *TINY,
        *small,
        "data.batch_size=2",
        "finetune.lora.r=4",
        "trainer.devices=2",
        "trainer.device=cpu",
        f"hydra.run.dir={ddp}",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = [load_file(r / "reference_logps.safetensors") for r in (runs["dpo_demo"], ddp)]
    assert all(torch.allclose(ref[0][k], ref[1][k], atol=1e-5) for k in ("train", "val"))
    losses = [{r["step"]: r["train/loss"] for r in _rows(d) if "train/loss" in r} for d in (runs["dpo_demo"], ddp)]
    assert losses[0].keys() == losses[1].keys() == {1, 2}
    assert all(abs(losses[0][s] - losses[1][s]) < 1e-5 for s in losses[0]), losses
    # evaluate scores a policy by its log-probs on the run's own held-out pairs
    out = tmp_path / "eval"
    proc = run_cli("evaluate", f"checkpoint={runs['dpo_demo']}", "eval.tasks=[preference]", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "eval.json").read_text())
    assert res["preference/examples"] == 16 and 0 <= res["preference/accuracy"] <= 1
    assert res["details"]["preference"]["scored_by"].startswith("policy")
    # a reward checkpoint loads through the one loader and scores text
    from llmtrain import checkpoints
    from llmtrain.tasks.reward import RewardModel, score

    loaded = checkpoints.load(runs["reward_demo"])
    assert isinstance(loaded.model, RewardModel)
    r = score(loaded, ["Hi there", "Tell me a story"], ["Hello!", "Once upon a time"])
    assert r.dtype == torch.float32 and r.shape == (2,) and torch.isfinite(r).all()
    with pytest.raises(UserError, match="not a reward model"):
        score(checkpoints.load(runs["dpo_demo"]), ["a"], ["b"])


@pytest.mark.parametrize("normalize", [False, True])
def test_eval_scores_a_policy_by_its_log_probs(tmp_path, normalize):
    from llmtrain.checkpoints import Loaded
    from llmtrain.config.schema import EvalConfig, RunConfig
    from llmtrain.eval.suite import EvalContext, preference_task

    path = _write(tmp_path / "pairs.json", PAIRS * 2)
    task, tok, mc = _task("preference", path)
    model = _model(mc).eval()
    cfg = RunConfig(
        task=TaskConfig(train_path=str(path)),
        data=DataConfig(seq_len=64, val_fraction=0.25),
        eval=EvalConfig(batch_size=3, length_normalize=normalize),
    )
    loaded = Loaded(path=tmp_path, meta={}, model_cfg=mc, tokenizer=tok, model=model, task=None)
    res = preference_task(EvalContext(cfg, torch.device("cpu"), "fp32", tmp_path, lambda: loaded))
    right = []
    for e in task.val_examples():  # the same held-out 25%, scored pair by pair
        c, r = _frozen_logps(model, e)
        if normalize:
            c, r = c / len(e["chosen"]), r / len(e["rejected"])
        right.append(c > r)
    assert res.metrics["preference/examples"] == len(right) == 4
    assert res.metrics["preference/accuracy"] == pytest.approx(sum(right) / len(right))


def test_ipo_and_simpo_tasks(tmp_path):
    from llmtrain.tasks.preference import simpo_loss

    path = _write(tmp_path / "pairs.json", PAIRS)
    ipo, _, mc = _task("preference", path, loss="ipo", beta=0.25)
    model = _model(mc)
    ipo.prepare(model, torch.device("cpu"), tmp_path)
    assert ipo.loss(model, ipo.collate(ipo.train_examples())).loss.item() == pytest.approx(4.0, abs=1e-4)  # (1/2b)^2
    simpo, _, _ = _task("preference", path, loss="simpo", beta=2.0, gamma=0.5)
    assert "no reference" in simpo.prepare(model, torch.device("cpu"), tmp_path)
    batch = simpo.collate(simpo.train_examples())
    assert "ref" not in batch
    lp, n = [], []
    for e in simpo.train_examples():
        c, r = _frozen_logps(model, e)
        lp.append((c, r))
        n.append((len(e["chosen"]), len(e["rejected"])))
    lp, n = torch.tensor(lp), torch.tensor(n, dtype=torch.float64)
    expect = simpo_loss(lp[:, 0], lp[:, 1], n[:, 0], n[:, 1], 2.0, 0.5).mean()
    assert simpo.loss(model, batch).loss.item() == pytest.approx(expect.item(), abs=1e-4)
    with pytest.raises(UserError, match="task.loss"):
        _task("preference", path, loss="kto")


# ----------------------------------------------------------------------------- arithmetic pairs, FSDP
def _byte_lm(tmp_path: Path) -> Path:
    """A tiny byte-level GPT (random weights) saved as a pretrain checkpoint: enough for the plumbing."""
    from llmtrain.checkpoints import checkpoint_meta
    from llmtrain.config.schema import RunConfig
    from llmtrain.models import build_model, resolve_model_config
    from llmtrain.tokenizers.byte import ByteTokenizer
    from llmtrain.train.checkpoint import save_checkpoint

    tok = ByteTokenizer()
    mc = resolve_model_config(ModelConfig(name="gpt2", n_layer=2, n_head=2, d_model=16, max_seq_len=32), tok)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "lm" / "checkpoints", 1, build_model(mc), checkpoint_meta(RunConfig(model=mc), mc, tok))
    return tmp_path / "lm"


def test_dpo_arithmetic_preset_single_and_fsdp_agree(tmp_path):
    from llmtrain import checkpoints
    from llmtrain.config.schema import RunConfig
    from llmtrain.eval.suite import EvalContext, arithmetic_task

    lm = _byte_lm(tmp_path)
    args = [
        "finetune", "+experiment=dpo_arithmetic", f"init_from={lm}", "task.num_train=8", "task.num_val=4",
        "data.seq_len=32", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.log_every=1",
        "trainer.progress=false", "model.dropout=0.0", "trainer.device=cpu", "eval.max_examples=4", "optim.lr=1e-2",
    ]  # fmt: skip
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    proc = run_cli(*args, "data.batch_size=4", f"hydra.run.dir={single}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(single)
    for k in ("pref_accuracy", "reward_margin", "chosen_logp", "rejected_logp"):
        assert any(f"train/{k}" in r for r in rows) and any(f"val/{k}" in r for r in rows), k
    assert any(r.get("val/examples") == 4 for r in rows)  # the generated held-out pairs
    # FSDP, 2 gloo ranks x 2 pairs: the same reference log-probs (sharded, gathered), losses and weights
    proc = run_cli(
        *args, "data.batch_size=2", "trainer.devices=2", "trainer.strategy=fsdp", f"hydra.run.dir={fsdp}",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = [load_file(r / "reference_logps.safetensors") for r in (single, fsdp)]
    assert ref[0]["train"].shape == (8, 2) and ref[0]["val"].shape == (4, 2)
    assert all(torch.allclose(ref[0][k], ref[1][k], atol=1e-5) for k in ("train", "val"))
    losses = [{r["step"]: r["train/loss"] for r in _rows(d) if "train/loss" in r} for d in (single, fsdp)]
    assert losses[0].keys() == losses[1].keys() == {1, 2}
    assert all(abs(losses[0][s] - losses[1][s]) < 1e-5 for s in losses[0]), losses
    assert losses[0][2] < losses[0][1]  # it trained
    w = [load_file(d / "checkpoints" / "step_0000002" / "model.safetensors") for d in (single, fsdp)]
    assert w[0].keys() == w[1].keys() and all(torch.allclose(w[0][k], w[1][k], atol=1e-5) for k in w[0])
    # evaluate's arithmetic task reads the DPO run's own problems (4 held out), greedy answers
    ctx = EvalContext(RunConfig(), torch.device("cpu"), "fp32", tmp_path, lambda: checkpoints.load(fsdp))
    res = arithmetic_task(ctx).metrics
    assert res["arithmetic/examples"] == 4 and 0 <= res["arithmetic/exact_match"] <= 1


def test_generated_pairs_need_no_file_and_a_bad_source_is_refused():
    from llmtrain.config import compose, register_configs

    register_configs()
    with compose.hydra_session("finetune"):
        cfg = compose.validate(compose.compose_run("finetune", ["+experiment=dpo_arithmetic", "init_from=RUN"]))
        assert cfg.task.pairs == "arithmetic" and cfg.task.train_path is None
        with pytest.raises(UserError, match="task.pairs must be one of file, arithmetic"):
            compose.validate(compose.compose_run("finetune", ["+experiment=dpo_arithmetic", "task.pairs=csv"]))
        with pytest.raises(UserError, match="task.train_path is required"):
            compose.validate(compose.compose_run("finetune", ["+experiment=dpo_arithmetic", "task.pairs=file"]))
    # the pairs are the arithmetic task's problems (train and held out disjoint), as its SFT saw them
    from llmtrain.tasks import build_task
    from llmtrain.tokenizers.byte import ByteTokenizer

    tok = ByteTokenizer()
    mc = ModelConfig(name="gpt2", n_layer=1, n_head=2, d_model=16, vocab_size=tok.vocab_size, max_seq_len=32)
    task = build_task(
        TaskConfig(name="preference", pairs="arithmetic", num_train=20, num_val=5), tok, mc, DataConfig(seq_len=32)
    )
    train, val = task.train_examples(), task.val_examples()
    assert len(train) == 20 and len(val) == 5
    assert not {tuple(e["prompt"]) for e in train} & {tuple(e["prompt"]) for e in val}
    from llmtrain.tasks.arithmetic import answer_of

    for e in train + val:
        prompt = tok.decode(e["prompt"])
        assert prompt.endswith("=") and e["chosen"][-1] == e["rejected"][-1] == tok.eos_id
        assert tok.decode(e["chosen"][:-1]) == answer_of(prompt) != tok.decode(e["rejected"][:-1])


def test_rpo_alpha_adds_the_chosen_replies_per_token_nll(tmp_path):
    path = _write(tmp_path / "pairs.json", PAIRS)
    plain, _, mc = _task("preference", path, beta=0.5)
    rpo, _, _ = _task("preference", path, beta=0.5, rpo_alpha=0.7)
    model = _model(mc)
    for t in (plain, rpo):
        t.prepare(model, torch.device("cpu"), tmp_path)
    batch = rpo.collate(rpo.train_examples())
    nll = [-_frozen_logps(model, e)[0] / len(e["chosen"]) for e in rpo.train_examples()]
    expect = plain.loss(model, batch).loss.item() + 0.7 * sum(nll) / len(nll)
    assert rpo.loss(model, batch).loss.item() == pytest.approx(expect, abs=1e-4)
