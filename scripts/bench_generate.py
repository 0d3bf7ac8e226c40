#!/usr/bin/env python
"""Generation speed: llmtrain's `generate` (llmtrain/generation.py) against transformers'
`generate` on the same weights (our model exported in-process with llmtrain.hf.export.hf_model,
what `llmtrain export` writes), greedy, in the same process, taking turns.

    .venv/bin/python scripts/bench_generate.py                       # the issue's table, CPU
    .venv/bin/python scripts/bench_generate.py --busy                # with one other busy process
    .venv/bin/python scripts/bench_generate.py --device cuda --dtype bf16 --json gen.json
    .venv/bin/python scripts/bench_generate.py --smoke               # tiny sizes, seconds
    .venv/bin/python scripts/bench_generate.py --threads 1 --clock cpu --new-tokens 32   # a busy machine

Models are randomly initialised (seed 0): gpt_small (model/gpt_small.yaml, a 128-token
vocabulary), gpt2_124m (model/gpt2_124m.yaml) and llama_124m (GPT-2 small's shape as a Llama:
12 layers, 768 wide, 4 KV heads, 32k vocabulary, ~124M parameters). Every row runs
exactly --new-tokens tokens (no eos), so tokens/s = batch * new tokens / seconds. In fp32 the
two libraries' greedy tokens must be identical (the script exits 1 otherwise); in bf16 the
kernels differ, so the share of identical tokens is reported instead. At batch 1 on the CPU it
also prints the memory floor of a decoding step, measured in the same process: the time to read
every weight matrix once (a plain sum) and to multiply one row by all of them (by F.linear, and
split over the threads as llmtrain's decoding does).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time

import torch

from llmtrain.config.schema import ModelConfig
from llmtrain.generation import generate
from llmtrain.hf.export import hf_model
from llmtrain.models import build_model

MODELS = {
    "gpt_small": dict(name="gpt2", n_layer=4, n_head=4, d_model=128, max_seq_len=512, vocab_size=128),
    "gpt2_124m": dict(name="gpt2", n_layer=12, n_head=12, d_model=768, max_seq_len=1024, vocab_size=50304),
    "llama_124m": dict(
        name="llama", n_layer=12, n_head=12, n_kv_heads=4, d_model=768, max_seq_len=1024, vocab_size=32000
    ),
}
SMOKE = dict(n_layer=2, n_head=2, n_kv_heads=None, d_model=32, max_seq_len=64)


class _Ids:
    """The special ids hf_model copies into the HF config: none, so no row stops early."""

    pad_id, bos_id, eos_id = 0, None, None


def _spin() -> None:  # the "one other busy process"
    while True:
        pass


def _model(name: str, smoke: bool, device, dtype):
    kw = dict(MODELS[name], **(SMOKE if smoke else {}))
    if kw["name"] == "gpt2":
        kw.pop("n_kv_heads", None)
    cfg = ModelConfig(**kw)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    theirs = hf_model(ours, cfg, _Ids())  # the same export `llmtrain export` does, in process
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    return ours.to(device, dtype), theirs.to(device, dtype), cfg


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU seconds


def _timed(fn, device, clock=time.perf_counter) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = clock()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t, out


def weight_floor(model, clock=time.perf_counter, passes: int = 3) -> tuple[float, float, float, int]:
    """(seconds to read every weight matrix once with a plain sum, seconds of one-row products
    with all of them by F.linear (transformers' kernel), the same products split over the threads
    (llmtrain's, prepack.split_rows_linear), bytes): the memory floor of a batch-1 decoding step,
    measured in process. A step of either library cannot beat the first."""
    from llmtrain.models.prepack import split_rows_linear

    mats = list({id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}.values())
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in mats]
    parts = torch.get_num_threads()
    split = [split_rows_linear(w, None, parts) if parts > 1 else None for w in mats]
    best_sum = best_mv = best_split = float("inf")
    with torch.inference_mode():
        for _ in range(passes):
            t = clock()
            for w in mats:
                w.sum()
            best_sum = min(best_sum, clock() - t)
            t = clock()
            for x, w in zip(xs, mats):
                torch.nn.functional.linear(x, w)
            best_mv = min(best_mv, clock() - t)
            t = clock()
            for x, w, f in zip(xs, mats, split):
                f(x) if f is not None else torch.nn.functional.linear(x, w)
            best_split = min(best_split, clock() - t)
    return best_sum, best_mv, best_split, sum(w.numel() * w.element_size() for w in mats)


def bench(name, batch, prompt_len, new_tokens, device, dtype, repeats, smoke, clock=time.perf_counter) -> dict:
    ours, theirs, cfg = _model(name, smoke, device, dtype)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, cfg.vocab_size, (batch, prompt_len), generator=g)
    plist = prompts.tolist()
    ids = prompts.to(device)
    mask = torch.ones_like(ids)

    def run_ours(n=new_tokens):
        return generate(ours, plist, max_new_tokens=n, temperature=0.0, pad_id=0).tokens

    @torch.no_grad()
    def run_theirs(n=new_tokens):
        out = theirs.generate(
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
        return out[:, prompt_len:].tolist()

    run_ours(4), run_theirs(4)  # warm-up: first-call allocations
    t_ours, t_theirs = [], []
    for _ in range(repeats):  # alternate, so a change in machine load hits both
        s, a = _timed(run_ours, device, clock)
        t_ours.append(s)
        s, b = _timed(run_theirs, device, clock)
        t_theirs.append(s)
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / max(1, batch * new_tokens)
    n = batch * new_tokens
    ours_tps, theirs_tps = n / min(t_ours), n / min(t_theirs)
    floor = {}
    if batch == 1 and device.type == "cpu" and not smoke:
        read_s, mv_s, split_s, nbytes = weight_floor(ours, clock)
        floor = dict(
            weight_bytes=nbytes,
            read_weights_ms=read_s * 1e3,
            one_row_matmuls_ms=mv_s * 1e3,
            split_one_row_matmuls_ms=split_s * 1e3,
        )
    return dict(
        model=name,
        params=sum(p.numel() for p in ours.parameters()),
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        llmtrain_tok_s=ours_tps,
        transformers_tok_s=theirs_tps,
        ratio=ours_tps / theirs_tps,
        same_tokens=same,
        identical=a == b,
        llmtrain_step_ms=min(t_ours) / new_tokens * 1e3,
        transformers_step_ms=min(t_theirs) / new_tokens * 1e3,
        **floor,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt_small,gpt2_124m,llama_124m", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=0, help="timed runs per row (0: 3 for gpt_small, 1 for 124M)")
    ap.add_argument("--busy", action="store_true", help="run one other busy process (a spinning core) meanwhile")
    ap.add_argument("--smoke", action="store_true", help="tiny models, prompt 8, 8 new tokens: seconds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both libraries (0: torch's default)")
    ap.add_argument(
        "--clock", default="wall", choices=list(CLOCKS), help="cpu: process CPU seconds (a busy machine; use 1 thread)"
    )
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        print(f"error: unknown model {unknown[0]!r} (choose from {', '.join(MODELS)})", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batch.split(",") if b]
    prompt_len, new_tokens = (8, 8) if args.smoke else (args.prompt_len, args.new_tokens)
    busy = mp.get_context("spawn").Process(target=_spin, daemon=True) if args.busy else None
    if busy is not None:
        busy.start()
    rows, floor = [], []
    try:
        neighbour = ", one busy neighbour process" if busy else ""
        cpu = platform.processor() or platform.machine()
        threads = torch.get_num_threads()
        setting = f"{threads} threads, {args.device} {args.dtype}{neighbour}, {cpu}, {args.clock} clock"
        print(f"# torch {torch.__version__}, {setting}")
        print("| model | batch | prompt | new | llmtrain tok/s | transformers tok/s | ratio | same tokens |")
        print("|---|---|---|---|---|---|---|---|")
        for name in names:
            for b in batches:
                reps = args.repeats or (3 if name == "gpt_small" or args.smoke else 1)
                r = bench(name, b, prompt_len, new_tokens, device, dtype, reps, args.smoke, CLOCKS[args.clock])
                rows.append(r)
                cells = [name, b, prompt_len, new_tokens, f"{r['llmtrain_tok_s']:,.0f}"]
                cells += [f"{r['transformers_tok_s']:,.0f}", f"{r['ratio']:.2f}x", f"{r['same_tokens']:.0%}"]
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
                if "read_weights_ms" in r:  # batch 1: how close both are to the memory floor
                    gbs = r["weight_bytes"] / r["read_weights_ms"] / 1e6
                    floor.append(
                        f"{name}: step {r['llmtrain_step_ms']:.2f} ms (llmtrain) / {r['transformers_step_ms']:.2f} ms "
                        f"(transformers); reading its {r['weight_bytes'] / 1e6:.0f} MB of weight matrices once "
                        f"{r['read_weights_ms']:.2f} ms ({gbs:.1f} GB/s), one-row products with all of them "
                        f"{r['one_row_matmuls_ms']:.2f} ms by F.linear, "
                        f"{r['split_one_row_matmuls_ms']:.2f} ms split over the threads"
                    )
        for line in floor:
            print(f"# batch 1 floor, {line}")
    finally:
        if busy is not None:
            busy.terminate()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "busy": args.busy, "rows": rows}, f, indent=1)
    bad = [r for r in rows if not r["identical"]]
    if bad and dtype == torch.float32:
        print(f"error: greedy tokens differ from transformers for {bad[0]['model']} batch {bad[0]['batch']}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
