"""Hardlinks installed distributions from one venv into another, so that the floor venv holds torch and its CUDA
libraries without a second copy on the disk.

    .venv-floor/bin/python scripts/link_dists.py .venv 'torch|torchvision|triton|nvidia-.*|cuda-.*'

Every file a distribution's RECORD lists under site-packages is linked (copied where the two venvs lie on different
file systems); its console scripts are left out, since they name the other venv's interpreter. The target venv's own
pip resolution then finds these distributions installed, checks their requirements like any other, and installs
the rest. Their names and versions go to <target>/install-linked.json, in the shape of pip's install report, so
that scripts/check_venv.py counts them as this venv's own.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import sys
import sysconfig


def site_packages(prefix: str) -> str:
    return sysconfig.get_paths(vars={"base": prefix, "platbase": prefix})["purelib"]


def link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    source, pattern = os.path.abspath(sys.argv[1]), re.compile(sys.argv[2])
    if sys.prefix == sys.base_prefix:
        sys.exit("[link_dists] run it with the target venv's interpreter: <venv>/bin/python")
    src_site, dst_site = site_packages(source), site_packages(sys.prefix)
    linked = []
    for dist in importlib.metadata.distributions(path=[src_site]):
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if not pattern.fullmatch(name):
            continue
        for rel in dist.files or ():
            if str(rel).startswith(".."):  # console scripts and data outside site-packages
                continue
            src, dst = os.path.join(src_site, rel), os.path.join(dst_site, rel)
            if os.path.isfile(src) and not os.path.lexists(dst):
                link(src, dst)
        linked.append({"metadata": {"name": dist.metadata["Name"], "version": dist.version}})
    if not linked:
        sys.exit(f"[link_dists] {src_site} has no distribution matching {pattern.pattern!r}")
    with open(os.path.join(sys.prefix, "install-linked.json"), "w") as f:
        json.dump({"linked_from": source, "install": linked}, f, indent=1)
    print(f"[link_dists] linked {len(linked)} distributions from {source}")


if __name__ == "__main__":
    main()
