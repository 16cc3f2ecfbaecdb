#!/usr/bin/env python3
"""Fails when two modules of a crate import from each other.

Usage: module-cycles.py SRC_DIR [SRC_DIR...]

Reads every `crate::`, `super::` and `self::` path outside `#[cfg(test)]` code and
comments (grouped imports `crate::{a, b}` included), resolves it to the deepest
module file that exists, and reports every pair of modules that import from each
other. A module and its own ancestor are not a pair: a child file that adds an
`impl` block to its parent's type, while the parent calls into it, is how a large
type is split across files (`engine/call/`), not a layering cycle.
"""

import os
import re
import sys
from collections import defaultdict

PATH = re.compile(r"\b((?:crate|super|self)(?:::\w+)+)")
GROUP = re.compile(r"\b((?:crate|super|self)(?:::\w+)*)::\{([^}]*)\}")


def modules(src):
    found = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            parts = os.path.relpath(path, src)[:-3].split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts in (["lib"], ["main"]):
                parts = []
            found[tuple(parts)] = path
    return found


def imports(mod, path, known):
    text = open(path, encoding="utf-8").read()
    cut = text.find("#[cfg(test)]")
    if cut >= 0:
        text = text[:cut]
    text = re.sub(r"//[^\n]*", "", text)
    paths = [m.group(1) for m in PATH.finditer(text)]
    for m in GROUP.finditer(text):
        for name in m.group(2).split(","):
            head = name.strip().split(" ")[0].split("::")[0]
            if re.fullmatch(r"\w+", head or ""):
                paths.append(f"{m.group(1)}::{head}")
    is_dir = os.path.basename(path) in ("mod.rs", "lib.rs", "main.rs")
    out = set()
    for p in paths:
        segs = p.split("::")
        if segs[0] == "crate":
            base, rest = [], segs[1:]
        else:
            base = list(mod) if (is_dir or segs[0] == "self") else list(mod[:-1])
            rest = segs[1:]
            while rest and rest[0] == "super":
                base, rest = base[:-1], rest[1:]
        full = base + rest
        for i in range(len(full), 0, -1):
            target = tuple(full[:i])
            if target in known:
                if target != mod:
                    out.add(target)
                break
    return out


def related(a, b):
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    return long_[: len(short)] == short


def main(dirs):
    bad = []
    for src in dirs:
        known = modules(src)
        deps = defaultdict(set)
        for mod, path in known.items():
            if mod:
                deps[mod] = imports(mod, path, known)
        for a in sorted(deps):
            for b in sorted(deps[a]):
                if a < b and a in deps.get(b, ()) and not related(a, b):
                    bad.append(f"{src}: {'::'.join(a)} <-> {'::'.join(b)}")
    for line in bad:
        print(f"module cycle: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["src"]))
