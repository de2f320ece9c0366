"""Content-addressed cache directories that appear atomically.

Tokenizers and packed token files are expensive to build and are shared by every rank, every run
and every stage that reads the same corpus. Each artefact lives in ``<root>/<kind>/<key>/`` where
``key`` hashes everything its contents depend on, so a changed input gets a new directory instead
of silently reusing stale data.

A directory is built under a temporary sibling name and renamed into place with ``os.replace``
only when complete: a crash mid-build leaves a ``.tmp-`` directory that is never mistaken for a
result, and is removed by the next build on the same host once its process is gone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, Optional

from llmsys.paths import data_home
from llmsys.config.schema import DataConfig

logger = logging.getLogger(__name__)

_TEMP_MARKER = ".tmp-"


def data_cache_root(cfg: DataConfig) -> Path:
    """Where tokenizers and packed data are cached: ``data.cache_dir``, else ``$LLMSYS_HOME/data``."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return data_home()


def stable_hash(*parts: object) -> str:
    """A short hex digest of JSON-serialisable parts, stable across processes and machines."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def _host_tag() -> str:
    # The host is part of the temp name so that a build on another node sharing this filesystem is
    # never taken for a crashed local one (its pid means nothing here).
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _temp_dir_for(final: Path) -> Path:
    return final.with_name(f"{final.name}{_TEMP_MARKER}{_host_tag()}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_dirs(final: Path) -> None:
    """Delete temp build dirs of ``final`` left by processes on this host that no longer run."""
    if not final.parent.is_dir():
        return
    prefix = f"{final.name}{_TEMP_MARKER}{_host_tag()}-"
    for candidate in final.parent.iterdir():
        if not candidate.name.startswith(prefix):
            continue
        pid_text = candidate.name[len(prefix):]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid != os.getpid() and _pid_alive(pid):
            continue  # a concurrent build in progress
        logger.info("Removing stale temporary build directory %s", candidate)
        shutil.rmtree(candidate, ignore_errors=True)


def build_once(final: Path, is_complete: Callable[[Path], bool], build: Callable[[Path], object]) -> bool:
    """Make sure ``final`` holds a complete artefact; return True if this call built it.

    ``build(tmp)`` fills an empty temporary directory; ``is_complete(dir)`` tells a finished
    directory from a damaged one (which is deleted and rebuilt, never reused).
    """
    remove_stale_temp_dirs(final)
    if final.is_dir() and is_complete(final):
        return False
    if final.exists():
        logger.warning("Cache directory %s is incomplete or from another format; rebuilding it", final)
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir_for(final)
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same key first: its result is equivalent to ours.
            if final.is_dir() and is_complete(final):
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def build_keyed(final: Path, key: str, read: Callable[[Path], Optional[dict]],
                build: Callable[[Path], object]) -> tuple[dict, bool]:
    """:func:`build_once` for an artefact whose manifest records its ``key``; return ``(manifest, built)``.

    ``read(dir)`` is the manifest of a complete directory, else None; a directory is reused only
    when that manifest's ``key`` is ``key``. ``build(tmp)`` fills a temporary directory.
    """
    built = build_once(final, is_complete=lambda directory: (read(directory) or {}).get("key") == key,
                       build=build)
    manifest = read(final)
    assert manifest is not None, f"{final} was just published without a valid manifest"
    return manifest, built


def publish_link(link: Path, target: Path) -> None:
    """Point the symbolic link ``link`` at ``target`` (by a relative path); nothing to do when it already does.

    For a fixed name in front of keyed directories (a generated corpus): the new link is made under a
    temporary name and renamed over the old one, so a reader finds either target, never no file.
    """
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == relative:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_dir_for(link)  # the temp-name scheme of build_once (a link here, not a directory)
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(relative, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_manifest(directory: Path, name: str, manifest: dict) -> None:
    """Write ``manifest`` as JSON to ``directory/name``.

    Call it last: a directory without a valid manifest is never reused.
    """
    (directory / name).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(cache_dir: Path, name: str, format_version: int) -> Optional[dict]:
    """The JSON manifest ``cache_dir/name`` if it parses and is of ``format_version``, else None.

    Callers add their own completeness checks (file sizes); a None means "rebuild", never "reuse".
    """
    try:
        manifest = json.loads((cache_dir / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") != format_version:
        return None
    return manifest
