"""The house plan holds: every import of mitoseg and its napari plugin (module level or inside a function) goes
to the same floor or a lower one, as docs/ARCHITECTURE.md's Floors table says, and no modules import each other
in a cycle."""

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def floors_from_architecture() -> dict[str, int]:
    """``{"data": 1, "mitoseg_napari": 4, ...}`` from the Floors table of docs/ARCHITECTURE.md."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Floors", 1)[1].split("\n## ", 1)[0]
    floors = {}
    for floor, modules in re.findall(r"^\| (\d) \| ([^|]+) \|", section, flags=re.M):
        for name in re.findall(r"`([\w.]+)`", modules):
            floors[name] = int(floor)
    return floors


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / "mitoseg").rglob("*.py")) + sorted((ROOT / "plugins" / "mitoseg_napari").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "plugins":
            parts = parts[1:]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imports(files: dict[str, Path]) -> dict[str, set[str]]:
    """Which of ``files`` each module imports, anywhere in it."""
    edges = defaultdict(set)
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges[module].add(name)
    return edges


def floor_of(module: str, floors: dict[str, int]) -> int:
    parts = module.split(".")
    key = parts[0] if parts[0] != "mitoseg" or len(parts) == 1 else parts[1]
    assert key in floors, f"{module}: not on any floor of docs/ARCHITECTURE.md's Floors table"
    return floors[key]


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one member: the import cycles."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return cycles


def test_the_floors_table_names_every_package():
    floors = floors_from_architecture()
    assert floors["mitoseg_napari"] == 4 and floors["runs"] == 0 and floors["engine"] == 3
    for module in module_files():
        floor_of(module, floors)


def test_no_import_climbs_to_a_higher_floor():
    floors = floors_from_architecture()
    files = module_files()
    climbing = [f"{m} (floor {floor_of(m, floors)}) imports {n} (floor {floor_of(n, floors)})"
                for m, targets in imports(files).items() for n in sorted(targets)
                if floor_of(n, floors) > floor_of(m, floors)]
    assert not climbing, "\n".join(climbing)


def test_no_import_cycles_between_modules_or_packages():
    edges = imports(module_files())
    assert strongly_connected(edges) == []

    def unit(module: str) -> str:  # mitoseg.data.readers -> mitoseg.data
        return ".".join(module.split(".")[:2])

    packages = defaultdict(set)
    for module, targets in edges.items():
        packages[unit(module)].update(unit(t) for t in targets if unit(t) != unit(module))
    assert strongly_connected(packages) == []


def test_the_checker_sees_a_climbing_import(tmp_path):
    """The parser finds imports inside functions and relative ones (so the tests above can fail)."""
    package = tmp_path / "mitoseg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "a.py").write_text("def f():\n    from ..engine import trainer\n")
    (package / "engine").mkdir()
    (package / "engine" / "__init__.py").write_text("")
    (package / "engine" / "trainer.py").write_text("from mitoseg.data import a\n")
    files = {"mitoseg": package / "__init__.py", "mitoseg.data": package / "data" / "__init__.py",
             "mitoseg.data.a": package / "data" / "a.py", "mitoseg.engine": package / "engine" / "__init__.py",
             "mitoseg.engine.trainer": package / "engine" / "trainer.py"}
    edges = imports(files)
    assert "mitoseg.engine.trainer" in edges["mitoseg.data.a"]
    assert strongly_connected(edges) == [["mitoseg.data.a", "mitoseg.engine.trainer"]]
