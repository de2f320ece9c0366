"""``python -m llmsys.pipeline``: the main job. Every stage end to end, then the stage report.

The stages, their step counts and settings come from a named recipe, ``configs/experiment/<name>.yaml``
(``--recipe``, default ``pipeline``), validated by :class:`~llmsys.config.schema.PipelineConfig`. Each
stage runs as its own ``python -m llmsys.train stage=<name> trainer.output_dir=<out>/<name> ...`` process
(under ``torchrun`` with ``--nproc N``), exactly as a user or a cluster scheduler would run it, and starts
from an earlier stage's export by path. A stage whose ``<out>/<name>/final/`` exists is skipped if it would
run with the settings it was trained with (its saved ``config.yaml``; :func:`config_changes` says what is
compared). If they differ, the pipeline stops before running anything, with status 2 and one line naming
each changed key, so that a report never describes an export trained otherwise than its command says;
``--rerun-changed`` trains such a stage again from scratch, and every stage trained from its export, their
old run directories renamed ``<stage>.replaced-<UTC time>`` (never deleted). An interrupted stage (no
``final/`` yet) resumes from its last checkpoint (``trainer.resume=auto``), so rerunning the same command
continues where it stopped. Then every export is probed and the report written: ``<out>/report.json``
(everything) and ``<out>/report.md`` (one table row per stage, then the stages side by side and the plots):
``<out>/side_by_side.json`` holds every answering export's greedy answers to the same few held-out prompts
(:mod:`llmsys.eval.side_by_side`; ``pipeline.side_by_side_prompts`` of the recipe), ``<out>/plots/*.png``
the curves and probes as pictures (:mod:`llmsys.eval.plots`).

    python -m llmsys.pipeline                                  # pretrain -> sft -> reward -> dpo, ppo
    python -m llmsys.pipeline --out runs/x --steps-scale 0.2   # a quick look
    python -m llmsys.pipeline --stages pretrain,sft model.dim=128 trainer.precision=bf16
    python -m llmsys.pipeline --rerun-changed sft:optim.lr=3e-4    # retrain sft and the stages after it

Extending: add a stage to the recipe (its ``inputs`` name the exports it starts from) or write a new
recipe next to it and, for a new behaviour to measure, a function to ``PROBES`` (and its name to
``PIPELINE_PROBES`` in the schema).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import html
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmsys.config.schema import ConfigError, PipelineConfig, PipelineStageConfig

log = logging.getLogger("llmsys.pipeline")

DEFAULT_RECIPE = "pipeline"
SIDE_BY_SIDE_FILE = "side_by_side.json"
# report.md shows at most this many side-by-side prompts (side_by_side.json has all of them).
REPORT_SIDE_BY_SIDE_PROMPTS = 8


def final(out: Path, stage: str) -> Path:
    """The export of ``stage`` in pipeline directory ``out``."""
    return out / stage / "final"


@functools.cache
def load_recipe(name: str) -> PipelineConfig:
    """The validated ``pipeline`` section of ``configs/experiment/<name>.yaml``.

    The recipe is composed by Hydra like any experiment (``llmsys.train experiment=<name>`` composes it
    too); only its ``pipeline`` section is read here, and every stage override and input key is checked
    against the training schema, so a typo fails before the first stage starts.
    """
    from omegaconf import OmegaConf

    from llmsys.config import config_dir, unknown_override_error

    recipes = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
    if name not in recipes:
        raise ConfigError(f"--recipe {name}: no configs/experiment/{name}.yaml; recipes: {', '.join(recipes)}")
    node = _compose([f"experiment={name}"]).pipeline
    if node is None:
        raise ConfigError(f"--recipe {name}: configs/experiment/{name}.yaml has no pipeline section (it is a "
                          f"training recipe: python -m llmsys.train experiment={name})")
    recipe = OmegaConf.to_object(node)
    for stage in recipe.stages:
        error = unknown_override_error([*stage.overrides, *stage_inputs(stage, Path("."))])
        if error:
            raise ConfigError(f"configs/experiment/{name}.yaml, stage {stage.name}: {error}")
    return recipe


def __getattr__(name: str) -> Any:
    # STAGES (name -> stage) and DEFAULT_STAGES (their order): the default recipe's, read on first use so
    # that importing this module composes nothing.
    if name == "STAGES":
        return load_recipe(DEFAULT_RECIPE).by_name()
    if name == "DEFAULT_STAGES":
        return tuple(stage.name for stage in load_recipe(DEFAULT_RECIPE).stages)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- probes ----------------------------------------------------------------------------------------


class ProbeContext:
    """What probes share across stages, so that every export is asked the same questions."""

    def __init__(self, stages: Mapping[str, PipelineStageConfig], extra_overrides: Sequence[str], n_prompts: int,
                 device: str, max_new_tokens: int) -> None:
        self.stages = stages
        self.extra_overrides = list(extra_overrides)
        self.n_prompts = n_prompts
        self.device = device
        self.max_new_tokens = max_new_tokens
        self._prompts: dict[Any, Any] = {}
        self.probing = ""  # the stage whose export is being probed

    def chat_data(self):
        """The SFT stage's data config (``data=chat`` plus the pipeline's and the user's overrides)."""
        return compose_config(["stage=sft", *self.stages["sft"].overrides,
                               *for_stage("sft", self.extra_overrides)]).data

    def stage_data(self, name: str):
        """The data config stage ``name`` trains on (its recipe overrides plus the user's)."""
        stage = self.stages[name]
        inputs = [f"{key}=unused" for key in stage.inputs]  # only the data part is read
        return compose_config([f"stage={name}", *stage.overrides, *inputs, *for_stage(name, self.extra_overrides)]).data

    def held_out_prompts(self, tokenizer):
        from llmsys.eval.probes import held_out_prompts

        key = tokenizer.fingerprint
        if key not in self._prompts:
            self._prompts[key] = held_out_prompts(self.chat_data(), tokenizer, self.n_prompts)
        return self._prompts[key]


