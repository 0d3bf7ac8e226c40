"""Typed config schema. Hydra merges the YAML tree in conf/ onto these dataclasses, so a
misspelled key or a wrong type is rejected while the config is composed, before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    name: str = "gpt2"  # registry key: gpt2 | llama | bert | t5
    n_layer: int = 4
    n_head: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention (llama); None = n_head
    d_model: int = 128
    d_ff: Optional[int] = None  # MLP hidden size; None = architecture default
    vocab_size: int = 0  # 0 = take from the tokenizer (padded up to pad_vocab_multiple)
    pad_vocab_multiple: int = 64
    max_seq_len: int = 256
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    type_vocab_size: int = 2  # bert segment embeddings
    init_std: float = 0.02
    head_dim: Optional[int] = None  # t5's d_kv, or fewer heads after structured pruning; None = d_model // n_head
    # t5: sentinel ids above the tokenizer's vocabulary (<extra_id_0> is the highest), as T5's
    # 100 extra ids; the vocabulary is padded from tokenizer size + extra_ids
    extra_ids: int = 0
    relative_buckets: int = 32  # t5 relative position bias: buckets and the distance they reach
    relative_max_distance: int = 128


@dataclass
class SourceConfig:
    """One source of a data mixture (data.sources): a data.path-style source and its weight."""

    path: str = ""  # file, directory, glob or hf:NAME, as data.path
    weight: float = 1.0  # share of the training windows, relative to the other sources' (> 0)
    name: Optional[str] = None  # in metric names (val/loss/<name>); None = from the path
    text_field: Optional[str] = None  # this source's data.text_field / data.doc_pattern; None = data.*
    doc_pattern: Optional[str] = None


@dataclass
class DataConfig:
    path: Optional[str] = None  # file, directory or glob (text); dataset files for tasks
    # A weighted mixture instead of data.path (pretrain): [{path: a.txt, weight: 0.7}, ...]; each
    # source is split, prepared and validated on its own, training windows are drawn by weight.
    sources: Optional[list[SourceConfig]] = None
    text_field: str = "text"
    # Regex matching a line that starts a new document inside a text file (e.g. WikiText's
    # " = Title = " headings); None = one document per file (or per record).
    doc_pattern: Optional[str] = None
    val_fraction: float = 0.1  # last fraction of the corpus (by characters) used for validation
    # a separate validation source (file, directory, glob, hf:...); set: data.path trains whole
    val_path: Optional[str] = None
    seq_len: int = 128
    batch_size: int = 16
    encoding_errors: str = "strict"  # strict | replace
    cache_dir: Optional[str] = None
    num_proc: int = 1
    # pretrain (clm): tokenize data.path on the fly instead of preparing shards (llmtrain.data.streaming)
    streaming: bool = False
    # Packed windows keep documents apart: block-diagonal causal attention, positions restarting
    # per document, no target across a boundary (gpt2/llama; clm, or a generative task's packing)
    document_mask: bool = False


@dataclass
class TokenizerConfig:
    name: str = "char"  # char | byte | sentencepiece | wordpiece | bpe | hf
    # sentencepiece: the .model file; wordpiece / bpe: the tokenizer.json (both trained when it does
    # not exist yet); hf: a Hugging Face tokenizer directory
    path: Optional[str] = None
    vocab_size: int = 2000
    model_type: str = "bpe"  # sentencepiece: bpe | unigram
    character_coverage: float = 1.0
    byte_fallback: bool = True
    input_sentence_size: int = 1_000_000
    lowercase: bool = False  # wordpiece: lowercase (and strip accents), as bert-base-uncased
    special_tokens: list[str] = field(default_factory=list)  # wordpiece / bpe: more, after the built-in ones


@dataclass
class ObjectiveConfig:
    name: str = "clm"  # clm | mlm | nsp | mlm_nsp | span_corruption | denoising | contrastive
    mask_prob: float = 0.15
    nsp_prob: float = 0.5
    # contrastive (SimCSE): InfoNCE temperature, and how token states become one sentence vector
    temperature: float = 0.05
    pooling: str = "mean"  # mean | cls
    # Supervised contrastive: the (sentence A, sentence B, score) columns of data.path; a digit is a
    # 1-based column of a headerless .tsv/.csv, a name a field of a header row or JSON record.
    # Empty = unsupervised: one sentence per line (text) or record (data.text_field).
    pair_columns: list[str] = field(default_factory=list)
    positive_threshold: float = 4.0  # a pair with score >= this is a positive
    hard_negative_threshold: Optional[float] = None  # a pair with score <= this: B is a hard negative; None = none
    # span_corruption (T5) / denoising (BART): fraction of tokens corrupted and the mean span
    # length (denoising: the Poisson lambda of its span lengths)
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    permute_sentences: bool = False  # denoising: shuffle the sentences of the input too


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    fused: Optional[bool] = None  # None = fused on CUDA and CPU (where torch has the CPU kernel)
    # optim=muon: Muon on the blocks' weight matrices (lr muon_lr), AdamW (lr) on everything else
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | linear | constant | wsd
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    eval_every: int = 250
    eval_batches: int = 0  # 0 = the whole validation split
    log_every: int = 10
    ckpt_every: int = 0  # 0 = only at the end (and by ckpt_every_minutes)
    # Also save at the first step boundary this long after the last save, so a kill or OOM loses at
    # most this much work; 0 = off. Decided on rank 0, so every rank saves together.
    ckpt_every_minutes: float = 30.0
    keep_last: int = 2
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    grad_accum: int = 1
    compile: bool = False
    resume: str = "never"  # never | auto
    overwrite: bool = False  # a fresh run over a run directory with checkpoints clears it first
    strategy: str = "auto"  # auto | single | ddp | fsdp
    devices: int = 1
    activation_checkpointing: bool = False
    # The LM head's cross-entropy (clm, mlm, lm and instruction tasks) in chunks of rows, gradients
    # formed in forward: never the whole [tokens, vocab] fp32 logits (objectives/chunked_ce.py).
    # None = auto: on for CPU runs (measured: less memory, same step time), off on GPUs until
    # scripts/gpu_check.sh has measured it there
    chunked_loss: Optional[bool] = None
    # With the chunked loss: form the head weight's gradient at the end of the backward, once the
    # blocks' activations are freed (a vocab x d buffer less at the step's peak, for a fourth head
    # matmul: measured 30.3% against 26.4% lower peak, 1.06x the plain loss's step time and 1.11x
    # the chunked loss's, gpt2_124m on CPU)
    defer_head_grad: bool = False
    max_bad_steps: int = 5
    eval_on_stop: bool = True  # SIGTERM/SIGINT: after the checkpoint, run the validation pass too
    progress: bool = True
    # CPU threads of torch ops; 0 = auto: OMP_NUM_THREADS if you set it, else the usable cores
    # divided by this machine's processes of the run (ranks, parallel sweep jobs)
    threads: int = 0


@dataclass
class LoggerConfig:
    name: str = "console"  # console | wandb | tensorboard
    project: str = "llmtrain"
    mode: str = "online"  # wandb: online | offline | disabled
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    run_name: Optional[str] = None


@dataclass
class LoraConfig:
    r: int = 0  # 0 = full fine-tuning; > 0 = LoRA adapters of this rank, base weights frozen
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn"])  # module-name substrings


@dataclass
class TaskConfig:
    """Fine-tuning / evaluation task (registry kind "task"). Fields unused by a task are ignored."""

    name: str = (
        "lm"  # lm | classification | instruction | extractive_qa | summarization | seq2seq | reward | preference
    )
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    text_field: str = "text"
    text_pair_field: Optional[str] = None
    label_field: str = "label"
    columns: Optional[list[str]] = None  # names of a headerless .tsv/.csv's columns; None = a header row
    labels: Optional[list[str]] = None  # declared label set; None = inferred from the training data
    source_field: str = "source"
    target_field: str = "target"
    chat_template: str = "default"
    packing: bool = False
    doc_stride: int = 64
    max_answer_len: int = 30
    max_examples: int = 0  # 0 = all
    # generative tasks (instruction, summarization): validation answers generated while fine-tuning
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    num_beams: int = 1  # > 1: beam search for the validation answers
    length_penalty: float = 1.0  # beam search: score = log-prob / length ** length_penalty
    prompt_suffix: str = "\nTL;DR: "  # summarization: between the source and the target
    all_targets: bool = False  # summarization: one training example per target (else the first)
    null_threshold: float = 0.0  # extractive_qa: "no answer" when [CLS] beats the best span by more
    # arithmetic: problems such as "37+58=" generated from problem_seed; no files
    digits: int = 2  # operands are drawn from [0, 10**digits)
    ops: list[str] = field(default_factory=lambda: ["+"])  # any of + - *
    problem_seed: int = 0  # decides the problems and which of them are held out
    num_train: int = 5000  # training problems (SFT examples, RL prompts)
    num_val: int = 200  # held-out problems (never among the training ones)
    # preference: the DPO-family loss, its beta (strength of the pull to the reference) and
    # SimPO's target margin gamma
    loss: str = "dpo"  # dpo | ipo | simpo
    # reward / preference: where the pairs come from: file (train_path / val_path) or arithmetic
    # (generated: chosen = the right answer, rejected = a wrong one, from the arithmetic fields)
    pairs: str = "file"
    beta: float = 0.1
    gamma: float = 0.5
    # preference: + rpo_alpha x the chosen reply's per-token NLL (RPO, Pang et al. 2024; TRL's rpo_alpha),
    # which keeps DPO from lowering the chosen replies' likelihood with the rejected ones'
    rpo_alpha: float = 0.0


@dataclass
class FinetuneConfig:
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze_backbone: bool = False
    # quantization-aware training: int8 | int4 fake-quantizes the linear layers' weights while
    # training (int4 in groups of qat_group_size), and the final checkpoint is really quantized
    qat: Optional[str] = None
    qat_group_size: int = 32


@dataclass
class QuantConfig:
    """llmtrain quantize: post-training quantization of the linear layers."""

    method: str = "int8"  # int8 (weight-only, per channel) | int4 (weight-only, group-wise) | int8_dynamic
    group_size: int = 32  # int4: inputs per scale / zero point
    # batches of training data for the int4 clipping search (0 = plain min/max); int8 needs none
    calibration: int = 0
    report: bool = True  # measure source vs quantized (compression.json / .md)


@dataclass
class PruneConfig:
    """llmtrain prune: zero (magnitude, 2:4) or remove (structured) weights of the blocks' linear layers."""

    method: str = "magnitude"  # magnitude | 2:4 | structured
    sparsity: float = 0.5  # magnitude: fraction of weights zeroed; structured: of heads and FFN channels removed
    scope: str = "global"  # magnitude: global (one threshold) | layer (the same fraction per layer)
    heads: bool = True  # structured: remove attention heads too (false: FFN channels only)
    calibration: int = 8  # structured: batches of training data for the importance scores
    report: bool = True


