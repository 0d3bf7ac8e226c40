"""STS-B quality check: an MLM-only bert_small against the same model after contrastive training
(SimCSE), with averaged bag-of-words TF-IDF vectors as a floor; STS-B dev Spearman of cosines.

    .venv/bin/python scripts/quality_sts.py --mlm-steps 600 --cl-steps 400 --out /tmp/q

Every model step runs through the CLI: `llmtrain pretrain +experiment=bert_small_subword
objective=mlm` (an 8,000-piece sentencepiece vocabulary, masked LM only) on the STS-B train
sentences (unlabeled, no scores) followed by WikiText-2, then `llmtrain pretrain
+experiment=simcse init_from=MLM` twice (supervised on the scored STS-B train pairs: score >= 3
a positive, <= 1 a hard negative; unsupervised on the STS-B train sentences, one per line), and
`llmtrain evaluate eval.tasks=[sts]` on STS-B dev, which is never trained on. Results:
OUT/quality_sts.json.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from quality_sst2 import cli  # one way to run a CLI step of a quality script (beside this file)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLMTRAIN_TEST_DATA") or ROOT.parent / "shared" / "data")  # as tests/conftest.py


def sts(checkpoint: Path, out: Path, dev: Path) -> dict:
    cli("evaluate", f"checkpoint={checkpoint}", "eval.tasks=[sts]", f"eval.sts_path={dev}", f"hydra.run.dir={out}")
    return {k: v for k, v in json.loads((out / "eval.json").read_text()).items() if k.startswith("sts/")}


def tfidf_spearman(train: Path, dev: Path) -> float:
    """Cosine of TF-IDF bag-of-words vectors (IDF from the train and dev sentences)."""
    from scipy.stats import spearmanr
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import paired_cosine_distances

    def rows(path):
        return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    tr, dv = rows(train), rows(dev)
    vec = TfidfVectorizer().fit([r[7] for r in tr + dv] + [r[8] for r in tr + dv])
    cos = 1 - paired_cosine_distances(vec.transform([r[7] for r in dv]), vec.transform([r[8] for r in dv]))
    return float(spearmanr(cos, [float(r[9]) for r in dv]).statistic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mlm-steps", type=int, default=600)
    ap.add_argument("--cl-steps", type=int, default=400)
    ap.add_argument("--cl-batch", type=int, default=64, help="sentences (pairs) per contrastive step")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "quality_sts")
    ap.add_argument("--init-from", help="skip MLM pretraining: start from this checkpoint")
    ap.add_argument("--parallel", action="store_true", help="the baseline and both variants at once")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, dev = DATA / "stsb" / "train.tsv", DATA / "stsb" / "dev.tsv"
    sentences = out / "stsb_train_sentences.txt"  # unlabeled: both sides of every train pair, one per line
    rows = [line.split("\t") for line in train.read_text(encoding="utf-8").splitlines() if line.strip()]
    sentences.write_text("".join(f"{r[7]}\n{r[8]}\n" for r in rows), encoding="utf-8")
    results: dict = {"tfidf/spearman": tfidf_spearman(train, dev)}
    print(f"TF-IDF bag of words: Spearman {results['tfidf/spearman']:.4f}", flush=True)
    common = ["trainer.progress=false", "trainer.overwrite=true", "trainer.ckpt_every_minutes=0"]

    mlm = Path(args.init_from) if args.init_from else out / "mlm"
    if not args.init_from:
        # One directory, read in name order: the STS-B train sentences, then WikiText-2 (whose
        # last 10% validates the MLM). The tokenizer is trained on the same text.
        corpus = out / "corpus"
        corpus.mkdir(exist_ok=True)
        for name, src in (("0_stsb_train.txt", sentences), ("1_wikitext2.txt", DATA / "wikitext2" / "valid.txt")):
            if not (corpus / name).exists():
                (corpus / name).symlink_to(src.resolve())
        results["mlm_seconds"] = cli(
            "pretrain", "+experiment=bert_small_subword", "objective=mlm", f"data.path={corpus}",
            f"trainer.max_steps={args.mlm_steps}", f"trainer.eval_every={args.mlm_steps}", f"hydra.run.dir={mlm}",
            *common,
        )  # fmt: skip
    variants = {
        "simcse_sup": [
            f"data.path={train}", "objective.pair_columns=[8,9,10]", "objective.positive_threshold=3",
            "objective.hard_negative_threshold=1",
        ],
        "simcse_unsup": [f"data.path={sentences}"],
    }  # fmt: skip

    def contrastive(name: str) -> None:
        run = out / name
        results[f"{name}_seconds"] = cli(
            "pretrain", "+experiment=simcse", f"init_from={mlm}", *variants[name],
            f"trainer.max_steps={args.cl_steps}", f"data.batch_size={args.cl_batch}", f"hydra.run.dir={run}", *common,
        )  # fmt: skip
        results[name] = sts(run, out / f"eval_{name}", dev)

    def baseline() -> None:
        results["mlm"] = sts(mlm, out / "eval_mlm", dev)

    jobs = [baseline] + [lambda n=n: contrastive(n) for n in variants]
    with ThreadPoolExecutor(max_workers=len(jobs) if args.parallel else 1) as pool:
        for job in [pool.submit(j) for j in jobs]:
            job.result()
    for name in ("mlm", *variants):
        r = results[name]
        print(f"{name:>14}: Spearman {r['sts/spearman']:.4f}  alignment {r['sts/alignment']:.4f}"
              f"  uniformity {r['sts/uniformity']:.4f}")  # fmt: skip
    (out / "quality_sts.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
