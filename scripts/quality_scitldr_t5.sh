#!/bin/bash
# SciTLDR summarization: a T5 pretrained with span corruption vs a Llama decoder of about the same
# size pretrained with CLM on the same WikiText-2 tokens (same tokenizer, batches, steps, and raw
# tokens per row: T5's 141-token windows for data.seq_len=128), both fine-tuned with the same steps,
# scored on the first N SciTLDR test records with greedy decoding and 4 beams (docs/benchmarks.md).
#   DATA=../shared/data STEPS=150 FT=60 N=20 OUT=runs/scitldr scripts/quality_scitldr_t5.sh
set -euo pipefail
DATA=${DATA:-../shared/data}; OUT=${OUT:-runs/scitldr}
STEPS=${STEPS:-150}; FT=${FT:-60}; N=${N:-20}; LLMTRAIN=${LLMTRAIN:-llmtrain}
W=$DATA/wikitext2/valid.txt; S=$DATA/scitldr
PRE="trainer.max_steps=$STEPS trainer.eval_every=$STEPS trainer.eval_batches=10 trainer.progress=false data.batch_size=8"
$LLMTRAIN pretrain +experiment=t5_span_corruption data.path=$W $PRE hydra.run.dir=$OUT/t5_pre
$LLMTRAIN pretrain model=llama_tiny model.n_layer=6 model.d_model=128 model.n_head=4 model.n_kv_heads=null \
  model.max_seq_len=256 model.tie_embeddings=false data=wikitext2 data.path=$W tokenizer=sentencepiece \
  tokenizer.vocab_size=2000 data.seq_len=141 optim.lr=3e-3 optim.weight_decay=0.01 optim.beta2=0.99 \
  scheduler.warmup_steps=20 $PRE hydra.run.dir=$OUT/dec_pre
FTC="trainer.max_steps=$FT trainer.eval_every=0 trainer.progress=false task.train_path=$S/train.jsonl
  task.val_path=$S/dev.jsonl eval.max_examples=5 task.max_new_tokens=8 data.seq_len=192 data.batch_size=8"
$LLMTRAIN finetune +experiment=summarize_scitldr_t5 init_from=$OUT/t5_pre $FTC hydra.run.dir=$OUT/t5_ft
$LLMTRAIN finetune +experiment=summarize_scitldr init_from=$OUT/dec_pre $FTC hydra.run.dir=$OUT/dec_ft
for m in t5 dec; do for b in 1 4; do
  $LLMTRAIN evaluate checkpoint=$OUT/${m}_ft eval.tasks=[generation] task.val_path=$S/test.jsonl \
    eval.max_examples=$N eval.max_new_tokens=32 eval.num_beams=$b hydra.run.dir=$OUT/eval_${m}_beams$b
done; done