def probe_exact_answer(export: Path, ctx: ProbeContext) -> dict:
    """Greedy answers to the held-out problems of the probed stage's verifiable task (rows with an ``answer``,
    e.g. ``data=arith``): the exact-answer accuracy."""
    from llmsys.data.prompts import load_prompts
    from llmsys.eval.probes import exact_answer_probe, load_export

    model, tokenizer = load_export(export, ctx.device)
    data = ctx.stage_data(ctx.probing)
    key = (tokenizer.fingerprint, data.path)
    if key not in ctx._prompts:
        prompts = load_prompts(data, tokenizer)
        n = min(ctx.n_prompts * 4, len(prompts.val))  # short answers: a larger sample costs little
        if not prompts.val or "answer" not in prompts.val_meta[0]:
            raise SystemExit(f"llmsys.pipeline: the exact_answer probe of stage {ctx.probing} needs held-out rows "
                             f"with an answer (data={data.name} has none)")
        ctx._prompts[key] = (prompts.val[:n], prompts.val_meta[:n], prompts.val_texts[:n])
    ids, meta, texts = ctx._prompts[key]
    return exact_answer_probe(model, tokenizer, ids, meta, texts, max_new_tokens=ctx.max_new_tokens,
                              chat_template=data.chat_template, samples=3)


def probe_format_stop(export: Path, ctx: ProbeContext) -> dict:
    """Greedy answers to held-out chat prompts: how often well-formed and stopped at ``<|im_end|>``."""
    from llmsys.eval.probes import format_stop_probe, load_export

    model, tokenizer = load_export(export, ctx.device)
    return format_stop_probe(model, tokenizer, ctx.held_out_prompts(tokenizer),
                             max_new_tokens=ctx.max_new_tokens, samples=3)


PROBES: dict[str, Callable[[Path, ProbeContext], dict]] = {
    "format_stop": probe_format_stop,
    "exact_answer": probe_exact_answer,
}


# -- stages side by side ---------------------------------------------------------------------------


