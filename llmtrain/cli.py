"""The `llmtrain` command: one map from verb to stage; Hydra parses everything after the verb.

llmtrain pretrain +experiment=gpt_small optim.lr=3e-4
llmtrain pretrain -m optim.lr=1e-3,3e-4        # sweep
llmtrain pretrain --cfg job                     # print the composed config
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Callable

import typer

from llmtrain.errors import Interrupted, UserError, fail

# verb -> (stage module, one-line help). The module's `run(cfg)` does the work; the primary
# config is conf/<verb with spaces as underscores>.yaml.
STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("llmtrain.stages.pretrain", "Pretrain a model (causal LM, masked LM, NSP, contrastive)."),
    "finetune": ("llmtrain.stages.finetune", "Fine-tune a checkpoint (init_from=PATH)."),
    "rl": ("llmtrain.stages.rl", "Reinforcement learning with GRPO from a checkpoint (init_from=PATH rl.reward=...)."),
    "distill": ("llmtrain.stages.distill", "Distill a teacher checkpoint into a student (teacher=PATH)."),
    "evaluate": ("llmtrain.stages.evaluate", "Evaluate a checkpoint (checkpoint=PATH)."),
    "generate": ("llmtrain.stages.generate", "Sample text from a checkpoint (checkpoint=PATH generate.prompt=...)."),
    "chat": ("llmtrain.stages.chat", "Chat with an instruction-tuned checkpoint (checkpoint=PATH)."),
    "export": ("llmtrain.stages.export", "Export a checkpoint as Hugging Face files (checkpoint=PATH export.out=DIR)."),
    "embed": ("llmtrain.stages.embed", "Sentence embeddings to .npy (checkpoint=PATH embed.input=FILE embed.out=OUT)."),
    "quantize": (
        "llmtrain.stages.quantize",
        "Quantize a checkpoint (checkpoint=PATH quant.method=...).",
    ),
    "prune": ("llmtrain.stages.prune", "Prune a checkpoint (checkpoint=PATH prune.method=...)."),
    "bench": ("llmtrain.stages.bench", "Benchmark the training step: tokens/s, MFU, step time, memory."),
    "tokenizer train": ("llmtrain.stages.tokenizer_train", "Train a tokenizer (sentencepiece, wordpiece, bpe)."),
    "data prepare": ("llmtrain.stages.prepare", "Tokenize a dataset into packed token shards (cached)."),
}

app = typer.Typer(
    name="llmtrain",
    help="Pretrain, fine-tune and evaluate transformer language models from composable Hydra configs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Hydra flags that take a value (so the value is not mistaken for an override).
_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--info",
    "--run",
    "--experimental-rerun",
}


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Split Hydra's command line into flags and key=value overrides."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            flags.append(a)
            if a in _VALUE_FLAGS and i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]:
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(a)
        i += 1
    return flags, overrides


# Keys whose values are free text: `generate.prompt="ROMEO:"` reaches us as generate.prompt=ROMEO: (the
# shell ate the quotes), which Hydra's grammar would reject; quote such values for Hydra.
FREE_TEXT_KEYS = ("generate.prompt",)


def _quote_free_text(args: list[str]) -> list[str]:
    out = []
    for a in args:
        key, eq, value = a.partition("=")
        if eq and key.lstrip("+~") in FREE_TEXT_KEYS and not (value[:1] in ("'", '"') and value[-1:] == value[:1]):
            # Hydra unescapes backslashes only before a quote (and at the end of the string).
            escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
            escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
            a = f"{key}='{escaped}'"
        out.append(a)
    return out


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf errors are multi-line with the key on a later line: make one line."""
    from omegaconf.errors import MissingMandatoryValue

    parts: list[str] = []
    e: BaseException | None = exc
    while e is not None:
        msg = str(e).strip()
        # OmegaConf chains an unformatted copy of its message ('$VALUE' of type '$VALUE_TYPE')
        # under the formatted one; the formatted one already says it all.
        if msg and "$VALUE" not in msg:
            lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
            # Hydra appends its config search path to a missing-option error: not the user's concern
            lines = lines[: next((i for i, ln in enumerate(lines) if ln.startswith("Config search path")), len(lines))]
            head = lines[0]
            key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
            options = [ln for ln in lines[1:] if not ln.startswith(("full_key", "object_type", "reference_type"))]
            if isinstance(e, MissingMandatoryValue) and key:
                # OmegaConf names the dataclass and the bare field; the user needs the dotted key
                head = f"{key} is required (set {key}=VALUE)"
            elif key and key not in head:
                head += f" (key: {key})"
            if "Available options" in msg:
                available = [o.lstrip("- ").strip() for o in options if not o.startswith("Available")]
                missing = re.search(r"Could not find '([^']+)/([^'/]+)'", head)
                close = difflib.get_close_matches(missing.group(2), available, n=1) if missing else []
                if missing:
                    head = f"unknown {missing.group(1)} {missing.group(2)!r}"
                head += (f" (did you mean {close[0]}?)" if close else "") + " [available: " + ", ".join(available) + "]"
            if head not in parts:
                parts.append(head)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def _compose_checked(overrides: list[str], config_name: str):
    """Compose and validate (call inside compose.hydra_session): config mistakes exit 2 with one
    line and no traceback, before anything is written."""
    from llmtrain.config.compose import compose_run, validate
    from llmtrain.config.unknown_keys import with_suggestion

    try:
        cfg = compose_run(config_name, overrides)
        validate(cfg)
    except UserError as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - composition errors of any kind are bad input
        fail(with_suggestion(_one_line(e)))
    return cfg


