#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a circle.

    check-module-cycles.py operator/src cli/src     # one crate per source directory
    check-module-cycles.py --self-test              # the checker against crates it makes

Modules that depend on each other cannot be read, tested or changed one at a time, and a circle
is how shared state leaks between concerns (docs/development.md, "Crates and modules"). The
check looks at every level of the module tree: the children of the crate root, and the children
of each directory module, are the nodes; module `a` depends on its sibling `b` when any file of
`a` names a path into `b` (`crate::b::…`, `super::b::…`, `use crate::{b, …}`; an item
re-exported by a parent, `crate::Thing` for `pub use b::Thing`, counts as a path into `b`). A
child naming its own parent (`super::Error`) is no circle: the parent holds its children. Test
code (`#[cfg(test)] mod … { … }` and `tests` modules) is left out, as are comments and strings.
"""

import os
import re
import sys
import tempfile

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
START = re.compile(r"\b(crate|super|self)\b")


def strip(text):
    """The text with comments and string and char literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and (i == 0 or not re.match(r"\w", text[i - 1])):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            j = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i : j + 1]))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:]):
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            out.append(" " * len(m.group(0)))
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def without_tests(text):
    """The (stripped) text without `#[cfg(test)]` items that have a body in braces."""
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+" + IDENT + r"\s*\{", text)
        if not m:
            return text
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        text = text[: m.start()] + re.sub(r"[^\n]", " ", text[m.start() : j]) + text[j:]


def use_tree(text, i, prefix):
    """Paths of the use tree at text[i:] (after `prefix::`): [(segments, end)]."""
    paths = []
    i = skip_space(text, i)
    if i < len(text) and text[i] == "{":
        i += 1
        while True:
            i = skip_space(text, i)
            if i >= len(text) or text[i] == "}":
                return paths, i + 1
            sub, i = use_tree(text, i, prefix)
            paths += sub
            i = skip_space(text, i)
            if i < len(text) and text[i] == ",":
                i += 1
    m = re.compile(r"(" + IDENT + r"|\*)").match(text, i)
    if not m:
        return [prefix], i
    name, i = m.group(1), m.end()
    if name in ("self", "*"):
        return [prefix], i
    j = skip_space(text, i)
    if text.startswith("::", j):
        return use_tree(text, j + 2, prefix + [name])
    return [prefix + [name]], i


def skip_space(text, i):
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def references(text, module):
    """Absolute paths (lists of segments) named in `text`, a file of `module`, with lines."""
    found = []
    for m in START.finditer(text):
        if m.start() > 0 and text[m.start() - 1] in ":_" or text[m.start() - 1 : m.start()].isalnum():
            continue
        base, i = [], m.start()
        if m.group(1) == "crate":
            i = m.end()
        else:
            base = list(module)
            while True:
                w = re.compile(r"(super|self)\s*::\s*").match(text, i)
                if not w:
                    break
                if w.group(1) == "super":
                    if not base:
                        break
                    base = base[:-1]
                i = w.end()
            i -= 2  # back onto the last `::`
        if not text.startswith("::", i):
            continue
        line = text.count("\n", 0, m.start()) + 1
        paths, _ = use_tree(text, i + 2, base)
        found += [(p, line) for p in paths]
    return found


def crate_modules(src):
    """{module path (tuple): file} of the crate whose root is src/lib.rs (else src/main.rs)."""
    root = "lib.rs" if os.path.exists(os.path.join(src, "lib.rs")) else "main.rs"
    modules = {(): os.path.join(src, root)}
    for dirpath, _, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        parts = [] if rel == "." else rel.split(os.sep)
        if parts and parts[0] == "bin":
            continue
        for f in files:
            if not f.endswith(".rs") or (not parts and f in ("lib.rs", "main.rs")):
                continue
            path = tuple(parts) if f == "mod.rs" else tuple(parts + [f[:-3]])
            if "tests" in path:
                continue
            modules[path] = os.path.join(dirpath, f)
    return modules


def reexports(texts, modules):
    """{(module, name): path} for `pub use a::b::Name;` in module files."""
    out = {}
    for module, text in texts.items():
        for m in re.finditer(r"\bpub(\([^)]*\))?\s+use\s+", text):
            end = text.find(";", m.end())
            statement = text[m.end() : end if end >= 0 else len(text)]
            if START.match(statement):
                paths = [p for p, _ in references(statement, module)]
            else:
                paths, _ = use_tree(statement, 0, list(module))
            for p in paths:
                if p:
                    out[(module, p[-1])] = p
    return out


def resolve(path, modules, reexported):
    """The path with a leading re-export replaced by where it points, once."""
    for k in range(len(path) - 1, -1, -1):
        target = reexported.get((tuple(path[:k]), path[k]))
        if target and tuple(path[: k + 1]) not in modules:
            return target + path[k + 1 :]
    return path


def cycles(src):
    """Circles of sibling modules in the crate at src: [(level, [modules], [evidence])]."""
    modules = crate_modules(src)
    texts = {}
    for module, f in modules.items():
        with open(f, encoding="utf-8") as fh:
            texts[module] = without_tests(strip(fh.read()))
    reexported = reexports(texts, modules)
    edges = {}  # level -> {a: {b: "file:line"}}
    for module, text in texts.items():
        for path, line in references(text, module):
            path = resolve(path, modules, reexported)
            k = 0
            while k < min(len(module), len(path)) and module[k] == path[k]:
                k += 1
            if k >= len(module) or k >= len(path) or tuple(path[: k + 1]) not in modules:
                continue
            level, a, b = tuple(module[:k]), module[k], path[k]
            edges.setdefault(level, {}).setdefault(a, {}).setdefault(
                b, f"{modules[module]}:{line}"
            )
    found = []
    for level, graph in sorted(edges.items()):
        for scc in strongly_connected(graph):
            if len(scc) > 1:
                evidence = [
                    f"{a} -> {b} ({graph[a][b]})" for a in sorted(scc) for b in sorted(graph.get(a, {})) if b in scc
                ]
                found.append(("::".join(level) or "crate", sorted(scc), evidence))
    return found


def strongly_connected(graph):
    """Tarjan's strongly connected components of {node: {successor: …}}."""
    index, low, stack, on, out = {}, {}, [], set(), []
    nodes = set(graph) | {b for succ in graph.values() for b in succ}

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            out.append(scc)

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def self_test():
    """The checker finds a planted circle (three ways of naming it) and passes clean trees."""
    cases = {
        "circle": ({"lib.rs": "mod a; mod b;", "a.rs": "use crate::b::X;", "b/mod.rs": "fn f() { crate::a::g() }"}, True),
        "grouped": ({"lib.rs": "mod a; mod b;", "a.rs": "use crate::{b::{X, Y}, c};", "b.rs": "use super::a;"}, True),
        "reexport": ({"lib.rs": "mod a; mod b; pub use b::Thing;", "a.rs": "use crate::Thing;", "b.rs": "use crate::a::f;"}, True),
        "reexport by path": ({"lib.rs": "mod a; mod b; mod c;", "a.rs": "pub use crate::c::{X, Y};", "b.rs": "use crate::a::X;", "c.rs": "use crate::b::Z;"}, True),
        "reexport breaks no circle": ({"lib.rs": "mod a; mod b; mod c;", "a.rs": "pub use crate::c::{X, Y}; use crate::b::B;", "b.rs": "use crate::a::X;"}, False),
        "nested": ({"lib.rs": "mod m;", "m/mod.rs": "mod x; mod y;", "m/x.rs": "use super::y::Y;", "m/y.rs": "use crate::m::x::X;"}, True),
        "clean": ({"lib.rs": "mod a; mod b; pub use b::Thing;", "a.rs": "use crate::b::X; use crate::Error;", "b.rs": "use super::Error; // crate::a::f\n const S: &str = \"crate::a::x\";"}, False),
        "test only": ({"lib.rs": "mod a; mod b;", "a.rs": "use crate::b::X;", "b.rs": "#[cfg(test)]\nmod tests { use crate::a::f; }"}, False),
        "parent": ({"lib.rs": "mod m;", "m/mod.rs": "mod x; use self::x::X; pub struct E;", "m/x.rs": "use super::E;"}, False),
    }
    failed = 0
    for name, (files, circle) in cases.items():
        with tempfile.TemporaryDirectory() as src:
            for f, text in files.items():
                os.makedirs(os.path.dirname(os.path.join(src, f)), exist_ok=True)
                with open(os.path.join(src, f), "w") as fh:
                    fh.write(text)
            got = bool(cycles(src))
            if got != circle:
                failed += 1
                print(f"self-test {name}: expected circle={circle}, got {cycles(src)}", file=sys.stderr)
    return failed == 0


def main(args):
    if args == ["--self-test"]:
        return 0 if self_test() else 1
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    status = 0
    for src in args:
        for level, scc, evidence in cycles(src):
            status = 1
            print(f"{src}: modules of {level} import each other in a circle: {', '.join(scc)}", file=sys.stderr)
            for e in evidence:
                print(f"    {e}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
