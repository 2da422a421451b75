"""Installed package versions, for provenance (config.json, records) and bug reports (`bleuberi env`)."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version


def package_version(name: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def package_versions(names: Iterable[str]) -> dict[str, str]:
    return {name: package_version(name) for name in names}
