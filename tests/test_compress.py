"""Quantization, pruning and QAT (llmtrain/compress/): error bounds, logits, masks through
optimizer steps and save/load, structured pruning against the masked original, and the
quantize / prune / recovery-finetune stages through the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from conftest import TINY, run_cli
from llmtrain import checkpoints
from llmtrain.compress import prune, qat, quant
from llmtrain.compress.layout import compressed_meta
from llmtrain.config.schema import ExportConfig, ModelConfig, RunConfig, TokenizerConfig
from llmtrain.errors import UserError
from llmtrain.generation import generate
from llmtrain.models import build_model
from llmtrain.tokenizers import build_tokenizer
from llmtrain.train import checkpoint as ckpt


def tiny(name: str = "gpt2", **kw) -> ModelConfig:
    base = dict(name=name, n_layer=2, n_head=4, d_model=64, vocab_size=64, max_seq_len=32)
    if name == "llama":
        base.update(bias=False, n_kv_heads=2)
    return ModelConfig(**{**base, **kw})


def make(name: str = "gpt2", **kw):
    torch.manual_seed(0)
    return build_model(tiny(name, **kw)).eval()


BATCH = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))


def save_and_load(model, model_cfg, tmp_path, **record):
    tok = build_tokenizer(TokenizerConfig(name="byte"), lambda: [])
    source_meta = {"model": dataclasses.asdict(model_cfg), "tokenizer": tok.state(), "objective": "clm"}
    meta = compressed_meta(source_meta, tmp_path / "src", model_cfg, "test", **record)
    path = ckpt.save_checkpoint(tmp_path / "checkpoints", 1, model, meta)
    return checkpoints.load(path)


# ----------------------------------------------------------------------------- quantization


def test_int8_error_is_bounded_per_channel():
    w = torch.randn(48, 96) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different ranges
    q, scale = quant.quantize_int8(w)
    err = (w - quant.dequantize_int8(q, scale)).abs()
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    lin = torch.nn.Linear(96, 48)
    lin.weight.data.copy_(w)
    for backend in ("reference", quant.backend_for("int8")):  # torchao's quantizer keeps the same bound
        ql = quant.QuantLinear.from_linear(lin, "int8", 32, backend)
        assert ((w - ql.dequantized()).abs() <= ql.scale[:, None] * (0.5 + 1e-5)).all(), backend


def test_int4_error_is_bounded_per_group():
    w = torch.randn(16, 128)
    w[:, 5] *= 20  # an outlier column only widens its own groups
    packed, scale, zero = quant.quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 64) and scale.shape == (16, 4)
    q = quant.unpack_int4(packed)
    assert q.max() <= 15 and torch.equal(quant.unpack_int4(q[:, 0::2] | (q[:, 1::2] << 4)), q)
    err = (w - quant.dequantize_int4(packed, scale, zero)).abs().reshape(16, 4, 32)
    bound = scale.float() / 2 + 2e-3 * w.abs().reshape(16, 4, 32).amax(-1)  # + fp16 rounding of scale, zero
    assert (err <= bound[..., None]).all()
    assert err[:, 1:].max() < err[:, 0].max()  # the outlier's group has the coarsest grid


@pytest.mark.parametrize("method", ["int8", "int8_dynamic", "int4"])
def test_quantized_logits_are_close_to_fp32(method, tmp_path):
    model = make()
    ref = model(BATCH)
    q = copy.deepcopy(model)
    record = quant.quantize_model(q, method, group_size=32)
    assert "lm_head" not in record["layers"]  # tied to the embedding
    out = q(BATCH)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < {"int8": 0.01, "int8_dynamic": 0.02, "int4": 0.1}[method], rel
    assert quant.linear_bytes(q) * {"int8": 3.5, "int8_dynamic": 3.5, "int4": 6}[method] <= quant.linear_bytes(model)
    loaded = save_and_load(q, model.config, tmp_path, quant=record)  # through the one loader
    assert isinstance(loaded.model.blocks[0].attn.qkv, quant.QuantLinear)
    assert torch.allclose(loaded.model(BATCH), out, atol=1e-5)
    # generate / chat sample from the loaded model as from any other (KV cache included)
    res = generate(loaded.model, [[1, 2, 3]], max_new_tokens=6, temperature=0.0)
    nocache = generate(loaded.model, [[1, 2, 3]], max_new_tokens=6, temperature=0.0, use_cache=False)
    assert len(res.tokens[0]) == 6 and res.tokens == nocache.tokens


def test_int4_calibration_clip_search_does_not_hurt_outputs():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(256, 64)
    plain = quant.QuantLinear.from_linear(lin, "int4", 32, "reference")
    searched = quant.QuantLinear.from_linear(lin, "int4", 32, "reference", inputs=x)
    ref = lin(x)
    assert (searched(x) - ref).pow(2).sum() <= (plain(x) - ref).pow(2).sum() + 1e-6


def test_qat_fake_quant_matches_conversion_and_passes_gradients():
    model = make()
    names = qat.prepare_qat(model, "int4", 32)
    assert names and all(isinstance(model.get_submodule(n), qat.FakeQuantLinear) for n in names)
    assert set(model.state_dict()) == set(make().state_dict())  # checkpoints stay ordinary
    w = model.blocks[0].mlp.fc.weight
    model(BATCH).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0  # straight-through
    with torch.no_grad():
        fake = model(BATCH)
        qat.convert_qat(model, "int4", 32)
        assert isinstance(model.blocks[0].mlp.fc, quant.QuantLinear)
        assert torch.allclose(model(BATCH), fake, atol=1e-4)


# ----------------------------------------------------------------------------- pruning


def test_masks_hold_through_optimizer_steps_and_save_load(tmp_path):
    model = make().train()
    masks = prune.magnitude_masks(model, 0.5, "global")
    prune.attach(model, masks)
    assert abs(prune.sparsity_of(model) - 0.5) < 0.01
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with prune.enforce(model):
        for _ in range(3):
            model(BATCH).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert (w[~mask] == 0).all() and (w[mask] != 0).any(), name
    loaded = save_and_load(model.eval(), model.config, tmp_path, prune={"method": "magnitude"})
    assert set(prune.masks_of(loaded.model)) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(loaded.model.get_submodule(name).weight_mask, mask)
        assert (loaded.model.get_submodule(name).weight[~mask] == 0).all()
    model(BATCH).pow(2).mean().backward()
    opt.step()  # outside enforce the hook is gone: AdamW's momentum moves pruned weights again
    assert (model.blocks[0].attn.qkv.weight[~masks["blocks.0.attn.qkv"]] != 0).any()


def test_layer_scope_and_2_4_patterns():
    model = make()
    for name, mask in prune.magnitude_masks(model, 0.25, "layer").items():
        assert abs((~mask).float().mean().item() - 0.25) < 0.01, name
    for name, mask in prune.semi_structured_masks(model).items():
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), name


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_structured_pruning_equals_the_masked_original(arch):
    model = make(arch)
    energy = prune.input_energy(model, lambda: model(BATCH))
    plan = prune.structured_plan(model, energy, 0.5)
    masked = copy.deepcopy(model)
    prune.mask_like_plan(masked, plan)
    d_ff = model.blocks[0].mlp.proj.in_features
    smaller_cfg = prune.apply_structured(model, plan, model.config)
    assert smaller_cfg.n_head == 2 and smaller_cfg.d_ff == d_ff // 2
    rebuilt = build_model(smaller_cfg).eval()  # the smaller config builds the same shapes
    rebuilt.load_state_dict(model.state_dict())
    assert sum(p.numel() for p in rebuilt.parameters()) < sum(p.numel() for p in masked.parameters())
    assert torch.allclose(rebuilt(BATCH), masked(BATCH), atol=1e-5)


def test_structured_llama_exports_to_transformers(tmp_path):
    pytest.importorskip("transformers")
    from llmtrain.hf.export import hf_model

    model = make("llama")
    plan = prune.structured_plan(model, prune.input_energy(model, lambda: model(BATCH)), 0.5)
    cfg = prune.apply_structured(model, plan, model.config)
    rebuilt = build_model(cfg).eval()
    rebuilt.load_state_dict(model.state_dict())
    tok = build_tokenizer(TokenizerConfig(name="byte"), lambda: [])
    hf = hf_model(rebuilt, cfg, tok)
    assert torch.allclose(hf(BATCH).logits, rebuilt(BATCH), atol=1e-5)


# ----------------------------------------------------------------------------- the stages (CLI)


def test_quantize_then_evaluate_and_export_refuses(pretrained, tmp_path):
    out = tmp_path / "int4"
    proc = run_cli(
        "quantize",
        f"checkpoint={pretrained}",
        "quant.method=int4",
        "quant.calibration=1",
        "trainer.eval_batches=2",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "compression.json").read_text())
    assert report["compression"]["quant"]["backend"] == "reference"
    assert report["ratios"]["linear_bytes"] >= 6
    assert report["compressed"]["val/ppl"] < 1.05 * report["source"]["val/ppl"]
    assert "| val/ppl |" in (out / "compression.md").read_text() and "| val/ppl |" in proc.stdout
    ev = run_cli("evaluate", f"checkpoint={out}", "trainer.eval_batches=2", f"hydra.run.dir={tmp_path / 'ev'}")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "compression.json").read_text())["compressed"]["val/ppl"] == pytest.approx(
        report["compressed"]["val/ppl"]
    )
    from llmtrain.stages import export

    with pytest.raises(UserError, match="is quantized .int4.: transformers has no loader"):
        export.run(RunConfig(checkpoint=str(out), export=ExportConfig(out=str(tmp_path / "x"))))
    assert not (tmp_path / "x").exists()


def test_prune_then_recovery_finetune_under_fsdp_keeps_zeros(pretrained, tmp_path):
    pruned, rec = tmp_path / "pruned", tmp_path / "rec"
    proc = run_cli(
        "prune", f"checkpoint={pretrained}", "prune.sparsity=0.5", "trainer.eval_batches=2", f"hydra.run.dir={pruned}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(
        "finetune",
        f"init_from={pruned}",
        *TINY,
        "trainer.max_steps=4",
        "trainer.eval_batches=2",
        "trainer.eval_every=4",
        # under FSDP (2 gloo ranks): each rank masks its shard of the weights (the single-process
        # path is test_masks_hold_through_optimizer_steps_and_save_load)
        "trainer.devices=2",
        "trainer.strategy=fsdp",
        "trainer.device=cpu",
        f"hydra.run.dir={rec}",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pruning masks on" in proc.stdout
    src, after = checkpoints.load(pretrained), checkpoints.load(rec)
    assert abs(prune.sparsity_of(after.model) - 0.5) < 0.01
    for name, mask in prune.masks_of(after.model).items():
        w, w0 = after.model.get_submodule(name).weight, src.model.get_submodule(name).weight
        assert (w[~mask] == 0).all() and not torch.equal(w[mask], w0[mask]), name  # trained, zeros kept
    assert after.meta["compression"]["prune"]["method"] == "magnitude"


def test_qat_finetune_ends_with_a_quantized_checkpoint(pretrained, tmp_path):
    proc = run_cli(
        "finetune",
        f"init_from={pretrained}",
        *TINY,
        "finetune.qat=int8",
        "trainer.max_steps=2",
        "trainer.eval_batches=2",
        "trainer.eval_every=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "QAT int8 on" in proc.stdout
    loaded = checkpoints.load(tmp_path)
    assert loaded.meta["compression"]["quant"]["method"] == "int8" and loaded.meta["step"] == 2
    assert isinstance(loaded.model.blocks[0].mlp.fc, quant.QuantLinear)


def test_bad_methods_are_one_line_errors():
    from llmtrain.config.schema import PruneConfig, QuantConfig
    from llmtrain.stages import prune as prune_stage, quantize as quantize_stage

    with pytest.raises(UserError, match="quant.method='int3' is not one of int8, int4, int8_dynamic"):
        quantize_stage.run(RunConfig(checkpoint="x", quant=QuantConfig(method="int3")))
    with pytest.raises(UserError, match="quant.group_size=33 must be even"):
        quantize_stage.run(RunConfig(checkpoint="x", quant=QuantConfig(method="int4", group_size=33)))
    with pytest.raises(UserError, match="prune.method='1:4' is not one of magnitude, 2:4, structured"):
        prune_stage.run(RunConfig(checkpoint="x", prune=PruneConfig(method="1:4")))
    with pytest.raises(UserError, match="prune needs checkpoint=PATH"):
        prune_stage.run(RunConfig())


@pytest.mark.parametrize("arch, hf_name", [("gpt2", "GPT2Config"), ("bert", "BertConfig")])
def test_heads_removed_refuse_hf_configs_without_head_dim(arch, hf_name):
    """After structured pruning of heads, attention is narrower than d_model: GPT-2's and BERT's HF
    configs cannot say so, and the export refuses in one line; full-width attention still exports."""
    import importlib

    hf_config = importlib.import_module(f"llmtrain.models.{arch}").hf_config
    base = dict(name=arch, vocab_size=64, n_layer=1, d_model=32, max_seq_len=16)
    with pytest.raises(UserError, match=f"{hf_name} has no head_dim.*prune.heads=false"):
        hf_config(ModelConfig(**base, n_head=2, head_dim=8))
    assert hf_config(ModelConfig(**base, n_head=2, head_dim=16)).hidden_size == 32
