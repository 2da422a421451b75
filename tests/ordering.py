"""The order tests run in, for proving that none depends on another (issue 27), wired in by tests/conftest.py.

    python -m pytest --shuffle-seed 1234                              # a seeded shuffle
    python -m pytest --shuffle-seed random                            # a new seed, printed at the end
    python -m pytest --run-first tests/test_engine_vllm_real.py       # that module before all others
    python -m pytest --run-last tests/test_engine_vllm_real.py        # ... or after them

Modules move as blocks and each module's tests are shuffled within it (pytest-random-order's "module"
bucket): a module's fixtures (a real vLLM server, the real default model) then still start once. Without
these options the order is pytest's own.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import pytest


class Located(Protocol):
    @property
    def path(self) -> Path: ...


Item = TypeVar("Item", bound=Located)


def arrange(
    items: Sequence[Item], *, seed: int | None, first: Sequence[Path] = (), last: Sequence[Path] = ()
) -> list[Item]:
    """The items, each module's kept together: shuffled by `seed` (None: as collected), then the modules
    under `first` at the start and those under `last` at the end, each in the order given."""
    modules: dict[Path, list[Item]] = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)
    order = list(modules)
    if seed is not None:
        random.Random(seed).shuffle(order)
        for path, members in modules.items():
            # A stream per module: its tests' order under a seed is the same whichever other modules run.
            random.Random(f"{seed}:{path.name}").shuffle(members)

    def place(path: Path) -> tuple[int, int]:
        for end, given in ((0, first), (2, last)):
            for index, where in enumerate(given):
                if path == where or where in path.parents:
                    return end, index
        return 1, 0

    order.sort(key=place)  # stable: the shuffled (or collected) order stays within the start, middle and end
    return [item for path in order for item in modules[path]]


def parse_seed(value: str) -> int:
    """`--shuffle-seed N`, or `random` for a new seed (printed at the end, to run the same order again)."""
    if value == "random":
        return random.SystemRandom().randrange(10**6)
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"--shuffle-seed {value!r}: expected a whole number or 'random'") from None


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("order", "test order (tests/ordering.py)")
    group.addoption("--shuffle-seed", metavar="N", default=None,
                    help="shuffle the modules, and the tests within each module, by seed N ('random': a new seed, "
                         "printed at the end)")  # fmt: skip
    group.addoption("--run-first", metavar="PATH", action="append", default=[],
                    help="run the tests under PATH before all others (repeatable; in the order given)")  # fmt: skip
    group.addoption("--run-last", metavar="PATH", action="append", default=[],
                    help="run the tests under PATH after all others (repeatable; in the order given)")  # fmt: skip


def configure(config: pytest.Config) -> None:
    """Check the options once, before collection: a bad seed or a path that is not there is a usage error."""
    seed = config.getoption("--shuffle-seed")
    config.option.shuffle_seed = None if seed is None else parse_seed(seed)
    here = config.invocation_params.dir
    for name in ("run_first", "run_last"):
        paths = [(here / given).resolve() for given in getattr(config.option, name)]
        for path in paths:
            if not path.exists():
                raise pytest.UsageError(f"--{name.replace('_', '-')} {path}: no such file or folder")
        setattr(config.option, name, paths)


def reorder(config: pytest.Config, items: list[pytest.Item]) -> None:
    seed, first, last = config.option.shuffle_seed, config.option.run_first, config.option.run_last
    if seed is not None or first or last:
        items[:] = arrange(items, seed=seed, first=first, last=last)


def summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if config.option.shuffle_seed is not None:
        terminalreporter.write_line(f"test order: --shuffle-seed {config.option.shuffle_seed}")
