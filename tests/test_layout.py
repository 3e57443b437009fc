"""The package layout holds: no import cycle, and no import runs back up a layer.

Read statically with ``ast``, so a violation is reported as the offending edge,
``module -> module (file:line)``. Imports inside functions count everywhere; imports under
``if TYPE_CHECKING:`` count for the layers (a type-only import still couples two layers) but
not for cycles (they never run, so they cannot make one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOPS = ("relay", "archive", "bench")

Edge = tuple[str, str, str]  # (importer, imported, "path:line")
TYPED = ":typing"  # suffix of the place of an import under TYPE_CHECKING


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for top in TOPS:
        for p in sorted((ROOT / top).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _edges() -> list[Edge]:
    edges: list[Edge] = []
    for mod, path in MODULES.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text())
        typed = {
            id(m)
            for n in ast.walk(tree)
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
            for b in n.body
            for m in ast.walk(b)
        }
        for n in ast.walk(tree):
            targets: list[str] = []
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (n.level - 1)]
                    base = ".".join([*pkg, *([n.module] if n.module else [])])
                for a in n.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in MODULES else base)
            where = f"{path.relative_to(ROOT)}:{getattr(n, 'lineno', 0)}"
            if id(n) in typed:
                where += TYPED
            for t in targets:
                if t.split(".")[0] in TOPS and t != mod:
                    edges.append((mod, t, where))
    return edges


EDGES = _edges()


def _under(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _describe(edges: list[Edge]) -> str:
    return "\n".join(f"{a} -> {b} ({where})" for a, b, where in edges)


def test_the_graph_is_read() -> None:
    """Guards the reader itself: a few edges that exist must be found."""
    pairs = {(a, b) for a, b, _ in EDGES}
    assert ("relay.formats.rfc3164", "relay.formats.rfc5424") in pairs
    assert ("relay.framing.rfc6587", "relay.framing.hour_runs") in pairs
    assert ("archive.chunk", "relay.formats.staging_block") in pairs
    assert ("bench.run", "bench.measure") in pairs
    assert len(EDGES) > 200


def _cycle() -> list[Edge] | None:
    """One import cycle as its edges, or None (depth-first over the module graph)."""
    out: dict[str, list[Edge]] = {}
    for e in EDGES:
        if e[1] in MODULES and not e[2].endswith(TYPED):
            out.setdefault(e[0], []).append(e)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[Edge] = []

    def visit(node: str) -> list[Edge] | None:
        state[node] = 1
        for e in out.get(node, []):
            if state.get(e[1]) == 1:
                first = next((i for i, p in enumerate(path) if p[0] == e[1]), len(path))
                return [*path[first:], e]
            if not state.get(e[1]):
                path.append(e)
                found = visit(e[1])
                if found:
                    return found
                path.pop()
        state[node] = 2
        return None

    for start in sorted(MODULES):
        if not state.get(start):
            found = visit(start)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle:\n" + _describe(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    """The finder is not vacuous: a cycle added to the graph is reported."""
    extra = ("relay.formats.rfc5424", "relay.formats.rfc3164", "injected:0")
    EDGES.append(extra)
    try:
        cycle = _cycle()
    finally:
        EDGES.remove(extra)
    assert cycle is not None and extra in cycle


# Each rule: (importers, what they must not import, why).
_WIRING = ("relay.service", "relay.cli", "relay.reload", "relay.__main__")
RULES: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (
        ("relay.formats",),
        tuple(m for m in MODULES if m.startswith("relay.") and not _under(m, "relay.formats")),
        "formats are pure: they import nothing else from relay",
    ),
    (
        ("relay.framing",),
        tuple(
            m
            for m in MODULES
            if m.startswith("relay.") and not _under(m, "relay.formats", "relay.framing")
        ),
        "framing sits on formats only",
    ),
    (
        (
            "relay.formats",
            "relay.framing",
            "relay.inputs",
            "relay.relp",
            "relay.disk",
            "relay.forward",
            "relay.link",
            "relay.ops",
            "relay.tools",
            "relay.router",
            "relay.selection",
            "relay.selectors",
            "relay.config",
        ),
        _WIRING,
        "the wiring (service, cli, reload) is the top layer: nothing below imports it",
    ),
    (
        ("archive",),
        (
            "relay.inputs",
            "relay.relp",
            "relay.forward",
            "relay.link",
            "relay.router",
            "relay.selection",
            "relay.tools",
            *_WIRING,
        ),
        "the archiver reads what the relay wrote (formats, staging, config, ops), it does not"
        " receive, route or forward",
    ),
    (("relay",), ("archive", "bench"), "the relay does not import the archiver or the bench"),
    (("archive",), ("bench",), "the archiver does not import the bench"),
]


@pytest.mark.parametrize("importers,forbidden,why", RULES, ids=[r[2] for r in RULES])
def test_no_import_runs_up_a_layer(
    importers: tuple[str, ...], forbidden: tuple[str, ...], why: str
) -> None:
    bad = [e for e in EDGES if _under(e[0], *importers) and _under(e[1], *forbidden)]
    assert not bad, f"{why}:\n{_describe(bad)}"


def test_a_rule_catches_an_edge_up() -> None:
    """The rules are not vacuous: an edge from formats to the service is caught."""
    importers, forbidden, _ = RULES[0]
    edge = ("relay.formats.rfc5424", "relay.service", "injected:0")
    assert _under(edge[0], *importers) and _under(edge[1], *forbidden)
