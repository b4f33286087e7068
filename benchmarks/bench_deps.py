#!/usr/bin/env python3
"""Installed size of what a package drags in beyond the project's own dependencies.

Run in an environment where the package was installed WITH its dependencies (e.g. a scratch venv after
`pip install -e '.[test]' lenscat==1.1.3`): `python benchmarks/bench_deps.py lenscat`. Sizes are the sums of
each distribution's RECORD entries; the closure follows the installed distributions' requirement metadata.
"""
import os
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


DISTS = {norm(d.metadata["Name"]): d for d in metadata.distributions()}


def closure(names) -> set[str]:
    seen, stack = set(), [norm(n) for n in names]
    while stack:
        n = stack.pop()
        if n in seen or n not in DISTS:
            continue
        seen.add(n)
        for r in DISTS[n].requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(norm(req.name))
    return seen


def size(n: str) -> int:
    return sum(os.path.getsize(f.locate()) for f in DISTS[n].files or [] if os.path.exists(f.locate()))


def main(target: str) -> None:
    py = tomllib.loads((REPO / "pyproject.toml").read_text())
    runtime = [Requirement(d).name for d in py["project"]["dependencies"]]
    test = [Requirement(d).name for d in py["project"]["optional-dependencies"]["test"]]
    for label, ours in (("runtime", runtime), ("runtime+test", runtime + test)):
        extra = sorted(closure([target]) - closure([n for n in ours if norm(n) != norm(target)]) - {norm(target)},
                       key=size, reverse=True)
        print(f"{target} adds beyond the {label} dependencies: {len(extra)} distributions, "
              f"{sum(map(size, extra)) / 1e6:.1f} MB; largest: "
              + ", ".join(f"{n} {size(n) / 1e6:.1f}" for n in extra[:9]))
    print(f"{target} itself: {size(norm(target)) / 1e6:.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lenscat")