def compare_stages(out: Path, names: Sequence[str], n_prompts: int, ctx: ProbeContext) -> tuple[dict | None, str]:
    """Every answering export of ``names`` (reward models do not answer) on the same ``n_prompts`` held-out
    prompts (:func:`llmsys.eval.side_by_side.side_by_side`), or None and why not.

    A recipe with the exact_answer probe compares on the first held-out problems of its first such stage's
    data, scored by the exact answer; otherwise on the first held-out chat prompts of the format/stop probe
    (the SFT validation split), scored by the rule annotator.
    """
    from llmsys.data import load_prompts, load_tokenizer
    from llmsys.eval.probes import held_out_prompts
    from llmsys.eval.side_by_side import side_by_side
    from llmsys.models.heads import is_scalar_export

    if n_prompts == 0:
        return None, "pipeline.side_by_side_prompts is 0 in the recipe"
    answering = [name for name in names if not is_scalar_export(final(out, name))]
    if not answering:
        return None, f"no stage of this run answers prompts ({', '.join(names)}: reward models only)"
    tokenizer = load_tokenizer(final(out, answering[0]))
    verifiable = [name for name in names if "exact_answer" in ctx.stages[name].probes]
    metadata = None
    if verifiable:
        data = ctx.stage_data(verifiable[0])
        held_out = load_prompts(data, tokenizer)
        prompts, metadata = held_out.val_messages[:n_prompts], held_out.val_meta[:n_prompts]
        if not prompts:
            return None, f"stage {verifiable[0]}'s data ({data.name}) holds out no prompt"
    elif "sft" in ctx.stages:
        data = ctx.chat_data()
        prompts = held_out_prompts(data, tokenizer, n_prompts)
    else:
        return None, ("the recipe has no sft stage (whose held-out chat prompts the stages answer) and no "
                      "exact_answer probe (whose held-out problems they answer)")
    comparison = side_by_side({name: final(out, name) for name in answering}, prompts, metadata=metadata,
                              max_new_tokens=ctx.max_new_tokens, chat_template=data.chat_template,
                              device=ctx.device)
    return comparison, ""


# -- running stages --------------------------------------------------------------------------------


def _compose(overrides: Sequence[str]):
    """The composed (unresolved, unconverted) tree of ``configs/config.yaml`` with ``overrides``."""
    from hydra import compose, initialize_config_dir

    from llmsys.config import config_dir, register

    register()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def compose_config(overrides: Sequence[str]):
    """The validated :class:`~llmsys.config.Config` that ``llmsys.train`` would run with ``overrides``."""
    from llmsys.config import to_config

    return to_config(_compose(overrides))


def for_stage(name: str, extra: Sequence[str]) -> list[str]:
    """The overrides of ``extra`` that apply to stage ``name``: plain ones, and ``<name>:key=value`` ones."""
    picked = []
    for override in extra:
        scope, sep, rest = override.partition(":")
        if not sep or "=" in scope:
            picked.append(override)
        elif scope == name:
            picked.append(rest)
    return picked


def stage_inputs(stage: PipelineStageConfig, out: Path) -> list[str]:
    """The overrides that point ``stage`` at the earlier exports it reads, in the recipe's order."""
    return [f"{key}={final(out, source)}" for key, source in stage.inputs.items()]


def stage_overrides(stage: PipelineStageConfig, out: Path, steps_scale: float, extra: Sequence[str]) -> list[str]:
    """The ``llmsys.train`` overrides that run ``stage`` in pipeline directory ``out`` (later ones win)."""
    steps = max(1, math.ceil(stage.steps * steps_scale))
    return [f"stage={stage.name}", f"trainer.output_dir={out / stage.name}", f"trainer.max_steps={steps}",
            "trainer.resume=auto", *stage.overrides, *stage_inputs(stage, out), *for_stage(stage.name, extra)]


def stage_command(stage: PipelineStageConfig, out: Path, steps_scale: float, extra: Sequence[str],
                  nproc: int) -> list[str]:
    from llmsys.distributed.env import free_port

    overrides = stage_overrides(stage, out, steps_scale, extra)
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), "-m", "llmsys.train", *overrides]
    return [sys.executable, "-m", "llmsys.train", *overrides]


def run_stage(stage: PipelineStageConfig, out: Path, steps_scale: float, extra: Sequence[str],
              nproc: int) -> float | None:
    """Train ``stage`` unless its export exists (:func:`replace_changed` has moved a changed one aside); the
    seconds it took (None when skipped)."""
    if (final(out, stage.name) / "config.json").is_file():
        log.info("%s: %s exists, skipping (trained with the same settings)", stage.name, final(out, stage.name))
        return None
    missing = [str(final(out, source)) for source in stage.inputs.values() if not final(out, source).exists()]
    if missing:
        raise SystemExit(f"llmsys.pipeline: stage {stage.name} needs {', '.join(missing)}; run the stages that "
                         f"produce it first (--stages)")
    cmd = stage_command(stage, out, steps_scale, extra, nproc)
    log.info("%s: %s", stage.name, " ".join(cmd))
    started = time.perf_counter()
    returncode = _run_forwarding_signals(cmd)
    if returncode != 0:
        raise SystemExit(f"llmsys.pipeline: stage {stage.name} failed (exit {returncode}); rerun the same "
                         f"command to resume it")
    if not (final(out, stage.name) / "config.json").is_file():  # stopped by a signal, with a checkpoint
        log.warning("%s: stopped before the end, with a checkpoint in %s; rerun the same command to resume "
                    "it (no report written)", stage.name, out / stage.name / "checkpoints")
        raise SystemExit(0)
    return time.perf_counter() - started


