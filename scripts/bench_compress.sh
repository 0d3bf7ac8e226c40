#!/usr/bin/env bash
# Compression benchmarks for docs/benchmarks.md: a gpt_small Shakespeare model, then PTQ (int8,
# int4 g=32/64, int8_dynamic), QAT int4, magnitude 50% and structured 25% pruning with a recovery
# fine-tune of 10% of the original steps (and an fp32 control fine-tune of the same length).
#   scripts/bench_compress.sh [OUT_DIR] [PRETRAIN_STEPS]
set -euo pipefail
OUT=${1:-runs/bench_compress}
STEPS=${2:-500}
REC=$((STEPS / 10))
LLM=${LLM:-"python -m llmtrain"}
EVAL="trainer.eval_batches=50 trainer.threads=1"
FT="data.seq_len=64 data.batch_size=12 trainer.max_steps=$REC trainer.eval_every=$REC scheduler.warmup_steps=5 \
optim.lr=5e-4 trainer.progress=false $EVAL"
[ -d "$OUT/base/checkpoints" ] || $LLM pretrain +experiment=gpt_small trainer.max_steps="$STEPS" trainer.eval_every="$STEPS" \
  trainer.progress=false $EVAL hydra.run.dir="$OUT/base"
$LLM quantize checkpoint="$OUT/base" quant.method=int8 $EVAL hydra.run.dir="$OUT/int8"
$LLM quantize checkpoint="$OUT/base" quant.method=int4 quant.group_size=32 $EVAL hydra.run.dir="$OUT/int4_g32"
$LLM quantize checkpoint="$OUT/base" quant.method=int4 quant.group_size=64 $EVAL hydra.run.dir="$OUT/int4_g64"
$LLM quantize checkpoint="$OUT/base" quant.method=int4 quant.group_size=64 quant.calibration=4 $EVAL \
  hydra.run.dir="$OUT/int4_g64_cal"
$LLM quantize checkpoint="$OUT/base" quant.method=int8_dynamic $EVAL hydra.run.dir="$OUT/int8_dynamic"
$LLM finetune init_from="$OUT/base" $FT hydra.run.dir="$OUT/fp32_control"
$LLM quantize checkpoint="$OUT/fp32_control" quant.method=int4 quant.group_size=64 $EVAL \
  hydra.run.dir="$OUT/fp32_control_int4_g64"   # PTQ of the same extra training, for the QAT comparison
$LLM finetune init_from="$OUT/base" finetune.qat=int4 finetune.qat_group_size=64 $FT hydra.run.dir="$OUT/qat_int4_g64"
$LLM evaluate checkpoint="$OUT/qat_int4_g64" $EVAL hydra.run.dir="$OUT/qat_int4_g64/eval"
$LLM prune checkpoint="$OUT/base" prune.method=magnitude prune.sparsity=0.5 $EVAL hydra.run.dir="$OUT/mag50"
$LLM finetune init_from="$OUT/mag50" $FT hydra.run.dir="$OUT/mag50_rec"
$LLM evaluate checkpoint="$OUT/mag50_rec" $EVAL hydra.run.dir="$OUT/mag50_rec/eval"
$LLM prune checkpoint="$OUT/base" prune.method=structured prune.sparsity=0.25 $EVAL hydra.run.dir="$OUT/struct25"
$LLM finetune init_from="$OUT/struct25" $FT hydra.run.dir="$OUT/struct25_rec"
$LLM evaluate checkpoint="$OUT/struct25_rec" $EVAL hydra.run.dir="$OUT/struct25_rec/eval"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for f in sorted(out.glob("**/compression.json")):
    r = json.loads(f.read_text())
    s, c = r["source"], r["compressed"]
    print(f"{str(f.parent.relative_to(out)):22s} ppl {s['val/ppl']:.4f} -> {c['val/ppl']:.4f} "
          f"({100 * (c['val/ppl'] / s['val/ppl'] - 1):+.2f}%)  linear bytes x{r['ratios'].get('linear_bytes', 0):.2f}  "
          f"disk x{r['ratios'].get('disk_bytes', 0):.2f}  nonzero {c['nonzero_params']:,}/{s['nonzero_params']:,}  "
          f"gen tok/s {s.get('gen_tokens_per_s', 0):.0f} -> {c.get('gen_tokens_per_s', 0):.0f}")
PY