def _task(stage: str, checked: bool = False) -> Callable:
    """Hydra's task function for a stage. Returns the optimised metric as a float (for sweepers).
    `checked`: the config was already validated when it was composed (single runs, their workers).

    Single run: a UserError exits 2 with one line. Sweep (-m): a failing job must not end the
    sweep, so any exception is recorded in the job directory (status.json, error.txt), reported in
    one line, and the job returns the worst value for the sweep's direction (see llmtrain/sweep/job.py).
    A run stopped by SIGTERM/SIGINT (checkpoint saved) prints its resume line last and exits
    128 + signal: 143 for SIGTERM, 130 for SIGINT. In a sweep the job is recorded as interrupted
    and the sweep stops too, since the signal was meant for the whole command.
    """

    def task(cfg) -> float:
        from llmtrain.run_records import console_log

        with console_log():  # the console output also goes to RUN_DIR/<stage>.log
            return run(cfg)

    def run(cfg) -> float:
        import time

        from llmtrain.config import compose, to_run_config
        from llmtrain.sweep.job import fail_job, finish_job, in_multirun, interrupt_job, objective_value

        started, multirun = time.time(), in_multirun()
        metric = str(cfg.get("optimize_metric") or "val/loss")
        try:
            module = importlib.import_module(STAGES[stage][0])
            # A sweep job's own values are checked here (Hydra does not check `+key`); a single
            # run's config was checked once, when it was composed.
            run_cfg = to_run_config(cfg) if checked else compose.validate(cfg)
            value = module.run(run_cfg)
        except Interrupted as e:
            if multirun:
                interrupt_job(e, metric, started)
            if os.environ.get("RANK", "0") == "0":
                print(str(e), flush=True)
            raise SystemExit(e.exit_code) from None
        except UserError as e:
            if multirun:
                return fail_job(e, metric, started)
            fail(str(e))
        except Exception as e:  # noqa: BLE001 - one job's crash is that job's result in a sweep
            if multirun:
                return fail_job(e, metric, started)
            raise
        return finish_job(value, metric, started) if multirun else objective_value(value, metric)

    return task