def _run_forwarding_signals(cmd: list[str]) -> int:
    """Run a stage and wait for it. SIGTERM, SIGUSR1 and SIGINT sent to the pipeline are passed on to the
    stage (which checkpoints and exits, see ``llmsys.train``) instead of ending the pipeline under it."""
    proc = subprocess.Popen(cmd)

    def forward(signum: int, frame: Any) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- finished stages: the settings they were trained with ------------------------------------------

RUN_CONFIG = "config.yaml"  # the resolved config each run saves (llmsys.trainers.observe.write_run_config)

# Settings that do not change what a stage computes, left out when a finished stage's saved config is
# compared with the one it would run with now: a section name covers all of its keys.
RESULT_NEUTRAL_KEYS = (
    "logger",                     # progress bar and W&B: what is shown of a run, not what it trains
    "trainer.output_dir",         # where the run is, i.e. where its saved config was found
    "trainer.resume",             # how an interrupted run continues; the pipeline always passes auto
    "trainer.save_every",         # checkpoints are for resuming: how often and how many are kept leaves
    "trainer.keep_checkpoints",   #   the weights and the metrics as they are
    "trainer.peak_tflops",        # only the denominator of the MFU the metrics show
    "deepspeed.timeout_minutes",  # how long a collective waits for a stuck rank
    "data.num_proc",              # how and where the token cache is built: the cache key leaves both
    "data.cache_dir",             #   out (llmsys.data), the tokens are the same
)
# The refusal shows at most this many changed keys per stage, each value cut to about this many characters.
SHOWN_CHANGES = 6
SHOWN_CHARS = 60
REPLACED = "replaced"  # a replaced run directory <stage> is kept as <stage>.replaced-<UTC time>

Change = tuple[str, Any, Any]  # (key, saved value, value now)
_ABSENT = object()


def _neutral(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESULT_NEUTRAL_KEYS)


def read_saved_config(path: Path) -> dict:
    """The resolved config a run saved at ``path`` (plain YAML, read with ``yaml.safe_load``: nothing in it
    can construct objects); ValueError saying what is wrong with the file."""
    import yaml

    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError("missing") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"unreadable ({' '.join(str(err).split())})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("trainer"), dict):
        raise ValueError(f"expected the config sections (stage, model, ..., trainer, ...) of a run, got "
                         f"{type(saved).__name__}")
    return saved


