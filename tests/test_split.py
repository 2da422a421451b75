"""`bleuberi split` (issue 33, finding 3): one file into a pool and a held-out set, by a seed, with no id in
both, the same whatever the order of the file."""

from __future__ import annotations

import random

import pytest

from bleuberi_cli.app import app
from stages.core.errors import UsageError
from stages.split import SplitConfig, split_records
from tests.conftest import read_jsonl_text, write_jsonl

RECORDS = [{"id": f"task{i}", "prompt": f"Question {i}?", "references": [f"Answer {i}."]} for i in range(20)]


def ids(records: list[dict]) -> list[str]:
    return [record["id"] for record in records]


@pytest.mark.parametrize(("held_out", "size"), [(0.25, 5), (0.2, 4), (0.03, 1), (7, 7), (1, 1), (50, 19)])
def test_the_parts_share_no_id_and_cover_the_input(held_out, size) -> None:
    pool, heldout = split_records(RECORDS, SplitConfig(held_out=held_out))
    assert len(heldout) == size and len(pool) == len(RECORDS) - size
    assert not set(ids(pool)) & set(ids(heldout))
    assert sorted(ids(pool) + ids(heldout)) == sorted(ids(RECORDS))
    position = {record_id: i for i, record_id in enumerate(ids(RECORDS))}
    for part in (pool, heldout):  # each part keeps the input order
        assert [position[i] for i in ids(part)] == sorted(position[i] for i in ids(part))


def test_the_split_depends_on_the_ids_and_the_seed_not_on_the_order() -> None:
    shuffled = RECORDS[:]
    random.Random(3).shuffle(shuffled)
    first = split_records(RECORDS, SplitConfig(held_out=0.25, seed=1))[1]
    again = split_records(shuffled, SplitConfig(held_out=0.25, seed=1))[1]
    assert set(ids(first)) == set(ids(again))
    others = [set(ids(split_records(RECORDS, SplitConfig(held_out=0.25, seed=s))[1])) for s in range(2, 6)]
    assert any(other != set(ids(first)) for other in others)


@pytest.mark.parametrize("held_out", [0, -1, 1.5, 2.5])
def test_a_held_out_that_is_neither_a_share_nor_a_count_is_refused(held_out) -> None:
    with pytest.raises(UsageError, match="--held-out must be a share in"):
        SplitConfig(held_out=held_out)


def test_split_writes_both_files_and_says_so(runner, tmp_path) -> None:
    data = write_jsonl(tmp_path / "mine.jsonl", RECORDS)
    pool, heldout = tmp_path / "pool.jsonl", tmp_path / "heldout.jsonl"
    args = ["split", "-i", str(data), "--held-out", "6", "--seed", "9", "--pool", str(pool), "--heldout", str(heldout)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert f"split 20 records (seed 9): 14 to {pool}, 6 held out to {heldout}; no id is in both" in result.stderr
    expected_pool, expected_heldout = split_records(RECORDS, SplitConfig(held_out=6, seed=9))
    assert read_jsonl_text(pool.read_text()) == expected_pool
    assert read_jsonl_text(heldout.read_text()) == expected_heldout


def test_split_refuses_one_file_for_both_parts_or_over_its_input(runner, tmp_path) -> None:
    data = write_jsonl(tmp_path / "mine.jsonl", RECORDS)
    same = runner.invoke(app, ["split", "-i", str(data), "--pool", "x.jsonl", "--heldout", "x.jsonl"])
    assert same.exit_code == 2 and "--pool and --heldout are the same file" in same.stderr
    over = runner.invoke(app, ["split", "-i", str(data), "--pool", str(data), "--heldout", str(tmp_path / "h.jsonl")])
    assert over.exit_code == 2 and "an output of split would replace its input" in over.stderr
    assert read_jsonl_text(data.read_text()) == RECORDS


def test_a_split_of_one_record_is_refused(runner, tmp_path) -> None:
    data = write_jsonl(tmp_path / "one.jsonl", RECORDS[:1])
    out = ["--pool", str(tmp_path / "p.jsonl"), "--heldout", str(tmp_path / "h.jsonl")]
    result = runner.invoke(app, ["split", "-i", str(data), *out])
    assert result.exit_code == 2 and "a split needs at least 2" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl"]
