#!/bin/bash
# SciTLDR summarization: a T5 pretrained with span corruption vs a Llama decoder of about the same
# size pretrained with CLM on the same WikiText-2 tokens (same tokenizer, batches, steps, and raw
# tokens per row: T5's 141-token windows for data.seq_len=128), both fine-tuned with the same steps,
# scored on the first N SciTLDR test records with greedy decoding and 4 beams (docs/benchmarks.md).
#   DATA=../shared/data STEPS=150 FT=60 N=20 OUT=runs/scitldr scripts/quality_scitldr_t5.sh
# Model size: T5 (the t5_span_corruption preset's 3 + 3 layers at d_model 128 unless set) and the
# decoder (twice the layers, same width) follow LAYERS, D_MODEL, HEADS and D_FF; PARALLEL=1 runs the
# two models at once (logs in OUT/t5.log, OUT/dec.log); MODELS=t5 (or dec) runs one of them.
# A model whose OUT/*_pre already holds a checkpoint is only fine-tuned and scored.
set -euo pipefail
DATA=${DATA:-../shared/data}; OUT=${OUT:-runs/scitldr}; mkdir -p "$OUT"
STEPS=${STEPS:-150}; FT=${FT:-60}; N=${N:-20}; LLMTRAIN=${LLMTRAIN:-llmtrain}; BATCH=${BATCH:-8}
LAYERS=${LAYERS:-3}; D_MODEL=${D_MODEL:-128}; HEADS=${HEADS:-4}; D_FF=${D_FF:-256}
W=$DATA/wikitext2/valid.txt; S=$DATA/scitldr
PRE="trainer.max_steps=$STEPS trainer.eval_every=$STEPS trainer.eval_batches=10 trainer.progress=false data.batch_size=$BATCH"
FTC="trainer.max_steps=$FT trainer.eval_every=0 trainer.progress=false task.train_path=$S/train.jsonl
  task.val_path=$S/dev.jsonl eval.max_examples=5 task.max_new_tokens=8 data.seq_len=192 data.batch_size=$BATCH"
score() {  # greedy and 4 beams on the first N test records
  for b in 1 4; do
    $LLMTRAIN evaluate checkpoint=$OUT/${1}_ft eval.tasks=[generation] task.val_path=$S/test.jsonl \
      eval.max_examples=$N eval.max_new_tokens=32 eval.num_beams=$b hydra.run.dir=$OUT/eval_${1}_beams$b
  done
}
t5() {
  [ -d "$OUT/t5_pre/checkpoints" ] || $LLMTRAIN pretrain +experiment=t5_span_corruption data.path=$W model.n_layer=$LAYERS model.d_model=$D_MODEL \
    model.n_head=$HEADS model.d_ff=$D_FF $PRE hydra.run.dir=$OUT/t5_pre
  $LLMTRAIN finetune +experiment=summarize_scitldr_t5 init_from=$OUT/t5_pre $FTC hydra.run.dir=$OUT/t5_ft
  score t5
}
dec() {
  [ -d "$OUT/dec_pre/checkpoints" ] || $LLMTRAIN pretrain model=llama_tiny model.n_layer=$((2 * LAYERS)) model.d_model=$D_MODEL model.n_head=$HEADS \
    model.n_kv_heads=null model.max_seq_len=256 model.tie_embeddings=false data=wikitext2 data.path=$W \
    tokenizer=sentencepiece tokenizer.vocab_size=2000 data.seq_len=141 optim.lr=3e-3 optim.weight_decay=0.01 \
    optim.beta2=0.99 scheduler.warmup_steps=20 $PRE hydra.run.dir=$OUT/dec_pre
  $LLMTRAIN finetune +experiment=summarize_scitldr init_from=$OUT/dec_pre $FTC hydra.run.dir=$OUT/dec_ft
  score dec
}
MODELS=${MODELS:-t5 dec}
if [ "${PARALLEL:-0}" = 1 ]; then  # the models side by side (one core each)
  pids=(); for m in $MODELS; do $m > "$OUT/$m.log" 2>&1 & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
else
  for m in $MODELS; do $m; done
fi