def _leaves(node: Any, now: Mapping, saved: Mapping, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(key, saved value or _ABSENT, value now) for every setting of the config dataclass ``node``, whose
    plain form is ``now``; free-form values (lists, ``deepspeed.extra``), and a section the saved config
    holds as something else than a mapping, are compared whole."""
    for f in dataclasses.fields(node):
        key, value = prefix + f.name, getattr(node, f.name)
        old = saved.get(f.name, _ABSENT)
        if dataclasses.is_dataclass(value) and (old is _ABSENT or isinstance(old, Mapping)):
            yield from _leaves(value, now[f.name], {} if old is _ABSENT else old, key + ".")
        else:
            yield key, old, now[f.name]


def config_changes(saved: Mapping, current: Any, out: Path) -> list[Change]:
    """The settings in which ``current`` (the :class:`~llmsys.config.Config` a stage of pipeline directory
    ``out`` would run with now) differs from ``saved`` (what the finished run saved), in schema order.

    Paths under the pipeline directory the run was trained in (the parent of its saved
    ``trainer.output_dir``) are compared relative to it, so that a moved or copied pipeline directory
    still matches. Left out: :data:`RESULT_NEUTRAL_KEYS`, and settings the saved config lacks (added to
    llmsys after the run; a new setting defaults to the behaviour from before it existed).
    """
    import yaml

    from llmsys.config import to_yaml

    output_dir = saved["trainer"].get("output_dir")
    trained_in = str(Path(output_dir).parent) if isinstance(output_dir, str) and os.path.isabs(output_dir) else ""

    def relocated(value: Any) -> Any:
        if trained_in and isinstance(value, str) and (value == trained_in or value.startswith(trained_in + os.sep)):
            return str(out) + value[len(trained_in):]
        return value

    now = yaml.safe_load(to_yaml(current))
    return [(key, relocated(old), new) for key, old, new in _leaves(current, now, saved)
            if old is not _ABSENT and not _neutral(key) and relocated(old) != new]


def _show(value: Any) -> str:
    """``value`` on one short line: plain strings as they are, everything else as JSON; long ones cut."""
    text = value if isinstance(value, str) and value and value.isprintable() else json.dumps(value)
    if len(text) <= SHOWN_CHARS:
        return text
    if isinstance(value, (list, dict)):
        return f"{text[:SHOWN_CHARS]}… ({len(value)} items)"
    half = SHOWN_CHARS // 2  # paths differ at either end
    return f"{text[:half]}…{text[-half:]}"


def describe_changes(changes: Sequence[Change]) -> str:
    shown = [f"{key} {_show(old)} -> {_show(new)}" for key, old, new in changes[:SHOWN_CHANGES]]
    if len(changes) > SHOWN_CHANGES:
        shown.append(f"and {len(changes) - SHOWN_CHANGES} more")
    return ", ".join(shown)


def _refuse(message: str) -> None:
    """Stop with ``message`` on one line and status 2 (a usage error, as the training entry point's)."""
    print(f"llmsys.pipeline: {message}", file=sys.stderr)
    raise SystemExit(2)


def changed_stages(stages: Mapping[str, PipelineStageConfig], names: Sequence[str], out: Path,
                   steps_scale: float, extra: Sequence[str]) -> dict[str, list[Change]]:
    """The finished stages of ``names`` (``final/`` exists) that would now run with other settings than they
    were trained with, and how those differ; refuses (status 2) a finished stage without a readable saved
    config, since whether its export still fits cannot be told."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    changed = {}
    for name in names:
        if not (final(out, name) / "config.json").is_file():
            continue
        path = out / name / RUN_CONFIG
        try:
            saved = read_saved_config(path)
        except ValueError as err:
            _refuse(f"stage {name}: {path}: {err}, so whether {final(out, name)} was trained with the settings "
                    f"the stage would run with now cannot be checked; restore the file, or move {out / name} "
                    f"aside to train the stage again")
        try:
            current = compose_config(stage_overrides(stages[name], out, steps_scale, extra))
        except (ConfigError, HydraException, OmegaConfBaseException) as err:
            causes = [str(e) for e in (err, err.__cause__) if e is not None]
            _refuse(f"stage {name}: {'; '.join(' '.join(text.split()) for text in causes)}")
        changes = config_changes(saved, current, out)
        if changes:
            changed[name] = changes
    return changed


def consumers(stages: Mapping[str, PipelineStageConfig], names: Collection[str]) -> list[str]:
    """The stages of the recipe that start, directly or through other stages, from an export of ``names``."""
    tainted, found = set(names), []
    for stage in stages.values():  # recipe order: a stage's inputs come before it
        if stage.name not in tainted and tainted & set(stage.inputs.values()):
            tainted.add(stage.name)
            found.append(stage.name)
    return found


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to an unused ``<name>.replaced-<UTC time>`` beside it (nothing is deleted)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = run_dir.with_name(f"{run_dir.name}.{REPLACED}-{stamp}"), 2
    while target.exists():
        target, n = run_dir.with_name(f"{run_dir.name}.{REPLACED}-{stamp}-{n}"), n + 1
    run_dir.rename(target)
    return target


def replace_changed(stages: Mapping[str, PipelineStageConfig], selected: Sequence[str], out: Path,
                    changed: Mapping[str, list[Change]], rerun: bool) -> None:
    """Refuse (status 2, nothing run, nothing written) to go on past finished stages whose settings changed,
    or, with ``rerun`` (``--rerun-changed``), move their run directories aside, and those of every stage
    trained from their exports, so that they train again from scratch."""
    if not changed:
        return
    after = consumers(stages, changed)
    if not rerun:
        one = len(changed) == 1
        listed = "; ".join(f"{name}: {describe_changes(changes)}" for name, changes in changed.items())
        trained = [name for name in after if name in selected]
        aside = [name for name in after if name not in selected and (out / name).exists()]
        then = f" and then {', '.join(trained)}" if trained else ""
        also = (f"; {', '.join(aside)}, also trained from {'its' if one else 'their'} export{'' if one else 's'} "
                f"but not in --stages, would only be moved aside") if aside else ""
        _refuse(f"finished stage{'' if one else 's'} {', '.join(changed)} would now run with other settings than "
                f"{'its' if one else 'their'} {out}/<stage>/{RUN_CONFIG} records: {listed}; nothing was run and "
                f"the report is unchanged. Rerun with --rerun-changed to train {', '.join(changed)}{then} again "
                f"from scratch, each old run directory kept as <stage>.{REPLACED}-<UTC time>{also}")
    for name in stages:
        run_dir = out / name
        if (name in changed or name in after) and run_dir.exists():
            why = (f"settings changed ({describe_changes(changed[name])})" if name in changed else
                   "trained from an export that is being replaced")
            later = "" if name in selected else f"; it trains again when --stages includes {name}"
            log.info("%s: %s, moved to %s%s", name, why, move_aside(run_dir), later)


# -- the report ------------------------------------------------------------------------------------


def stage_metrics(run_dir: Path) -> dict:
    """First and last train loss and validation loss of a run, from its ``metrics.jsonl``."""
    rows = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            rows.append(json.loads(line))
    def first_last(key: str) -> tuple[Any, Any]:
        values = [r[key] for r in rows if key in r]
        return (values[0], values[-1]) if values else (None, None)

    meta = json.loads((run_dir / "final" / "config.json").read_text())
    result: dict = {"steps": meta.get("step")}
    # Every stage's losses; the reward model's and DPO's validation accuracy; PPO's reward and KL curves.
    for key in ("loss", "val_loss", "val_accuracy", "val_reward_accuracy", "val_reward_margin", "reward_mean",
                "kl", "annotator_score", "logprob_diff_mean"):
        first, last = first_last(key)
        name = "train_loss" if key == "loss" else key
        if last is not None:
            result[f"{name}_first"], result[name] = first, last
    result.setdefault("train_loss_first", None)
    result.setdefault("train_loss", None)
    result.setdefault("val_loss_first", None)
    result.setdefault("val_loss", None)
    return result


def _stage_effect(m: dict) -> str:
    """The stage's own training signal, first -> last, for the report table."""
    for key, label in (("val_accuracy", "val accuracy"), ("val_reward_accuracy", "val reward accuracy"),
                       ("reward_mean", "reward")):
        if m.get(key) is not None:
            text = f"{label} {_fmt(m[key + '_first'], 2)} → {_fmt(m[key], 2)}"
            if key == "reward_mean":
                text += f", KL {_fmt(m['kl'], 2)}"
            return text
    return "–"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# Inline markdown that model output could trigger (emphasis, code, links, tables, strikethrough, math); a
# backslash makes each a literal character. Block syntax (#, -, >) cannot start inside a table cell or a
# line that begins with our own text.
_MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]|~$])")
_LINE_BREAKS = re.compile("\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def md_text(text: str) -> str:
    """Model output as literal text on one markdown line (a table cell): markdown escaped, HTML turned into
    entities (``<script>`` shows as text), line breaks as ``<br>``, other control characters as U+FFFD."""
    lines = [html.escape(_MARKDOWN_INLINE.sub(r"\\\1", _CONTROL.sub("\ufffd", line)), quote=False)
             for line in _LINE_BREAKS.split(text)]
    return "<br>".join(lines)


def side_by_side_lines(comparison: dict) -> list[str]:
    """The report's "Stages side by side" section: per prompt, a table of every stage's answer."""
    exact = comparison["score_name"] == "exact_answer"
    score = "exact answer (1 right, 0 wrong)" if exact else "the rule annotator's score"
    prompts = comparison["prompts"]
    shown = prompts[:REPORT_SIDE_BY_SIDE_PROMPTS]
    lines = ["", "## Stages side by side", "",
             (f"The same {len(prompts)} held-out prompts answered by every stage's export (greedy, at most "
              f"{comparison['max_new_tokens']} tokens; the end-of-turn token is counted, not shown); score: {score}. "
              f"All answers: `{SIDE_BY_SIDE_FILE}`"
              + (f" (the first {len(shown)} prompts are shown here)." if len(shown) < len(prompts) else "."))]
    for i, prompt in enumerate(shown):
        lines += ["", f"**{i + 1}.** {md_text(prompt)}", "",
                  "| stage | answer | tokens | stops | well-formed | score |", "|---|---|---:|:---:|:---:|---:|"]
        for stage in comparison["stages"]:
            a = comparison["answers"][stage][i]
            answer = md_text(a["response"]) if a["response"].strip() else "*(empty)*"
            lines.append(f"| {stage} | {answer} | {a['tokens']} | {'yes' if a['stopped'] else 'no'} | "
                         f"{'yes' if a['format_ok'] else 'no'} | {_fmt(a['score'], 2)} |")
    return lines


def plot_lines(plots: dict) -> list[str]:
    """The report's "Plots" section: each figure as an image (relative link), or why it was left out."""
    lines = ["", "## Plots", ""]
    for entry in plots.values():
        if "file" in entry:
            lines += [f"![{entry['title']}]({entry['file']})", ""]
        else:
            lines += [f"- {entry['title']}: left out, {entry['omitted']}.", ""]
    return lines[:-1]


def write_report(out: Path, report: dict, comparison: dict | None = None) -> None:
    """``<out>/report.json`` (``report``) and ``<out>/report.md``: the stage table, the probes' examples, the
    stages side by side (``comparison``, the side-by-side file's object) and the plots (``report["plots"]``)."""
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    lines = [
        "# Stage report", "",
        f"`{report['command']}`", "",
        ("| stage | steps | seconds | train loss (first → last) | val loss (first → last) | stage signal | "
         "stops at <\\|im_end\\|> | well-formed | both | mean answer tokens | annotator score | "
         "held-out exact answers |"),
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in report["stages"].items():
        m, fs = entry["metrics"], entry["probes"].get("format_stop", {})
        ea = entry["probes"].get("exact_answer", {})
        lines.append(
            f"| {name} | {_fmt(m['steps'])} | {_fmt(entry['seconds'], 0)} | "
            f"{_fmt(m['train_loss_first'])} → {_fmt(m['train_loss'])} | {_fmt(m['val_loss_first'])} → "
            f"{_fmt(m['val_loss'])} | {_stage_effect(m)} | {_fmt(fs.get('stopped'), 2)} | "
            f"{_fmt(fs.get('well_formed'), 2)} | {_fmt(fs.get('both'), 2)} | {_fmt(fs.get('mean_length'), 1)} | "
            f"{_fmt(fs.get('annotator_score'), 2)} | {_fmt(ea.get('accuracy'), 3)} |")
    probed = [(name, e["probes"]["format_stop"]) for name, e in report["stages"].items()
              if "format_stop" in e["probes"]]
    samples = [(name, s) for name, fs in probed for s in fs.get("samples", [])]
    if probed:
        lines += ["", (f"Format/stop: greedy answers (at most {report['max_new_tokens']} tokens) to the same "
                       f"{probed[0][1]['n']} held-out prompts of the SFT validation split. Examples:"), ""]
        lines += [f"- **{name}** — {md_text(repr(s['prompt']))} → {md_text(repr(s['answer']))}"
                  for name, s in samples]
    checked = [(name, e["probes"]["exact_answer"]) for name, e in report["stages"].items()
               if "exact_answer" in e["probes"]]
    if checked:
        lines += ["", (f"Exact answers: greedy answers to the same {checked[0][1]['n']} held-out problems of the "
                       f"verifiable task (no stage trained on them). Examples:"), ""]
        lines += [f"- **{name}** — {md_text(repr(s['prompt']))} → {md_text(repr(s['answer']))} (expected "
                  f"{md_text(s['expected'])})" for name, ea in checked for s in ea.get("samples", [])]
    side = report.get("side_by_side", {})
    if comparison is not None:
        lines += side_by_side_lines(comparison)
    elif side.get("omitted"):
        lines += ["", "## Stages side by side", "", f"Left out: {side['omitted']}."]
    if report.get("plots"):
        lines += plot_lines(report["plots"])
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=DEFAULT_RECIPE)
    recipe_name = pre.parse_known_args(argv)[0].recipe
    parser = argparse.ArgumentParser(
        prog="python -m llmsys.pipeline", description=__doc__.split("\n\n")[0],
        epilog="Other arguments are Hydra overrides for every stage (model.dim=128), or for one stage when "
               "prefixed with its name (sft:optim.lr=3e-4, sft:trainer.max_steps=500).")
    try:
        stages = load_recipe(recipe_name).by_name()
    except ConfigError as e:
        parser.error(str(e))
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help=f"the stages to run: configs/experiment/RECIPE.yaml ({DEFAULT_RECIPE})")
    parser.add_argument("--out", type=Path, default=None, help="pipeline directory (outputs/RECIPE)")
    parser.add_argument("--stages", default=",".join(stages),
                        help=f"comma-separated, in order; known: {', '.join(stages)} (default: all, in order)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count")
    parser.add_argument("--nproc", type=int, default=1, help="processes per stage (torchrun when > 1)")
    parser.add_argument("--probe-prompts", type=int, default=100, help="held-out prompts per probe")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit of the probes")
    parser.add_argument("--device", default=None, help="where probes run (default: cuda if available, else cpu)")
    parser.add_argument("--rerun-changed", action="store_true",
                        help="train a finished stage again when it would now run with other settings than its "
                             "saved config.yaml (and every stage trained from it), its old run directory kept "
                             "as STAGE.replaced-TIME; without it such a stage stops the pipeline (status 2)")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    chosen = [s for s in args.stages.split(",") if s]
    bad = [s for s in chosen if s not in stages]
    if bad or not chosen:
        parser.error(f"--stages: unknown {', '.join(bad) or '(none given)'}; known: {', '.join(stages)}")
    scopes = {o.partition(":")[0] for o in rest if ":" in o.partition("=")[0]}
    if scopes - set(stages):
        parser.error(f"override prefix {', '.join(sorted(scopes - set(stages)))}: not a stage; known: "
                     f"{', '.join(stages)}")
    if args.steps_scale <= 0 or args.nproc < 1 or args.probe_prompts < 1 or args.max_new_tokens < 1:
        parser.error("--steps-scale, --nproc, --probe-prompts and --max-new-tokens must be positive")
    args.stages = chosen
    args.out = args.out if args.out is not None else Path("outputs") / args.recipe
    return args, rest


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    recipe = load_recipe(args.recipe)
    stages = recipe.by_name()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    from llmsys.config import unknown_override_error

    error = next(filter(None, (unknown_override_error(for_stage(name, extra)) for name in args.stages)), None)
    if error:
        raise SystemExit(f"llmsys.pipeline: {error}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    previous = {}
    if (out / "report.json").is_file():
        previous = json.loads((out / "report.json").read_text()).get("stages", {})

    changed = changed_stages(stages, args.stages, out, args.steps_scale, extra)
    replace_changed(stages, args.stages, out, changed, args.rerun_changed)
    seconds = {}
    for name in args.stages:
        took = run_stage(stages[name], out, args.steps_scale, extra, args.nproc)
        seconds[name] = took if took is not None else previous.get(name, {}).get("seconds")

    ctx = ProbeContext(stages, extra, args.probe_prompts, device, args.max_new_tokens)
    report: dict = {"command": " ".join(["python -m llmsys.pipeline", *argv]), "out": str(out),
                    "max_new_tokens": args.max_new_tokens, "stages": {}}
    for name in args.stages:
        stage = stages[name]
        probes = {}
        for probe in stage.probes:
            started = time.perf_counter()
            ctx.probing = name
            probes[probe] = PROBES[probe](final(out, name), ctx)
            log.info("%s: probe %s (%.0f s): %s", name, probe, time.perf_counter() - started,
                     {k: v for k, v in probes[probe].items() if k != "samples"})
        report["stages"][name] = {"seconds": seconds[name], "export": str(final(out, name)),
                                  "metrics": stage_metrics(out / name), "probes": probes}
    started = time.perf_counter()
    comparison, why_not = compare_stages(out, args.stages, recipe.side_by_side_prompts, ctx)
    if comparison is not None:
        write_text_atomic(out / SIDE_BY_SIDE_FILE, json.dumps(comparison, indent=1, ensure_ascii=False) + "\n")
        report["side_by_side"] = {"file": SIDE_BY_SIDE_FILE}
        log.info("side by side (%.0f s): %s", time.perf_counter() - started, out / SIDE_BY_SIDE_FILE)
    else:
        (out / SIDE_BY_SIDE_FILE).unlink(missing_ok=True)  # an earlier run's would no longer match the report
        report["side_by_side"] = {"omitted": why_not}
    from llmsys.eval.plots import write_plots

    report["plots"] = write_plots(out, report)
    write_report(out, report, comparison)
    log.info("report: %s and %s", out / "report.json", out / "report.md")
    return report


if __name__ == "__main__":
    main()
