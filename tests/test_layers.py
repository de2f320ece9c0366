"""Imports point one way: each llmsys package imports only from the layers below it, no module takes part in
an import cycle (function-local imports count too, so none can hide one), and no stage's trainer imports
another stage's. The order is the README's ("Layout") and ../shared/ARCHITECTURE.md's picture."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llmsys.config.schema import STAGES

PACKAGE = Path(__file__).resolve().parents[1] / "llmsys"

# Bottom to top. A module may import from its own layer's package and from any layer below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("paths",),  # where caches live; standard library only
    ("config",),  # typed schemas, Hydra registration
    ("kernels",),  # fused ops and their references (Triton, llmsys._C)
    ("models",),  # plain nn.Module code, checkpoint formats
    ("rlhf",),  # pure RL math and rollout parts, rule-based rewards
    ("data",),  # tokenizer, chat templates, caches, stage datasets, embedded corpora
    ("distributed",),  # the only door to DeepSpeed / torch.distributed
    ("eval",),  # probes, behaviour metrics
    ("trainers",),  # shared components and one module per stage
    ("train", "pipeline", "chat", "generate", "rank", "plan"),  # entry points and the apps on top of the exports
)
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}
SHARED_TRAINER_MODULES = {"lm", "components", "observe"}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The llmsys modules ``path`` imports anywhere (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from llmsys.data import sft` imports the submodule; `from llmsys.data import X` the package.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import llmsys.models.hf.x` -> the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {name: imported_modules(path, name, known) for name, path in files.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        here = layer(module)
        for target in targets:
            there = layer(target)
            if here is not None and (there is None or there > here):
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each once (Tarjan's strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def stage_to_stage_imports(graph: dict[str, set[str]]) -> list[str]:
    stages = {f"llmsys.trainers.{stage}" for stage in STAGES}
    return sorted(f"{m} -> {t}" for m, targets in graph.items() if m in stages for t in targets if t in stages)


GRAPH = import_graph(PACKAGE)


def test_every_package_has_a_layer():
    packages = {m.split(".")[1] for m in GRAPH if m.count(".") >= 1}
    assert packages <= set(LAYER_OF), f"give {sorted(packages - set(LAYER_OF))} a place in LAYERS"
    assert set(STAGES) - SHARED_TRAINER_MODULES <= {m.rpartition(".")[2] for m in GRAPH if ".trainers." in m}


def test_imports_point_down():
    assert upward_imports(GRAPH) == []


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_no_stage_imports_another_stage():
    assert stage_to_stage_imports(GRAPH) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    root = tmp_path / "llmsys"
    for name, text in {
        "__init__.py": "",
        "config/__init__.py": "from llmsys.data.embedded import corpus\n",  # upward
        "data/__init__.py": "",
        "data/embedded.py": "def corpus():\n    from llmsys.data import preference\n",  # lazy, in a cycle
        "data/preference.py": "from llmsys.data.embedded import corpus\n",
        "trainers/__init__.py": "",
        "trainers/dpo.py": "from llmsys.trainers.reward import load_pairs\n",  # stage -> stage
        "trainers/reward.py": "from . import lm\n",
        "trainers/lm.py": "",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert upward_imports(graph) == ["llmsys.config -> llmsys.data.embedded"]
    assert cycles(graph) == [["llmsys.data.embedded", "llmsys.data.preference"]]
    assert stage_to_stage_imports(graph) == ["llmsys.trainers.dpo -> llmsys.trainers.reward"]
    assert graph["llmsys.trainers.reward"] == {"llmsys.trainers.lm"}


@pytest.mark.parametrize("module", ["llmsys.models.transformer", "llmsys.models.heads", "llmsys.models.generation"])
def test_models_know_nothing_of_parallelism(module):
    reached, todo = set(), [module]
    while todo:
        current = todo.pop()
        for target in GRAPH.get(current, ()):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert not {m for m in reached if layer(m) is not None and layer(m) > LAYER_OF["models"]}