def run_stage(stage: str, args: list[str]) -> None:
    """A single run is composed once (here) and run on that config; a sweep goes through
    hydra.main, its first values validated here first."""
    from llmtrain.config import compose, register_configs
    from llmtrain.config.moved_keys import refuse_moved_keys
    from llmtrain.distributed.launch import MULTIRUN_FLAGS, maybe_launch
    from llmtrain.threads import remember_user_threads

    if "--help" in args or "-h" in args:
        from llmtrain.help import verb_help

        typer.echo(verb_help(stage), nl=False)
        return
    register_configs()
    remember_user_threads()  # before joblib or our launcher set OMP_NUM_THREADS for workers
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    config_name = stage.replace(" ", "_")
    composed = os.environ.pop(compose.COMPOSED_ENV, None)
    if composed:  # a worker of `trainer.devices=N`: the parent composed and checked the config
        with compose.hydra_session(config_name):
            compose.run_composed(
                _task(stage, checked=True),
                compose.load_composed(composed),
                configure_logging=os.environ.get("RANK", "0") == "0",
            )
        return
    args = _quote_free_text(args)
    flags, overrides = _split_args(args)
    refuse_moved_keys(stage, overrides)  # old flat spellings: one line naming the new key
    if "--config-name" in flags or "-cn" in flags:
        idx = max(flags.index(f) for f in ("--config-name", "-cn") if f in flags)
        config_name = flags[idx + 1]
        flags = flags[:idx] + flags[idx + 2 :]
    if not flags:
        with compose.hydra_session(config_name):
            cfg = _compose_checked(overrides, config_name)
            if maybe_launch(stage, cfg):  # trainer.devices=N: N workers ran on this config
                return
            under_torchrun = os.environ.get("RANK", "0") != "0"
            if under_torchrun and not any(o.split("=", 1)[0] == "hydra.run.dir" for o in overrides):
                # Other ranks take rank 0's directory by broadcast (llmtrain/runtime.py); their
                # own ${now:} directory would stay empty.
                cfg.hydra.run.dir = "."
            compose.run_composed(_task(stage, checked=True), cfg, configure_logging=not under_torchrun)
        return
    if not any(f in flags for f in ("--hydra-help", "--info", "--shell-completion", "-sc")):
        try:
            single = compose.sweep_first_values(overrides) if any(f in flags for f in MULTIRUN_FLAGS) else overrides
        except UserError as e:
            fail(str(e))
        with compose.hydra_session(config_name):
            _compose_checked(single, config_name)
    import hydra

    sys.argv = [f"llmtrain {stage}", *args]
    main_fn = hydra.main(config_path=str(compose.CONF_DIR), config_name=config_name, version_base="1.3")(_task(stage))
    main_fn()


_GROUPS: dict[str, typer.Typer] = {}


def _make_command(stage: str) -> None:
    parent, _, name = stage.rpartition(" ")
    target = app
    if parent:  # nested verb, e.g. `llmtrain tokenizer train`
        if parent not in _GROUPS:
            _GROUPS[parent] = typer.Typer(help=f"{parent} commands", no_args_is_help=True)
            app.add_typer(_GROUPS[parent], name=parent)
        target = _GROUPS[parent]

    @target.command(
        name=name,
        help=STAGES[stage][1] + " Arguments are Hydra overrides; see `llmtrain " + stage + " --help`.",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )
    def command(ctx: typer.Context) -> None:
        run_stage(stage, list(ctx.args))


for _stage in STAGES:
    _make_command(_stage)


@app.command("plot")
def plot(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (or a sweep directory) to overlay."),
    out: Path = typer.Option(None, "--out", "-o", help="PNG path (default: curves.png in the first run dir)."),
):
    """Draw loss / lr / throughput curves from metrics.jsonl of one or more runs."""
    from llmtrain.eval.plot import plot_runs

    dirs: list[Path] = []
    for d in run_dirs:  # a sweep directory stands for its job directories
        jobs = sorted(p.parent for p in d.glob("*/metrics.jsonl")) if not (d / "metrics.jsonl").exists() else []
        dirs.extend(jobs or [d])
    try:
        path = plot_runs(dirs, out or dirs[0] / "curves.png")
    except UserError as e:
        fail(str(e))
    typer.echo(f"wrote {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
