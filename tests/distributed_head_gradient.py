"""Run by tests/test_chunked_loss.py under torchrun (2 gloo ranks, CPU): the head-weight gradient
that chunked_ce.defer_head_gradient forms at the end of the backward reaches DDP's all-reduce and
FSDP's reduce-scatter like any other gradient: every parameter's synchronised gradient is the same,
bit for bit, with and without the deferral. Prints one line per case."""

from __future__ import annotations

import numpy as np
import torch

from llmtrain.config.schema import DataConfig, ModelConfig, ObjectiveConfig, TrainerConfig
from llmtrain.data.corpus import TokenSplits
from llmtrain.distributed.setup import init_distributed
from llmtrain.distributed.wrap import wrap_model
from llmtrain.models import build_model
from llmtrain.objectives import build_objective, chunked_ce
from llmtrain.tokenizers.char import CharTokenizer
from llmtrain.train.trainer import LossModule

chunked_ce.CHUNK_ELEMENTS = 2000  # several chunks, and a head larger than one: the deferral applies
TOK = CharTokenizer("".join(chr(0x4E00 + i) for i in range(300)))


def synced_grads(strategy: str, arch: str, defer: bool, dist) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        name=arch, n_layer=2, n_head=2, d_model=32, max_seq_len=32, vocab_size=320, tie_embeddings=arch == "gpt2"
    )
    model = build_model(cfg)
    assert chunked_ce.defer_head_gradient(model) if defer else True
    ids = np.random.default_rng(0).integers(max(TOK.special_ids) + 1, TOK.vocab_size, 4000).astype(np.uint16)
    splits = TokenSplits(train=ids, val=ids, n_docs=0, val_bytes=1)
    trainee = build_objective(ObjectiveConfig(name="clm"), TOK, splits, DataConfig(seq_len=32, batch_size=2), 0)
    trainee.chunked_loss = True
    module = wrap_model(LossModule(model, trainee), TrainerConfig(strategy=strategy), torch.device("cpu"), "fp32", dist)
    loss, _, _ = module(trainee.train_source(dist.rank, dist.world_size).batch(0))  # each rank its own batch
    loss.backward()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
    return out


def main() -> None:
    dist = init_distributed("cpu")
    for strategy, arch in [("ddp", "gpt2"), ("ddp", "llama"), ("fsdp", "gpt2"), ("fsdp", "llama")]:
        early, deferred = (synced_grads(strategy, arch, d, dist) for d in (False, True))
        assert early.keys() == deferred.keys() and len(early) > 5
        differ = [k for k in early if not torch.equal(early[k], deferred[k])]
        assert not differ, (strategy, arch, differ)
        if dist.rank == 0:
            print(f"{strategy} {arch}: {len(early)} gradients equal", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
