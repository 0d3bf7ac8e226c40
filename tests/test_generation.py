"""Tests for llmtrain.generation: KV cache vs full recompute, left padding, sampling filters,
stopping and the context limit, on tiny randomly initialised decoders."""

from __future__ import annotations

import pytest
import torch

from llmtrain.config.schema import ModelConfig
from llmtrain.generation import (
    GenerationResult,
    generate,
    sample_next,
    sample_text,
    top_k_filter,
    top_p_filter,
)

VOCAB = 64

# Prompts of different lengths, so the batch is left padded.
PROMPTS = [[5, 9, 3], [1, 2, 3, 4, 5, 6, 7], [42], [7, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


def _registered(name: str) -> bool:
    import llmtrain.models  # noqa: F401  (registers the architectures)
    from llmtrain import registry

    try:
        return name in registry.names("model")
    except Exception:  # noqa: BLE001 - a registry failure means "not registered" here
        return False


def tiny_model(name: str = "gpt2", max_seq_len: int = 64, **kw):
    if not _registered(name):
        pytest.skip(f"model {name!r} is not registered")
    from llmtrain.models import build_model

    torch.manual_seed(0)
    # a large init_std gives peaked, well separated logits, so greedy argmax is not decided by
    # float noise between the cached and the recomputed path
    cfg = dict(name=name, n_layer=2, n_head=2, d_model=32, vocab_size=VOCAB, max_seq_len=max_seq_len, init_std=0.5)
    if name == "llama":
        cfg.update(n_head=4, n_kv_heads=2)  # exercise grouped-query attention too
    cfg.update(kw)
    return build_model(ModelConfig(**cfg))


DECODERS = ["gpt2", "llama"]


# ----------------------------------------------------------------------------- cache / padding


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_with_cache_equals_without_cache(name):
    model = tiny_model(name)
    a = generate(model, PROMPTS, max_new_tokens=20, temperature=0.0, use_cache=True)
    b = generate(model, PROMPTS, max_new_tokens=20, temperature=0.0, use_cache=False)
    assert isinstance(a, GenerationResult)
    assert a.tokens == b.tokens
    assert [len(t) for t in a.tokens] == [20] * len(PROMPTS)
    assert a.num_generated == 20 * len(PROMPTS)
    assert a.seconds > 0 and a.tokens_per_second > 0


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padding_does_not_change_output(name, use_cache):
    model = tiny_model(name)
    batch = generate(model, PROMPTS, max_new_tokens=15, temperature=0.0, use_cache=use_cache, pad_id=3)
    for prompt, out in zip(PROMPTS, batch.tokens):
        alone = generate(model, [prompt], max_new_tokens=15, temperature=0.0, use_cache=use_cache)
        assert out == alone.tokens[0]


@pytest.mark.parametrize("name", DECODERS)
def test_cached_greedy_matches_manual_full_forward(name):
    """Reference: argmax of a plain full forward pass, one token at a time, no mask at all."""
    model = tiny_model(name).eval()
    prompt = PROMPTS[1]
    out = generate(model, [prompt], max_new_tokens=10, temperature=0.0).tokens[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt) :]


def test_top_k_1_equals_greedy():
    model = tiny_model()
    greedy = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0)
    g = torch.Generator().manual_seed(123)
    topk1 = generate(model, PROMPTS, max_new_tokens=12, temperature=0.9, top_k=1, generator=g)
    assert topk1.tokens == greedy.tokens


def test_tiny_top_p_equals_greedy():
    model = tiny_model()
    greedy = generate(model, PROMPTS, max_new_tokens=12, temperature=0.0)
    nucleus = generate(
        model, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(5)
    )
    assert nucleus.tokens == greedy.tokens


# ----------------------------------------------------------------------------- stopping


def test_eos_stops_and_is_excluded():
    model = tiny_model()
    prompt = PROMPTS[2]
    full = generate(model, [prompt], max_new_tokens=20, temperature=0.0).tokens[0]
    # a token whose first occurrence is a few steps in, so some tokens come before eos
    i = next(i for i in range(2, len(full)) if full[i] not in full[:i])
    eos = full[i]
    expected = full[:i]
    out = generate(model, [prompt], max_new_tokens=20, temperature=0.0, eos_id=eos)
    assert out.tokens[0] == expected
    assert out.num_generated == len(expected)


def test_eos_is_per_sequence_in_a_batch():
    model = tiny_model()
    full = generate(model, PROMPTS, max_new_tokens=20, temperature=0.0).tokens
    eos = full[2][2]
    out = generate(model, PROMPTS, max_new_tokens=20, temperature=0.0, eos_id=eos).tokens
    for f, o in zip(full, out):
        assert o == (f[: f.index(eos)] if eos in f else f)