@dataclass
class DistillConfig:
    """llmtrain distill: loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * task loss
    (+ hidden_weight * MSE(projected student hidden states, teacher hidden states))."""

    alpha: float = 0.5  # weight of the KD term; 1 - alpha goes to the task loss on the labels
    temperature: float = 2.0  # softens both distributions; the KD term is scaled by T^2
    hidden_weight: float = 0.0  # > 0: also match final hidden states through a learned projection


@dataclass
class SamplingConfig:
    """How text is sampled; generate, chat and eval's generation task each set their own defaults."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: Optional[int] = 200  # None = no top-k cut
    top_p: Optional[float] = None  # nucleus sampling; None = off
    num_beams: int = 1  # > 1: beam search (deterministic; temperature/top_k/top_p unused)
    length_penalty: float = 1.0  # beam search: score = log-prob / length ** length_penalty


@dataclass
class GenerateConfig(SamplingConfig):
    prompt: str = "\n"
    num_samples: int = 1  # continuations of the prompt, sampled as one batch


@dataclass
class ChatConfig(SamplingConfig):
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: Optional[int] = 50
    template: Optional[str] = None  # chat template name; None = the checkpoint's own


@dataclass
class ExportConfig:
    out: Optional[str] = None  # the directory to write
    format: str = "hf"


@dataclass
class EvalConfig(SamplingConfig):
    tasks: list[str] = field(default_factory=lambda: ["lm"])  # lm | classification | qa | generation | mlm | nsp | sts
    max_examples: int = 0  # 0 = all
    batch_size: int = 16
    # generation task: greedy unless set
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: Optional[int] = None
    stop: list[str] = field(default_factory=list)  # more strings that end a generation
    prompt_format: Optional[str] = None  # e.g. "{source} TL;DR:" for a plain LM; None = template or raw text
    # sts task: a sentence-pair file with gold similarity scores (e.g. STS-B dev.tsv)
    sts_path: Optional[str] = None
    sts_columns: list[str] = field(default_factory=lambda: ["8", "9", "10"])  # A, B, score; as objective.pair_columns
    sts_positive: float = 4.0  # alignment is over the pairs scoring >= this (SimCSE: STS-B pairs above 4)
    pooling: Optional[str] = None  # mean | cls; None = the checkpoint's objective.pooling
    length_normalize: bool = False  # preference task: compare per-token (not summed) log-probs of a policy
    # lm/mlm/nsp: what of the data to score: all | val; None = all of data given on the command
    # line (metrics eval/*), else the checkpoint's own validation split (val/*)
    split: Optional[str] = None


@dataclass
class EmbedConfig:
    input: Optional[str] = None  # sentences: one per line (text) or record (.jsonl/.json/.csv/.tsv, data.text_field)
    out: Optional[str] = None  # the .npy file to write: one row per line or record
    pooling: Optional[str] = None  # mean | cls; None = the checkpoint's objective.pooling
    normalize: bool = False  # L2-normalise each row
    batch_size: int = 64


@dataclass
class BenchConfig:
    steps: int = 20
    warmup: int = 5
    out: Optional[str] = None  # JSON results file; default RUN_DIR/bench.json
    baseline: bool = True  # also time a plain PyTorch loop of the same model
    rounds: int = 5  # steps are timed in this many rounds, taking turns with the baseline; best round counts


@dataclass
class RLConfig:
    """`llmtrain rl`: GRPO from init_from. Each step samples group_size completions for each of
    data.batch_size prompts of the task; advantages are normalised within each group."""

    reward: str = "arithmetic"  # arithmetic | model | python:module:function
    reward_model: Optional[str] = None  # rl.reward=model: a reward checkpoint (task=reward)
    reward_batch_size: int = 16  # rl.reward=model: responses scored per forward
    group_size: int = 8  # completions sampled per prompt
    max_new_tokens: int = 16  # per completion
    temperature: float = 1.0  # rollouts (validation is greedy)
    top_k: Optional[int] = None
    kl_coef: float = 0.04  # weight of the k3 KL estimate to the frozen reference (init_from)
    clip_eps: float = 0.2  # the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps]
    iterations: int = 1  # optimizer steps per rollout (GRPO's mu); > 1 makes the clip bite
    eval_prompts: int = 200  # held-out prompts scored at each evaluation (0 = all)
    num_samples: int = 4  # samples written to samples.jsonl per evaluation


@dataclass
class RunConfig:
    """The whole run: groups shared by every stage, and each stage's own group (generate, chat,
    export, eval, bench, distill, embed). Keys that moved here from the root: llmtrain/config/moved_keys.py."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    stage: str = "pretrain"
    experiment: Optional[str] = None  # set by experiment files, for run names
    init_from: Optional[str] = None  # checkpoint to start from (finetune; distill's student; pretrain: its weights)
    teacher: Optional[str] = None  # the checkpoint to distill from (distill)
    checkpoint: Optional[str] = None  # checkpoint to load (evaluate, generate, chat, export)
    # what a sweep optimises: the stage returns this metric
    optimize_metric: str = "val/loss"


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore (called once by the CLI)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
