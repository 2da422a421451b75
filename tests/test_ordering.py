"""tests/ordering.py: --shuffle-seed, --run-first and --run-last (issue 27): modules move as blocks, each
module's tests are shuffled within it, the same seed gives the same order."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ordering import arrange, parse_seed


@dataclass(frozen=True)
class Fake:
    path: Path
    name: str


MODULES = [Path(f"/r/tests/test_{letter}.py") for letter in "abcdef"]
ITEMS = [Fake(path, f"{path.stem}::{n}") for path in MODULES for n in range(5)]


def _modules(items: list[Fake]) -> list[str]:
    """The modules in the order they run, one entry per run of consecutive tests."""
    runs: list[str] = []
    for item in items:
        if not runs or runs[-1] != item.path.stem:
            runs.append(item.path.stem)
    return runs


def test_without_options_the_order_is_pytests() -> None:
    assert arrange(ITEMS, seed=None) == ITEMS


def test_a_seed_shuffles_modules_as_blocks_and_tests_within_them() -> None:
    one, again, other = arrange(ITEMS, seed=1), arrange(ITEMS, seed=1), arrange(ITEMS, seed=2)
    assert one == again  # the same seed, the same order
    assert sorted(one, key=ITEMS.index) == ITEMS  # every test once
    assert len(_modules(one)) == len(MODULES)  # each module in one block: its fixtures start once
    assert one != other and _modules(one) != _modules(other)
    assert _modules(one) != [path.stem for path in MODULES]  # shuffled, not as collected
    within = [item for item in one if item.path == MODULES[0]]
    assert within != [item for item in ITEMS if item.path == MODULES[0]]


def test_a_modules_order_under_a_seed_does_not_depend_on_the_others() -> None:
    """Running one module alone (or with -m deselecting others) with a seed replays its order in the full run."""
    alone = arrange([item for item in ITEMS if item.path == MODULES[2]], seed=7)
    assert [item for item in arrange(ITEMS, seed=7) if item.path == MODULES[2]] == alone


def test_first_and_last_in_the_order_given() -> None:
    ordered = arrange(ITEMS, seed=3, first=[MODULES[4], MODULES[1]], last=[MODULES[0]])
    modules = _modules(ordered)
    assert modules[:2] == ["test_e", "test_b"] and modules[-1] == "test_a"
    middle = [m for m in _modules(arrange(ITEMS, seed=3)) if m not in ("test_e", "test_b", "test_a")]
    assert modules[2:-1] == middle  # the others keep the seed's order
    folder = Path("/r/tests/engines")  # a folder: every module under it
    nested = [Fake(folder / "test_g.py", "g"), *ITEMS, Fake(folder / "test_h.py", "h")]
    assert _modules(arrange(nested, seed=None, last=[folder])) == [*(p.stem for p in MODULES), "test_g", "test_h"]


def test_the_seed_option() -> None:
    assert parse_seed("42") == 42
    assert 0 <= parse_seed("random") < 10**6
    with pytest.raises(pytest.UsageError, match="--shuffle-seed 'x'"):
        parse_seed("x")


# --- the options, in an inner session ------------------------------------------------------------------------

WIRED = (
    "from tests.conftest import pytest_addoption, pytest_collection_modifyitems, pytest_configure, "
    "pytest_terminal_summary\n"
    "import os\n"
    "import pytest\n\n"
    "@pytest.fixture(scope='module')\n"
    "def started(request):\n"
    "    with open(os.environ['STARTED_LOG'], 'a') as log:\n"
    "        log.write(request.module.__name__ + '\\n')\n"
)
MODULE = "\n".join(f"def test_{n}(started):\n    pass\n" for n in range(4))


def _order(result: pytest.RunResult) -> list[str]:
    return [found[1] for line in result.outlines if (found := re.match(r"(\S+::test_\d+) PASSED", line))]


def test_the_options_order_the_session(pytester, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("STARTED_LOG", str(tmp_path / "started.txt"))
    pytester.makeconftest(WIRED)
    for name in ("test_one", "test_two", "test_three"):
        pytester.makepyfile(**{name: MODULE})
    base = ("-p", "no:cacheprovider", "-v", "--basetemp", str(tmp_path / "t"))
    plain = pytester.runpytest(*base)
    assert _order(plain) == [f"{m}.py::test_{n}" for m in ("test_one", "test_three", "test_two") for n in range(4)]
    shuffled = pytester.runpytest(*base, "--shuffle-seed", "5", "--run-last", "test_one.py")
    shuffled.assert_outcomes(passed=12)
    order = _order(shuffled)
    assert sorted(order) == sorted(_order(plain)) and order != _order(plain)
    assert [line.split("::")[0] for line in order[-4:]] == ["test_one.py"] * 4
    started = (tmp_path / "started.txt").read_text().split()
    assert started[3:] == [m.split(".py")[0] for m in order[::4]]  # each module's fixture once, in its turn
    assert "test order: --shuffle-seed 5" in shuffled.outlines
    assert _order(pytester.runpytest(*base, "--shuffle-seed", "5", "--run-last", "test_one.py")) == order


def test_bad_options_are_usage_errors(pytester) -> None:
    pytester.makeconftest(WIRED)
    pytester.makepyfile(test_one=MODULE)
    bad_seed = pytester.runpytest("-p", "no:cacheprovider", "--shuffle-seed", "soon")
    assert (
        bad_seed.ret == pytest.ExitCode.USAGE_ERROR and "expected a whole number or 'random'" in bad_seed.stderr.str()
    )
    missing = pytester.runpytest("-p", "no:cacheprovider", "--run-first", "test_none.py")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR and "test_none.py: no such file or folder" in missing.stderr.str()