def test_stop_sequence_truncates_and_is_excluded():
    model = tiny_model()
    prompt = PROMPTS[2]
    full = generate(model, [prompt], max_new_tokens=20, temperature=0.0).tokens[0]
    stop = full[5:7]
    # first place where the stop sequence ends
    end = next(i + 2 for i in range(len(full) - 1) if full[i : i + 2] == stop)
    out = generate(model, [prompt], max_new_tokens=20, temperature=0.0, stop_sequences=[[VOCAB + 5, VOCAB + 6], stop])
    assert out.tokens[0] == full[: end - 2]


def test_all_done_stops_early_and_zero_new_tokens():
    model = tiny_model()
    out = generate(model, [[1, 2]], max_new_tokens=0)
    assert out.tokens == [[]] and out.num_generated == 0
    assert generate(model, []).tokens == []
    with pytest.raises(ValueError):
        generate(model, [[]])


# ----------------------------------------------------------------------------- sampling


def test_seeded_generator_is_reproducible():
    model = tiny_model()
    kw = dict(max_new_tokens=25, temperature=1.0, top_k=20, top_p=0.95)
    a = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(model, PROMPTS, generator=torch.Generator().manual_seed(8), **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    # the cache does not change the sampled tokens either (same logits, same random draws)
    d = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert d.tokens == a.tokens


def _kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_p_filter_keeps_smallest_set_reaching_p():
    # probabilities by token id, deliberately not sorted: 0.15, 0.5, 0.05, 0.3
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()
    assert _kept(top_p_filter(logits, 0.4)) == {1}  # 0.5 >= 0.4
    assert _kept(top_p_filter(logits, 0.7)) == {1, 3}  # 0.5 < 0.7 <= 0.8
    assert _kept(top_p_filter(logits, 0.85)) == {1, 3, 0}  # 0.8 < 0.85 <= 0.95
    assert _kept(top_p_filter(logits, 0.97)) == {0, 1, 2, 3}
    assert _kept(top_p_filter(logits, 1.0)) == {0, 1, 2, 3}
    assert _kept(top_p_filter(logits, 1e-9)) == {1}  # never empty
    # batched rows are filtered independently; kept logits are unchanged
    batch = torch.stack([logits, logits.flip(0)])
    out = top_p_filter(batch, 0.7)
    assert _kept(out[0]) == {1, 3} and _kept(out[1]) == {2, 0}
    assert torch.equal(out[0][[1, 3]], logits[[1, 3]])


def test_top_k_filter_and_sample_next():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    assert _kept(top_k_filter(logits, 2)[0]) == {1, 2}
    assert torch.equal(top_k_filter(logits, None), logits)
    assert torch.equal(top_k_filter(logits, 10), logits)
    assert sample_next(logits, temperature=0.0).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {1, 2}


# ----------------------------------------------------------------------------- context limit


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_past_the_context_limit(use_cache):
    model = tiny_model(max_seq_len=16)
    long_prompt = list(range(1, 30))  # longer than the context by itself
    out = generate(model, [long_prompt, [3, 4]], max_new_tokens=40, temperature=0.0, use_cache=use_cache)
    assert [len(t) for t in out.tokens] == [40, 40]
    assert all(0 <= t < VOCAB for row in out.tokens for t in row)


def test_context_limit_without_cache_slides_window():
    """Once the window is full, the next token only depends on the last max_seq_len tokens."""
    model = tiny_model(max_seq_len=8)
    prompt = list(range(1, 20))
    out = generate(model, [prompt], max_new_tokens=3, temperature=0.0, use_cache=False).tokens[0]
    cropped = generate(model, [prompt[-8:]], max_new_tokens=3, temperature=0.0, use_cache=False).tokens[0]
    assert out == cropped


def test_cache_crops_prompt_from_the_left_to_leave_room():
    model = tiny_model(max_seq_len=16)
    prompt = list(range(1, 15))  # 14 tokens + 6 new > 16: keep the last 10
    out = generate(model, [prompt], max_new_tokens=6, temperature=0.0, use_cache=True).tokens[0]
    ref = generate(model, [prompt[-10:]], max_new_tokens=6, temperature=0.0, use_cache=False).tokens[0]
    assert out == ref


# ----------------------------------------------------------------------------- model state / text


def test_eval_mode_during_generation_and_train_mode_restored():
    model = tiny_model(dropout=0.5)
    model.train()
    a = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    assert model.training
    b = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    assert a.tokens == b.tokens  # dropout was off
    model.eval()
    generate(model, PROMPTS, max_new_tokens=2, temperature=0.0)
    assert not model.training


def test_encoder_model_is_rejected():
    from llmtrain.errors import UserError

    model = tiny_model()
    model.is_decoder = False
    with pytest.raises(UserError):
        generate(model, PROMPTS, max_new_tokens=2)


def _char_tokenizer():
    from llmtrain.tokenizers.char import CharTokenizer

    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
    assert tok.vocab_size <= VOCAB
    return tok


def test_sample_text_and_stop_strings():
    model = tiny_model()
    tok = _char_tokenizer()
    text = sample_text(model, tok, "hello", max_new_tokens=30, temperature=0.0, stop_at_eos=False)
    assert isinstance(text, str)
    assert text == tok.decode(generate(model, [tok.encode("hello")], max_new_tokens=30, temperature=0.0).tokens[0])
    visible = [c for c in text if c]
    assert len(visible) >= 3, text
    stop = text[2:4] if len(text) >= 4 else text[2]
    trimmed = sample_text(
        model, tok, "hello", max_new_tokens=30, temperature=0.0, stop_at_eos=False, stop_strings=["\u2603", stop]
    )
    assert trimmed == text[: text.find(stop)]
    assert stop not in trimmed
    assert (
        sample_text(model, tok, "hello", max_new_tokens=30, temperature=0.0, stop_at_eos=False, include_prompt=True)
        == "hello" + text
    )
    # empty prompt starts from bos; a seeded sample is reproducible
    s1, s2 = (
        sample_text(model, tok, "", max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(1))
        for _ in range(2)
    )
    assert s1 == s2


# ----------------------------------------------------------------------------- against transformers


class _Ids:
    """The special ids hf_model copies into the HF config: no eos, pad 0."""

    pad_id, bos_id, eos_id = 0, None, None


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("prompts", [PROMPTS[1:2], PROMPTS], ids=["batch1", "batch4_left_padded"])
def test_greedy_tokens_match_transformers_generate(name, prompts):
    """The exported model (what `llmtrain export` writes) decodes the same greedy tokens with
    transformers' generate, alone and in a left-padded batch."""
    pytest.importorskip("transformers")
    from llmtrain.hf.export import hf_model

    model = tiny_model(name).eval()
    hf = hf_model(model, model.config, _Ids())
    ours = generate(model, prompts, max_new_tokens=24, temperature=0.0, pad_id=0).tokens
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0
        )
    assert ours == out[:, L:].tolist()


