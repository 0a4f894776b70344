"""What tuner imports: planning and sizing never load the synthetic GGUF writer's numpy and gguf, and the package's
modules import each other in one direction only (no circle, not even one held apart by imports inside functions)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Run a command in-process and report which of the heavy modules it loaded.
_PROBE = """
import json, sys
from tuner.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "gguf") or m == "tuner.synth")
sys.stderr.write("\\nLOADED " + json.dumps({"code": code, "loaded": loaded}) + "\\n")
"""


def _loaded_by(*args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120,
                          check=False)
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.startswith("LOADED "), done.stderr
    assert json.loads(done.stdout)  # the command printed its JSON
    return json.loads(last.removeprefix("LOADED "))


@pytest.mark.parametrize("args", [
    ("recommend", "--gpu", "rtx-4090", "--json"),
    ("recommend", "--gpu", "none", "--json"),
    ("estimate", "qwen3.5-35b-a3b:Q4_K_M", "--gpu", "rtx-4090", "--json"),
], ids=["recommend", "recommend-cpu", "estimate"])
def test_planning_for_the_built_in_card_imports_neither_numpy_nor_gguf(args: tuple[str, ...]) -> None:
    assert _loaded_by(*args) == {"code": 0, "loaded": []}


def _imports_graph(root: Path) -> dict[str, set[str]]:
    """Which module of the package ``tuner`` under ``root`` imports which, counting imports anywhere in a module
    (inside functions too)."""

    def module_name(path: Path) -> str:
        parts = path.relative_to(root).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {module_name(p): p for p in (root / "tuner").rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_package_has_no_import_circle() -> None:
    graph = _imports_graph(REPO)
    assert {"tuner.cards", "tuner.models", "tuner.remote", "tuner.local"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_circle_held_apart_by_an_import_inside_a_function_is_found(tmp_path: Path) -> None:
    package = tmp_path / "tuner"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cards.py").write_text("from tuner.models import QuantCandidate\n")
    (package / "models.py").write_text("def resolve():\n    from tuner import remote\n")
    (package / "remote.py").write_text("from tuner.cards import match_card\nimport json\n")
    graph = _imports_graph(tmp_path)
    assert "tuner.remote" in graph["tuner.models"]
    assert _cycle(graph) == ["tuner.cards", "tuner.models", "tuner.remote", "tuner.cards"]
    (package / "models.py").write_text("def resolve():\n    import json\n")
    assert _cycle(_imports_graph(tmp_path)) is None
