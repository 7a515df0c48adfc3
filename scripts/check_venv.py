"""Fails, naming the package, when this interpreter can import anything that its venv's own pip resolutions did not
install: a distribution missing from the install reports that scripts/setup.sh keeps (<venv>/install-*.json), one at
another version than they say, or a path outside the venv and the standard library on sys.path (a .pth line,
PYTHONPATH, the user site). Each end of the tested version range must be a real environment, not one that borrows
the other's packages.

    .venv-floor/bin/python scripts/check_venv.py
"""
from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import re
import sys
import sysconfig

# What `python -m venv` puts in every venv before any resolution.
BOOTSTRAP = {"pip", "setuptools"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved(prefix: str) -> dict[str, str]:
    """name -> version of everything the venv's install reports list."""
    reports = sorted(glob.glob(os.path.join(prefix, "install-*.json")))
    if not reports:
        sys.exit(f"[check_venv] {prefix} has no install report (install-*.json): it was not built by "
                 "scripts/setup.sh. Delete it and run `bash scripts/setup.sh --tests`.")
    out = {}
    for path in reports:
        with open(path) as f:
            for item in json.load(f)["install"]:
                out[canonical(item["metadata"]["name"])] = item["metadata"]["version"]
    return out


def foreign_paths(prefix: str) -> list[str]:
    """sys.path entries that are neither inside the venv nor the interpreter's standard library."""
    stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    inside = lambda p, root: p == root or p.startswith(root + os.sep)  # noqa: E731
    out = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if entry == "" or path == os.path.realpath(os.getcwd()) or not os.path.exists(path):
            continue
        if inside(path, os.path.realpath(prefix)) or any(inside(path, s) for s in stdlib):
            continue
        if os.path.realpath(os.path.dirname(sys.argv[0])) == path:  # this script's own folder
            continue
        out.append(entry)
    return out


def main() -> None:
    prefix = sys.prefix
    if prefix == sys.base_prefix:
        sys.exit("[check_venv] this is not a venv's interpreter: run it with <venv>/bin/python.")
    expected = resolved(prefix)
    problems = [f"{p} is on sys.path, outside the venv: packages there are importable though no resolution of "
                "this venv installed them" for p in foreign_paths(prefix)]
    for dist in importlib.metadata.distributions():
        name, version = canonical(dist.metadata["Name"]), dist.version
        where = dist.locate_file("")
        if name in BOOTSTRAP and name not in expected:
            continue
        if name not in expected:
            problems.append(f"{dist.metadata['Name']} {version} (at {where}) is importable, but no resolution of "
                            "this venv installed it")
        elif expected[name] != version:
            problems.append(f"{dist.metadata['Name']} is {version} (at {where}), but this venv's resolution "
                            f"installed {expected[name]}")
    if problems:
        sys.exit(f"[check_venv] {prefix} is not the environment its requirements resolve to:\n  - "
                 + "\n  - ".join(sorted(set(problems)))
                 + "\nDelete it and run `bash scripts/setup.sh --tests` to build it from nothing.")
    print(f"[check_venv] {prefix}: {len(expected)} packages, each from its own resolution")


if __name__ == "__main__":
    main()
