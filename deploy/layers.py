#!/usr/bin/env python3
"""The gateway's module graph: prints it, and fails on an import cycle or an upward edge.

Each top-level module of src/ belongs to one layer; a module may use modules of its own layer
only where LAYERS allows it, and modules of the layers below freely. Edges are read from the
source: every `crate::<module>` path (and `use crate::{a, b}` groups) in src/<module>.rs and
src/<module>/**. Usage: python3 deploy/layers.py [--graph]
"""
import pathlib
import re
import sys

# Top to bottom. A module may use any module of a lower layer.
LAYERS = [
    ("runtime", ["runtime"]),
    ("interfaces", ["api", "admin"]),
    ("documents", ["documents"]),
    ("read path", ["read"]),
    ("cache", ["cache"]),
    ("credentials", ["credentials", "clients"]),
    ("upstream", ["upstream"]),
    ("fleet", ["fleet"]),
    ("config and observe", ["config", "observe"]),
    ("basics", ["error", "respond", "secret", "params", "util"]),
]
# Edges allowed inside one layer (user -> used).
SAME_LAYER = {
    ("admin", "api"),  # the in-flight count of client requests, for /status
    ("credentials", "upstream"),
    ("config", "params"),
    ("error", "respond"),
}
# Outside the layering: the binary's edge and the test adapter to the simulator crate.
EDGE = {"main", "lib", "sim_transport"}

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".rs")


def edges():
    layer_of = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
    found = {}
    for path in sorted(SRC.rglob("*.rs")):
        user = module_of(path)
        text = path.read_text()
        # Test modules may reach anywhere (they build fixtures).
        text = text.split("#[cfg(test)]")[0]
        used = set(re.findall(r"crate::([a-z_]+)", text))
        for group in re.findall(r"crate::\{([^}]*)\}", text):
            used |= set(re.findall(r"(?:^|,)\s*([a-z_]+)", group))
        for u in used:
            if u != user:
                found.setdefault(user, set()).add(u)
    return layer_of, found


def main() -> int:
    layer_of, found = edges()
    problems = []
    for user, used in sorted(found.items()):
        if user in EDGE:
            continue
        if user not in layer_of:
            problems.append(f"src/{user}: not in any layer (add it to LAYERS in {__file__})")
            continue
        for u in sorted(used):
            if u in EDGE:
                problems.append(f"{user} -> {u}: the edge modules are for the binary and tests")
            elif u not in layer_of:
                problems.append(f"{user} -> {u}: {u} is not in any layer")
            elif layer_of[u] < layer_of[user]:
                problems.append(f"{user} -> {u}: upward ({LAYERS[layer_of[u]][0]} is above)")
            elif layer_of[u] == layer_of[user] and (user, u) not in SAME_LAYER:
                problems.append(f"{user} -> {u}: same layer, not allowed in SAME_LAYER")
    # Cycles (any length), by depth-first search.
    state = {}

    def visit(m, stack):
        state[m] = 1
        for u in sorted(found.get(m, ())):
            if state.get(u) == 1:
                problems.append("cycle: " + " -> ".join(stack[stack.index(u):] + [u]))
            elif u not in state:
                visit(u, stack + [u])
        state[m] = 2

    for m in sorted(found):
        if m not in state:
            visit(m, [m])
    if "--graph" in sys.argv or problems:
        for name, mods in LAYERS:
            for m in mods:
                print(f"{name:20} {m:12} -> {', '.join(sorted(found.get(m, ()))) or '-'}")
    for p in problems:
        print("layers:", p, file=sys.stderr)
    if not problems:
        print(f"layers: {sum(len(v) for v in found.values())} edges, no cycle, none upward")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
