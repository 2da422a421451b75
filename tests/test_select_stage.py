"""`bleuberi select`: modes, deterministic ties, sizes, plots."""

from __future__ import annotations

import random

import pytest

from bleuberi_cli.app import app
from stages.core.errors import UsageError
from stages.select import SelectConfig, quantiles, select_records
from tests.conftest import read_jsonl_text, write_jsonl


def pool(scores: list[float]) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"p{i}", "references": ["x"], "score": s} for i, s in enumerate(scores)]


def ids(records) -> list[str]:
    return [r["id"] for r in records]


def test_hard_keeps_the_lowest_scores_in_input_order() -> None:
    chosen = select_records(pool([0.5, 0.1, 0.9, 0.2, 0.3]), SelectConfig(mode="hard", num=3)).chosen
    assert ids(chosen) == ["r1", "r3", "r4"]
    assert [r["selection"]["rank"] for r in chosen] == [0, 1, 2]
    assert chosen[0]["selection"] == {"mode": "hard", "rank": 0, "pool_size": 5, "seed": 42}


def test_easy_keeps_the_highest() -> None:
    assert ids(select_records(pool([0.5, 0.1, 0.9, 0.2, 0.3]), SelectConfig(mode="easy", num=2)).chosen) == ["r0", "r2"]


def test_medium_is_a_window_around_the_median() -> None:
    scores = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    chosen = select_records(pool(scores), SelectConfig(mode="medium", num=3)).chosen
    assert sorted(r["score"] for r in chosen) == [0.2, 0.3, 0.4]


def test_ties_are_broken_by_seed_not_by_input_order() -> None:
    records = pool([0.5] * 20)
    first = ids(select_records([dict(r) for r in records], SelectConfig(mode="hard", num=5, seed=1)).chosen)
    shuffled = [dict(r) for r in records]
    random.Random(3).shuffle(shuffled)
    again = ids(select_records(shuffled, SelectConfig(mode="hard", num=5, seed=1)).chosen)
    assert sorted(first) == sorted(again)
    other_seed = ids(select_records([dict(r) for r in records], SelectConfig(mode="hard", num=5, seed=2)).chosen)
    assert sorted(other_seed) != sorted(first)


def test_random_mode_is_seeded_and_needs_no_scores() -> None:
    records = [{"id": str(i), "prompt": "p", "references": ["r"]} for i in range(50)]
    a = ids(select_records([dict(r) for r in records], SelectConfig(mode="random", num=10, seed=7)).chosen)
    b = ids(select_records([dict(r) for r in records], SelectConfig(mode="random", num=10, seed=7)).chosen)
    c = ids(select_records([dict(r) for r in records], SelectConfig(mode="random", num=10, seed=8)).chosen)
    assert a == b != c and len(set(a)) == 10


@pytest.mark.parametrize(
    ("pool_size", "num", "fraction", "expected"),
    [
        (10, 3, None, 3),
        (10, 30, None, 10),
        (10, None, 0.25, 3),
        (10, None, 0.35, 4),
        (7, None, 1.0, 7),
        (0, 5, None, 0),
    ],
)
def test_selection_size(pool_size, num, fraction, expected) -> None:
    assert SelectConfig(num=num, fraction=fraction).size(pool_size) == expected


@pytest.mark.parametrize(("num", "fraction"), [(None, None), (3, 0.5), (-1, None), (0, None), (None, 0.0), (None, 1.5)])
def test_selection_size_usage_errors(num, fraction) -> None:
    with pytest.raises(UsageError):
        SelectConfig(num=num, fraction=fraction)


def test_quantiles_interpolate_like_numpy() -> None:
    q = quantiles([4.0, 1.0, 3.0, 2.0])
    assert q == {"min": 1.0, "p25": 1.75, "median": 2.5, "p75": 3.25, "max": 4.0}


def test_select_command_with_summary_and_plot(runner, tmp_path) -> None:
    path = write_jsonl(tmp_path / "scored.jsonl", pool([0.5, 0.1, 0.9, 0.2, 0.3, 0.7]))
    png = tmp_path / "hist.png"
    result = runner.invoke(app, ["select", "-i", str(path), "--mode", "hard", "-n", "2", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert ids(read_jsonl_text(result.stdout)) == ["r1", "r3"]
    assert "selected 2 of 6 records (mode hard)" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_select_requires_scores_except_in_random_mode(runner, tmp_path) -> None:
    path = write_jsonl(tmp_path / "raw.jsonl", [{"id": "a", "prompt": "p", "references": ["r"]}])
    result = runner.invoke(app, ["select", "-i", str(path), "-n", "1"])
    assert result.exit_code == 1
    assert f"{path}:1: field 'score': missing" in result.stderr
    result = runner.invoke(app, ["select", "-i", str(path), "-n", "1", "--mode", "random", "-q"])
    assert result.exit_code == 0 and len(read_jsonl_text(result.stdout)) == 1


def test_select_needs_a_size(runner, tmp_path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", pool([0.1]))
    result = runner.invoke(app, ["select", "-i", str(path)])
    assert result.exit_code == 2
    assert "exactly one of -n/--num and --fraction" in result.stderr
