"""The rooms of docs/architecture.md ("Rooms and their order") hold: every module of the package has one room, no
module imports from a room above its own, and no modules import each other in a cycle. Imports are read from the
source (ast), those inside functions too; nothing is imported. The table is read from the document itself."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mlx_glm_image"
DOC = ROOT / "docs" / "architecture.md"
SECTION = "## Rooms and their order"


def rooms() -> list[tuple[str, list[str]]]:
    """(room, its entries) from the bottom up: the rows of the section's table; an entry is a module's path in
    the package, or a folder (ending in /) for every module under it."""
    text = DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    table = []
    for row in rows[2:]:  # past the header and its rule
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        table.append((cells[0].strip("*` "), re.findall(r"`([^`]+)`", cells[1])))
    assert table, f"the section {SECTION!r} of {DOC} has no table of rooms"
    return table


def modules() -> dict[str, Path]:
    """Every module of the package by its path in the package (pipeline/stages.py, models/__init__.py)."""
    return {p.relative_to(PACKAGE).as_posix(): p for p in sorted(PACKAGE.rglob("*.py"))}


def room_of() -> dict[str, int]:
    """Each module's room, by its place from the bottom; a module named by no entry, or by two, fails."""
    table, found = rooms(), {}
    for module in modules():
        places = [(i, entry) for i, (_, entries) in enumerate(table) for entry in entries
                  if entry == module or (entry.endswith("/") and module.startswith(entry))]
        assert places, f"{module} has no room: give it one in {DOC.name}'s table ({SECTION!r})"
        assert len(places) == 1, f"{module} is in more than one entry of the rooms: {[e for _, e in places]}"
        found[module] = places[0][0]
    return found


def imports(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its source."""
    known = modules()
    dotted = module[: -len(".py")].removesuffix("__init__").rstrip("/").split("/")
    package = dotted if module.endswith("__init__.py") else dotted[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == PACKAGE.name]
            found |= {_module(known, t) for t in targets}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == PACKAGE.name:
                base = node.module.split(".")[1:]
            else:
                continue
            # ``from .pkg import name``: the submodule when ``name`` is one, else the package itself
            found |= {_module(known, base + [a.name]) or _module(known, base) for a in node.names}
    found.discard(module)
    return {m for m in found if m}


def _module(known: dict, parts: list[str]) -> str | None:
    """The package path of a dotted module (a package: its __init__.py), or None when it is no module."""
    for candidate in ("/".join(parts) + ".py", "/".join([*parts, "__init__.py"])):
        if candidate in known:
            return candidate
    return None


def graph() -> dict[str, set[str]]:
    return {module: imports(module, path) for module, path in modules().items()}


def test_every_module_has_one_room_and_every_entry_is_a_module():
    room_of()
    known = modules()
    for room, entries in rooms():
        for entry in entries:
            assert entry in known or (entry.endswith("/") and any(m.startswith(entry) for m in known)), \
                f"the room {room!r} names {entry}, which is no module of the package"


def test_imports_point_down():
    place, names = room_of(), [room for room, _ in rooms()]
    upward = [f"{a} ({names[place[a]]}) imports {b} ({names[place[b]]})"
              for a, targets in graph().items() for b in sorted(targets) if place[b] > place[a]]
    assert not upward, "imports from a room above:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    edges, cycles, state = graph(), [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in edges:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_checks_see_what_they_check():
    """The reading itself: a relative, a parent-relative and a function-level import each found, and a name
    imported from a package read as that package."""
    edges = graph()
    assert "loading.py" in edges["lora.py"]  # from . import loading
    assert "models/base.py" in edges["models/dit.py"]  # from .base import ...
    assert "sharding.py" in edges["models/dit.py"]  # from ..sharding import ..., inside a method
    assert "pipeline/__init__.py" in edges["generate.py"]  # from .pipeline import GlmImagePipeline
    assert "__init__.py" in edges["pipeline/record.py"]  # from .. import __version__, inside a function
