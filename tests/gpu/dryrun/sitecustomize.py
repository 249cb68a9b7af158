"""Dry run of tests/gpu/check.sh: make this machine's Python look like the GPU image's.

A top-level package of a distribution the project requires (its install requirements, followed
through) that the GPU image lacks (`../image-packages.txt`, plus what the image's own packages
require) is imported only from the wheel target directory `$TESSERA_WHEEL_SITE`, as it is
there; found nowhere else, it is a ModuleNotFoundError. So the dry run fails where the real run
would for a wheel missing from `fetch-wheels.sh`.
Python imports this module at start-up because check.sh puts this folder on PYTHONPATH.
"""
import importlib.machinery
import importlib.metadata as metadata
import os
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots: set[str]) -> set[str]:
    """`roots` and everything they require (extras left out), as installed here."""
    installed = {_norm(d.metadata["Name"]): d for d in metadata.distributions()}
    todo, seen = [n for n in roots if n in installed], set(roots)
    while todo:
        for line in installed[todo.pop()].requires or []:
            req = Requirement(line)
            name = _norm(req.name)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra, or another platform's need
            if name not in seen:
                seen.add(name)
                if name in installed:
                    todo.append(name)
    return seen


def _hidden_modules(image: set[str]) -> set[str]:
    """Top-level modules of what the project requires and the image does not provide. Optional
    packages stay visible: code probes for them with `find_spec` and does without."""
    missing = _closure({"tessera"}) - _closure(image) - {"tessera"}
    return {module for module, dists in metadata.packages_distributions().items()
            if any(_norm(d) in missing for d in dists)}


class _WheelSiteOnly:
    """Meta-path finder: hidden top-level modules come from the wheel site or not at all."""

    def __init__(self, site: str, hidden: set[str]):
        self.site, self.hidden = site, hidden

    def find_spec(self, name, path=None, target=None):
        if "." in name or name not in self.hidden:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [self.site])
        if spec is None:
            raise ModuleNotFoundError(
                f"No module named {name!r}: the GPU image lacks it and no wheel from "
                "tests/gpu/fetch-wheels.sh provides it", name=name)
        return spec


def _install() -> None:
    site = os.environ.get("TESSERA_WHEEL_SITE")
    if not site:
        return
    listing = Path(__file__).resolve().parent.parent / "image-packages.txt"
    image = {_norm(line.strip()) for line in listing.read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    sys.meta_path.insert(0, _WheelSiteOnly(site, _hidden_modules(image)))


_install()
