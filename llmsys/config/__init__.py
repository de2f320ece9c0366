"""Typed config: schemas, Hydra registration and conversion of the composed tree.

``register()`` stores the schema as the structured config ``llmsys_schema`` that ``configs/config.yaml``
names first in its defaults list, so every YAML group and every command-line override is checked
against the dataclasses in :mod:`llmsys.config.schema`.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from llmsys.config.schema import (  # noqa: F401  (re-exported)
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    DPOConfig,
    GRPOConfig,
    LoggerConfig,
    LoRAConfig,
    ModelConfig,
    OptimConfig,
    PPOConfig,
    RewardSourceConfig,
    StageConfig,
    TrainerConfig,
)
from llmsys.paths import corpus_path, packaged_model_dir
from llmsys.paths import llmsys_home  # noqa: F401  (re-exported: llmsys.config.llmsys_home)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _embedded_corpus(name: str) -> str:
    # Only a location: every rank converts its config, so a corpus generated here would be built by
    # every rank before any data is wanted. The data layer writes a generated corpus (prefs) when it
    # first reads it, on the ranks that prepare data (llmsys.data.embedded.prepare_generated_corpus).
    return str(corpus_path(name))


_registered = False


def register() -> None:
    """Register the structured schema and the ``llmsys.corpus`` and ``llmsys.model`` resolvers (idempotent)."""
    global _registered
    if _registered:
        return
    ConfigStore.instance().store(name="llmsys_schema", node=Config)
    OmegaConf.register_new_resolver("llmsys.corpus", _embedded_corpus, replace=True)
    OmegaConf.register_new_resolver("llmsys.model", lambda name: str(packaged_model_dir(name)), replace=True)
    _registered = True


def to_config(cfg: DictConfig) -> Config:
    """Resolve interpolations and build the validated dataclass tree (runs every ``__post_init__``)."""
    register()
    return OmegaConf.to_object(cfg)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_dir() -> Path:
    """The YAML tree: ``configs/`` of a source checkout, else the copy installed as ``llmsys/configs``."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "configs", package / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no configs/config.yaml next to {package}; reinstall llmsys")


def unknown_override_error(overrides: list[str]) -> str | None:
    """A message naming the first override whose key is not in the schema, with the valid keys listed.

    Hydra rejects such keys too, but names only the key; listing the alternatives turns a typo
    (``optim.lrr=1``) into a one-look fix. Group choices (``model=tiny``), ``+``/``~`` overrides and
    free-form dicts (``deepspeed.extra.*``) are left to Hydra.
    """
    import dataclasses
    import typing

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return None  # malformed: Hydra reports it with its own grammar error
    for override in parsed:
        key = override.key_or_group
        if override.is_add() or override.is_delete() or override.package or "." not in key:
            continue
        node: typing.Any = Config
        path = []
        for part in key.split("."):
            if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
                break  # below a dict/list/scalar field: Hydra checks the rest
            fields = {f.name: f for f in dataclasses.fields(node)}
            if part not in fields:
                where = ".".join(path) or "the top level"
                return (f"unknown config key '{key}': '{part}' is not a field of {where}. "
                        f"Valid keys of {where}: {', '.join(sorted(fields))}")
            path.append(part)
            node = typing.get_type_hints(node).get(part)
    return None


def composition_error(overrides: list[str]) -> str | None:
    """One line saying why Hydra cannot compose the config with ``overrides`` (a value of the wrong type,
    a group option that does not exist, a malformed override), or None when it composes.

    Hydra would report these itself, over several lines and with exit status 1; the entry points check
    first so that every config error reads the same way: one line, status 2."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import MissingConfigException, OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as err:
            return f"cannot parse the override {override!r}: {str(err).strip().splitlines()[0]}"
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            compose(config_name="config", overrides=list(overrides))
    except Exception as err:  # Hydra and OmegaConf raise many types; each is a config error here
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = err.__cause__
        if cause is not None and str(cause).strip():
            lines.append(str(cause).strip().splitlines()[0])
        options = getattr(err, "options", None) or getattr(cause, "options", None)
        message = ": ".join(dict.fromkeys(lines[:1] + lines[-1:] if cause is not None else lines[:1]))
        if isinstance(err, MissingConfigException) or options:
            message += f"; choose one of: {', '.join(options)}" if options else ""
        return message or type(err).__name__
    finally:
        GlobalHydra.instance().clear()
    return None
