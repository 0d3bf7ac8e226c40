"""SST-2 quality check: pretrain a small BERT with llmtrain, fine-tune it on SST-2 train,
report dev accuracy / macro-F1 against the majority-class baseline.

    .venv/bin/python scripts/quality_sst2.py --pretrain-steps 1500 --finetune-steps 2000 --out /tmp/q

Both stages run through the CLI (`llmtrain pretrain +experiment=bert_small_subword`: masked LM +
NSP on WikiText-2 with an 8,000-piece sentencepiece vocabulary, `--preset bert_small` for the
character-level one; `llmtrain finetune +experiment=finetune_sst2`); extra Hydra overrides for the
fine-tune go after `--`. Results are printed and written to OUT/quality_sst2.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "valid.txt"


def cli(*args: str) -> float:
    t = time.time()
    print("$ llmtrain " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "llmtrain", *args], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"llmtrain {args[0]} failed with exit code {proc.returncode}")
    return time.time() - t


def last(run: Path, key: str) -> float | None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--finetune-steps", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "quality_sst2")
    ap.add_argument("--init-from", help="skip pretraining: fine-tune this checkpoint")
    ap.add_argument("--preset", default="bert_small_subword", help="the pretraining experiment")
    ap.add_argument(
        "--pretrain-args",
        default="",
        help="extra pretrain overrides, space separated "
        "(e.g. 'model=bert_tiny model.max_seq_len=128 data.seq_len=128')",
    )
    ap.add_argument(
        "--with-task-text",
        action="store_true",
        help="pretrain on WikiText-2 plus the SST-2 training sentences as unlabeled text "
        "(task-adaptive pretraining; labels unused, dev never seen)",
    )
    ap.add_argument("overrides", nargs="*", help="extra finetune overrides (after --)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    dev = (SST2 / "dev.tsv").read_text().splitlines()[1:]
    counts = collections.Counter(line.rsplit("\t", 1)[1].strip() for line in dev if line.strip())
    majority = max(counts.values()) / sum(counts.values())

    pre_s = 0.0
    init = args.init_from
    if init is None:
        init = str(args.out / "pretrain")
        corpus = [f"data.path={WIKITEXT}"]  # the preset names no file (conf/ ships in the package)
        if args.with_task_text:
            # One directory, read in name order: WikiText-2 articles, then SST-2 sentences (one
            # document each). The last 10% of documents (SST-2 train sentences) validate the MLM.
            d = args.out / "corpus"
            d.mkdir(exist_ok=True)
            for name, src in (("1_wikitext2.txt", WIKITEXT), ("2_sst2_train.tsv", SST2 / "train.tsv")):
                if not (d / name).exists():
                    (d / name).symlink_to(src.resolve())
            corpus = [f"data.path={d}", "data.text_field=sentence"]
        pre_s = cli(
            "pretrain",
            f"+experiment={args.preset}",
            f"trainer.max_steps={args.pretrain_steps}",
            f"trainer.eval_every={args.pretrain_steps}",
            "trainer.progress=false",
            f"hydra.run.dir={init}",
            *corpus,
            *args.pretrain_args.split(),
        )
    ft = args.out / "finetune"
    ft_s = cli(
        "finetune",
        "+experiment=finetune_sst2",
        f"init_from={init}",
        f"trainer.max_steps={args.finetune_steps}",
        f"task.train_path={SST2 / 'train.tsv'}",
        f"task.val_path={SST2 / 'dev.tsv'}",
        f"trainer.eval_every={max(args.finetune_steps // 2, 1)}",
        "trainer.eval_batches=0",
        "trainer.progress=false",
        f"hydra.run.dir={ft}",
        *args.overrides,
    )
    result = {
        "dev_accuracy": last(ft, "val/accuracy"),
        "dev_macro_f1": last(ft, "val/macro_f1"),
        "dev_loss_before": json.loads((ft / "metrics.jsonl").read_text().splitlines()[0]).get("val/loss"),
        "dev_loss_after": last(ft, "val/loss"),
        "majority_baseline": majority,
        "dev_examples": sum(counts.values()),
        "pretrain_steps": 0 if args.init_from else args.pretrain_steps,
        "pretrain_mlm_accuracy": None if args.init_from else last(Path(init), "val/mlm_accuracy"),
        "finetune_steps": args.finetune_steps,
        "pretrain_seconds": round(pre_s, 1),
        "finetune_seconds": round(ft_s, 1),
        "pretrain_overrides": args.pretrain_args.split(),
        "pretrain_with_task_text": args.with_task_text,
        "finetune_overrides": args.overrides,
    }
    (args.out / "quality_sst2.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"SST-2 dev accuracy {result['dev_accuracy']:.4f} vs majority baseline {majority:.4f} (target >= 0.80)")


if __name__ == "__main__":
    main()