@pytest.mark.parametrize("name", DECODERS)
def test_sampling_is_seeded_and_the_same_with_or_without_a_stop_check(name):
    """A seeded batch samples the same tokens twice, and the same whether or not a stopping
    rule makes the loop read each step's tokens on the host."""
    model = tiny_model(name)

    def run(**kw):
        g = torch.Generator().manual_seed(7)
        return generate(model, PROMPTS, max_new_tokens=16, temperature=1.0, top_k=20, generator=g, **kw).tokens

    a = run()
    assert a == run()
    assert a == run(stop_fn=lambda _row, _new: False)
    other = generate(
        model, PROMPTS, max_new_tokens=16, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(8)
    ).tokens
    assert other != a  # the seed matters


def test_bench_generate_smoke_writes_identical_rows(tmp_path):
    """scripts/bench_generate.py (called by scripts/gpu_check.sh) in-process at --smoke size."""
    pytest.importorskip("transformers")
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gen.json"
    argv = ["--smoke", "--models", "gpt_small,llama_124m", "--batch", "1,2", "--repeats", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [
        ("gpt_small", 1),
        ("gpt_small", 2),
        ("llama_124m", 1),
        ("llama_124m", 2),
    ]
    assert all(r["identical"] and r["llmtrain_tok_s"] > 0 and r["transformers_tok_s"] > 0 for r in rows)
    assert bench.main(["--smoke", "--models", "nope"]) == 2


@pytest.mark.parametrize("name", DECODERS)
def test_busy_cores_decode_with_fewer_threads_and_the_same_tokens(name, monkeypatch):
    """While other processes keep the cores busy, the one-token steps run on fewer threads (the
    prompt's step and the caller's count are untouched), and the tokens, greedy and sampled, are
    those of an idle machine."""
    from llmtrain import threads

    if threads.usable_cores() < 2:
        pytest.skip("needs 2 usable cores")
    model = tiny_model(name, d_model=64, n_layer=2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []

    def run(**kw):
        return generate(
            model, PROMPTS, max_new_tokens=12, stop_fn=lambda _r, _n: seen.append(torch.get_num_threads()), **kw
        ).tokens

    try:
        monkeypatch.setattr(threads, "other_runnable", lambda: 0)  # an idle machine, whatever runs beside the test
        idle_greedy = run(temperature=0.0)
        idle_sampled = run(temperature=1.0, generator=torch.Generator().manual_seed(3))
        assert set(seen) == {2}
        seen.clear()
        monkeypatch.setattr(threads, "other_runnable", lambda: threads.usable_cores() - 1)  # all cores but one busy
        assert threads.decoding_threads(2) == 1
        assert run(temperature=0.0) == idle_greedy
        rows = len(PROMPTS)  # stop_fn runs once per row and step
        assert set(seen[:rows]) == {2} and set(seen[rows:]) == {1}  # the prompt's step on 2, the rest on 1
        assert run(temperature=1.0, generator=torch.Generator().manual_seed(3)) == idle_sampled
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)


def test_other_runnable_reads_the_run_queue():
    from llmtrain import threads

    n = threads.other_runnable()
    if n is None:
        pytest.skip("no /proc here")
    assert 0 <= n < 10_000
    assert threads.decoding_threads(1) == 1  # one thread is never fewer
