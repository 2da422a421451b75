"""The oldest versions pyproject.toml allows, for CI's floors environment (docs/development.md, "CI").

    python3 .ci/floors.py           pip constraints pinning every floor: each requirement of [project]
                                    dependencies and of the extras in EXTRAS, at its >= bound
    python3 .ci/floors.py --python  the oldest Python that requires-python allows, as `python3.10`
    python .ci/floors.py --check    in the environment built with those constraints: every floor that
                                    applies here is the version installed (prints them; exit 1 if not)

A requirement with no >= bound is refused: its floor would be whatever pip found, which nothing tests.
`--pyproject PATH` reads another file (the tests use it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is a dependency there (pyproject.toml)
    import tomli as tomllib

# The extras whose code the test suite runs: reward.png (plot), Parquet input (data), --report-to tensorboard.
# The other trackers (wandb, mlflow, trackio) and bench are installed by no CI environment.
EXTRAS = ("plot", "data", "tensorboard")
FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(?:,[^;]*)?(;.*)?$")


def floors(pyproject: Path) -> list[tuple[str, str, str]]:
    """(name, floor, marker) for each requirement, in pyproject's order; SystemExit for one with no floor."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    found, missing = [], []
    for requirement in requirements:
        match = FLOOR.match(requirement)
        if match is None:
            missing.append(requirement)
        elif match[1].lower() not in {name.lower() for name, _, _ in found}:
            found.append((match[1], match[2], (match[3] or "").lstrip(";").strip()))
    if missing:
        raise SystemExit(f"floors: no >= floor that CI could test in {pyproject.name}: {', '.join(missing)}")
    return found


def oldest_python(pyproject: Path) -> str:
    allowed = tomllib.loads(pyproject.read_text())["project"]["requires-python"]
    match = re.fullmatch(r">=\s*3\.(\d+)", allowed.strip())
    if match is None:
        raise SystemExit(f"floors: requires-python {allowed!r} is not of the form >=3.N")
    return f"python3.{match[1]}"


def check(found: list[tuple[str, str, str]]) -> int:
    """Compare each floor that applies to this interpreter with what is installed."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.markers import Marker
    from packaging.version import Version

    wrong, seen = [], []
    for name, floor, marker in found:
        if marker and not Marker(marker).evaluate():
            continue
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        if installed == "not installed" or Version(installed) != Version(floor):
            wrong.append(f"{name} {installed} (floor {floor})")
        seen.append(f"{name} {installed}")
    print(f"floors: Python {sys.version.split()[0]}, " + ", ".join(seen))
    if wrong:
        print("floors: not at the floor: " + ", ".join(wrong), file=sys.stderr)
    return 1 if wrong else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The oldest versions pyproject.toml allows.")
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--python", action="store_true", help="print the oldest Python allowed")
    group.add_argument("--check", action="store_true", help="check the installed versions against the floors")
    args = parser.parse_args(argv)
    if args.python:
        print(oldest_python(args.pyproject))
        return 0
    found = floors(args.pyproject)
    if args.check:
        return check(found)
    for name, floor, marker in found:
        print(f"{name}=={floor}" + (f"; {marker}" if marker else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
