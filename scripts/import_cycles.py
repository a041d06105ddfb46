#!/usr/bin/env python3
"""Lists import cycles between the top-level modules of a crate's src/.

A module is a top-level file or folder under src/ (`model.rs`, `cuda/`);
an edge A -> B is a `use crate::B` (or `crate::B::` path) anywhere in A's
files outside its tests. Prints each strongly connected component with
more than one module; exits 1 if there is any.

Usage: scripts/import_cycles.py engine/src [router/src ...]
"""
import os
import re
import sys


def modules(src):
    out = {}
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if name.endswith(".rs") and name not in ("lib.rs", "main.rs"):
            out[name[:-3]] = [path]
        elif os.path.isdir(path):
            files = []
            for root, _, names in os.walk(path):
                files += [os.path.join(root, n) for n in names if n.endswith(".rs")]
            out[name] = files
    return out


def code_without_tests(path):
    text = open(path).read()
    if os.path.basename(path) == "tests.rs":
        return ""
    cut = text.find("#[cfg(test)]\nmod tests {")
    return text if cut < 0 else text[:cut]


def edges(src):
    mods = modules(src)
    graph = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            for target in re.findall(r"crate::([a-z_0-9]+)", code_without_tests(f)):
                if target in mods and target != m:
                    graph[m].add(target)
    return graph


def cycles(graph):
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    found = False
    for src in sys.argv[1:] or ["engine/src"]:
        for comp in cycles(edges(src)):
            found = True
            print(f"{src}: import cycle among {', '.join(comp)}")
    sys.exit(1 if found else 0)
