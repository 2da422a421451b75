"""Input formats users have (Parquet, CSV/TSV, a JSON array, a `datasets` save_to_disk folder), other schemas
mapped by field (verl's `prompt` + `reward_model.ground_truth`), and Parquet output. Expected records are
written out by hand; the verl file goes through score, select, train, eval and `bleuberi run` on the tiny model."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from bleuberi_cli.app import app
from stages.core.errors import BleuberiError, InputError
from stages.core.formats import ParquetWriter, iter_rows, open_writer
from stages.core.records import FieldMap, read_records
from tests.conftest import read_jsonl_text, write_jsonl

VERL_MAP = [
    "--prompt-field",
    "prompt",
    "--reference-field",
    "reward_model.ground_truth",
    "--id-field",
    "extra_info.index",
]


def verl_rows(count: int = 4) -> list[dict]:
    """Rows as verl's data preprocessing writes them (a chat-list prompt, the answer under reward_model)."""
    questions = ["Name a red fruit.", "Name the sky's colour.", "Say hello politely.", "Count to three."]
    answers = ["An apple is a red fruit.", "The sky is blue.", "Hello, nice to meet you.", "One, two, three."]
    return [
        {
            "data_source": "demo",
            "prompt": [{"role": "user", "content": questions[i % 4]}],
            "ability": "chat",
            "reward_model": {"style": "rule", "ground_truth": answers[i % 4]},
            "extra_info": {"split": "train", "index": i},
        }
        for i in range(count)
    ]


def mapped(row: dict) -> dict:
    """What the verl map makes of a row, by hand: the chat list moves to `messages`, the rest stays."""
    return {
        "data_source": row["data_source"],
        "ability": row["ability"],
        "reward_model": row["reward_model"],
        "extra_info": row["extra_info"],
        "messages": row["prompt"],
        "references": [row["reward_model"]["ground_truth"]],
        "id": str(row["extra_info"]["index"]),
    }


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def save_to_disk_like(folder: Path, shards: list[list[dict]]) -> Path:
    """The layout `datasets.Dataset.save_to_disk` writes (datasets 5.2 arrow_dataset.py, checked against a
    real save): Arrow IPC *stream* shards `data-0000i-of-0000n.arrow`, listed in order in state.json's
    `_data_files`, beside dataset_info.json."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, rows in zip(names, shards):
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    return folder


# --- readers ---------------------------------------------------------------------------------------------


def test_csv_with_a_header_quoted_cells_and_a_bom(tmp_path) -> None:
    path = tmp_path / "data.csv"
    text = 'id,prompt,reference\na,"Say hi, then stop.\nThanks.",Hi.\n\nb,Name a colour.,"Blue, or ""red""."\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert list(read_records(path)) == [
        {"id": "a", "prompt": "Say hi, then stop.\nThanks.", "reference": "Hi.", "references": ["Hi."]},
        {"id": "b", "prompt": "Name a colour.", "reference": 'Blue, or "red".', "references": ['Blue, or "red".']},
    ]


def test_tsv_and_gzipped_csv(tmp_path) -> None:
    tsv = tmp_path / "data.tsv"
    tsv.write_text("id\tprompt\tground_truth\nq1\tWhat is 2+2?\tFour.\n")
    assert list(read_records(tsv)) == [
        {"id": "q1", "prompt": "What is 2+2?", "ground_truth": "Four.", "references": ["Four."]}
    ]
    gz = tmp_path / "data.csv.gz"
    gz.write_bytes(gzip.compress(b"prompt,reference\nHello.,Hi.\n"))
    [record] = read_records(gz)
    assert (record["prompt"], record["references"]) == ("Hello.", ["Hi."])


def test_csv_rows_are_counted_from_the_first_data_row(tmp_path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("id,prompt,reference\na,P,R\nb,P2\n")
    with pytest.raises(InputError) as error:
        list(read_records(path))
    assert str(error.value) == f"{path}:2: has 2 cells, the header 3"
    path.write_text("id,prompt,id\na,P,b\n")
    with pytest.raises(InputError, match="the header names column 'id' twice"):
        list(read_records(path))


def test_a_json_array_and_json_lines_named_json(tmp_path) -> None:
    array = tmp_path / "data.json"
    array.write_text('[\n  {"id": "a", "prompt": "P", "references": ["R"]},\n  {"prompt": "Q", "reference": "S"}\n]')
    records = list(read_records(array))
    assert records[0] == {"id": "a", "prompt": "P", "references": ["R"]}
    assert records[1]["references"] == ["S"] and len(records[1]["id"]) == 16
    lines = tmp_path / "lines.json"  # what `Dataset.to_json` writes by default
    lines.write_text('{"id": "a", "prompt": "P", "references": ["R"]}\n')
    assert list(read_records(lines)) == [{"id": "a", "prompt": "P", "references": ["R"]}]
    array.write_text('[{"id": "a", "prompt": "P", "references": ["R"]}, "oops"]')
    with pytest.raises(InputError, match=r"data\.json:2: expected a JSON object, got string"):
        list(read_records(array))
    array.write_text('{"id": "a"}')
    assert next(iter_rows(array)) == (1, {"id": "a"})  # one object, not an array: read as JSON Lines


def test_parquet_rows_with_nested_fields(tmp_path) -> None:
    path = write_parquet(tmp_path / "verl.parquet", verl_rows(2))
    assert list(iter_rows(path)) == [(1, verl_rows(2)[0]), (2, verl_rows(2)[1])]


def test_a_save_to_disk_folder_reads_its_shards_in_state_order(tmp_path) -> None:
    rows = verl_rows(3)
    folder = save_to_disk_like(tmp_path / "ds", [rows[:2], rows[2:]])
    assert [row for _, row in iter_rows(folder)] == rows
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"].reverse()
    (folder / "state.json").write_text(json.dumps(state))
    assert [row["extra_info"]["index"] for _, row in iter_rows(folder)] == [2, 0, 1]


def test_a_bad_row_in_a_later_shard_names_its_row_across_shards(tmp_path) -> None:
    good = {"id": "a", "prompt": "P", "references": ["R"]}
    folder = save_to_disk_like(tmp_path / "ds", [[good, {**good, "id": "b"}], [{**good, "id": "c", "prompt": None}]])
    with pytest.raises(InputError) as error:
        list(read_records(folder))
    assert str(error.value) == f"{folder}:3: field 'prompt': expected a string, got null"


def test_a_folder_of_several_splits_or_no_dataset_is_refused_by_name(tmp_path) -> None:
    folder = tmp_path / "dd"
    save_to_disk_like(folder / "train", [[{"prompt": "P", "reference": "R"}]])
    (folder / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(InputError) as error:
        list(read_records(folder))
    assert (
        str(error.value)
        == f"{folder}: holds several splits (train, test): give one split's folder, e.g. {folder}/train"
    )
    assert len(list(read_records(folder / "train"))) == 1
    with pytest.raises(InputError, match=r"neither state\.json \(save_to_disk's\) nor \.parquet files"):
        list(read_records(tmp_path))
    (folder / "train" / "state.json").write_text('{"_data_files": [{"filename": "../../etc/passwd"}]}')
    with pytest.raises(InputError, match="is not a file name in the folder"):
        list(read_records(folder / "train"))


def test_a_folder_of_parquet_shards_and_a_single_arrow_file(tmp_path) -> None:
    good = {"id": "a", "prompt": "P", "references": ["R"]}
    folder = tmp_path / "train"  # as the hub and Spark store a split: shards in name order
    folder.mkdir()
    write_parquet(folder / "train-00001-of-00002.parquet", [{**good, "id": "c", "references": []}])
    write_parquet(folder / "train-00000-of-00002.parquet", [good, {**good, "id": "b"}])
    with pytest.raises(InputError) as error:
        list(read_records(folder))
    assert str(error.value) == f"{folder}:3: field 'references': expected a non-empty list of strings, got list"
    assert [row["id"] for _, row in iter_rows(folder)] == ["a", "b", "c"]
    table = pa.Table.from_pylist([good])
    with pa.OSFile(str(tmp_path / "one.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)  # the IPC file format, not the stream datasets writes: read all the same
    assert list(read_records(tmp_path / "one.arrow")) == [good]


# --- field maps ------------------------------------------------------------------------------------------


def test_the_verl_map_makes_canonical_records_and_keeps_the_original_fields(tmp_path) -> None:
    path = write_parquet(tmp_path / "verl.parquet", verl_rows(2))
    fields = FieldMap("prompt", ("reward_model.ground_truth",), "extra_info.index")
    assert list(read_records(path, fields=fields)) == [mapped(row) for row in verl_rows(2)]


def test_several_reference_fields_paths_into_lists_and_dotted_keys() -> None:
    row = {"q": {"turns": ["First?", "Second?"]}, "ref1": "A.", "ref2": "", "ref3": ["B.", "C."], "my.id": 7}
    fields = FieldMap("q.turns.-1", ("ref1", "ref2", "ref3"), "my.id")
    record = fields.apply(dict(row), "f.csv", 4)
    assert (record["prompt"], record["references"], record["id"]) == ("Second?", ["A.", "B.", "C."], 7)
    assert {k: record[k] for k in row} == row  # the fields they came from are untouched


ROLES = "('system', 'user', 'assistant', 'tool')"


@pytest.mark.parametrize(
    ("row", "fields", "message"),
    [
        ({"p": "P"}, FieldMap("p", ("a.b",)), "field 'a.b': missing (the mapped reference field)"),
        ({"p": "P", "r": None}, FieldMap("p", ("r",)), "field 'r': is null"),
        (
            {"p": "P", "r": None, "s": ""},
            FieldMap("p", ("r", "s")),
            "field 'references': no reference in any of the mapped fields (r, s)",
        ),
        ({"p": 3, "r": "R"}, FieldMap("p", ("r",)), "field 'p': expected a string or a chat list, got int"),
        (
            {"p": [{"role": "judge", "content": "x"}]},
            FieldMap("p"),
            f"field 'p': turn 0 has role 'judge', expected one of {ROLES}",
        ),
        (
            {"p": "P", "r": "R", "n": {"id": True}},
            FieldMap("p", ("r",), "n.id"),
            "field 'n.id': expected a non-empty string or an integer, got True",
        ),
        ({"q": "P"}, FieldMap("question"), "field 'question': missing (the mapped prompt field)"),
    ],
)
def test_a_bad_mapped_field_names_file_row_and_path(row, fields, message) -> None:
    with pytest.raises(InputError) as error:
        fields.apply(row, "f.parquet", 5)
    assert str(error.value) == "f.parquet:5: " + message


def test_no_options_no_map_and_mapped_ids_are_checked_for_duplicates(tmp_path) -> None:
    assert FieldMap.of(None, [], None) is None and FieldMap.of("", None, "") is None
    path = write_parquet(tmp_path / "d.parquet", [{"p": "A", "r": "x", "k": 1}, {"p": "B", "r": "y", "k": 1}])
    with pytest.raises(InputError) as error:
        list(read_records(path, fields=FieldMap("p", ("r",), "k")))
    assert str(error.value) == f"{path}:2: field 'id': duplicate id '1', first on row 1"  # no hash hint: given


# --- Parquet output --------------------------------------------------------------------------------------


def test_parquet_output_reads_back_as_the_records_written(tmp_path) -> None:
    records = [
        {"id": "a", "prompt": "P é", "references": ["R"], "scores": {"bleu": [0.5]}, "empty": {}, "n": 1},
        {"id": "b", "messages": [{"role": "user", "content": "Q"}], "references": ["S", "T"], "n": 2.5},
        {"id": "c", "prompt": "P", "references": ["U"], "scores": {"chrf": [0.1, None]}, "n": None, "extra": [1, "x"]},
    ]
    path = tmp_path / "out.parquet"
    with open_writer(path) as writer:
        for record in records:
            writer.write(record)
    assert [row for _, row in iter_rows(path)] == records
    schema = pq.read_schema(path)
    # Columns every record has with one Arrow type are native (what verl and pandas read); the rest JSON text.
    assert schema.field("id").type == pa.string() and schema.field("references").type == pa.list_(pa.string())
    assert json.loads(schema.metadata[b"bleuberi"]) == {
        "json_columns": ["prompt", "scores", "empty", "n", "messages", "extra"]
    }


def test_verl_columns_stay_native_in_parquet_output(tmp_path) -> None:
    path = tmp_path / "out.parquet"
    with open_writer(path) as writer:
        for row in verl_rows(2):
            writer.write(row)
    assert pq.read_table(path).to_pylist() == verl_rows(2)  # any Parquet reader sees the same rows
    assert json.loads(pq.read_schema(path).metadata[b"bleuberi"]) == {"json_columns": []}


def test_a_failed_parquet_write_keeps_the_earlier_file_and_journals_what_it_finished(tmp_path) -> None:
    from stages.core.journal import finished, journals

    path = write_parquet(tmp_path / "out.parquet", [{"id": "old"}])
    with pytest.raises(RuntimeError) as stopped, ParquetWriter(path) as writer:
        writer.write({"id": "new"})
        raise RuntimeError("stopped")
    assert pq.read_table(path).to_pylist() == [{"id": "old"}]
    [journal] = journals(path)  # the finished record, kept for --resume, and the error says so
    assert finished(path, read_target=False).records == {"new": {"id": "new"}}
    assert stopped.value.__notes__ == [
        f"1 finished records of {path} kept: add --resume to the same command to keep them"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [journal.name, "out.parquet"]


def test_a_parquet_output_resumes_and_csv_is_not_an_output(runner, tiny_model, tmp_path) -> None:
    rows = [{"id": i, "prompt": f"P{i}", "references": ["R"]} for i in "abc"]
    args = ["generate", "--model", str(tiny_model), "--max-new-tokens", "3", "-q"]
    every, two = write_jsonl(tmp_path / "all.jsonl", rows), write_jsonl(tmp_path / "two.jsonl", rows[:2])
    whole, part = tmp_path / "whole.parquet", tmp_path / "x.parquet"
    assert runner.invoke(app, [*args, "-i", str(every), "-o", str(whole)]).exit_code == 0
    assert runner.invoke(app, [*args, "-i", str(two), "-o", str(part)]).exit_code == 0
    resumed = runner.invoke(app, [*args, "-i", str(every), "-o", str(part), "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert pq.read_table(part).to_pylist() == pq.read_table(whole).to_pylist()  # two kept, one generated
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "P", "references": ["R"]}])
    result = runner.invoke(
        app, ["select", "-i", str(data), "--mode", "random", "-n", "1", "-o", str(tmp_path / "x.csv")]
    )
    assert result.exit_code == 2 and "name the output .jsonl or .parquet" in result.stderr
    assert not (tmp_path / "x.csv").exists()


# --- pyarrow missing -------------------------------------------------------------------------------------


def test_without_pyarrow_one_line_names_the_extra(runner, monkeypatch, tmp_path) -> None:
    path = write_parquet(tmp_path / "x.parquet", [{"prompt": "P", "reference": "R", "completions": ["R"]}])
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow` now raises ImportError
    with pytest.raises(BleuberiError) as error:
        list(read_records(path))
    assert str(error.value) == f"reading {path} needs pyarrow: pip install 'bleuberi[data]'"
    result = runner.invoke(app, ["score", "-i", str(path)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == f"bleuberi: error: reading {path} needs pyarrow: pip install 'bleuberi[data]'\n"
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "P", "references": ["R"]}])
    result = runner.invoke(
        app, ["select", "-i", str(data), "--mode", "random", "-n", "1", "-o", str(tmp_path / "o.parquet")]
    )
    assert result.exit_code == 1 and not (tmp_path / "o.parquet").exists()
    assert (
        result.stderr == f"bleuberi: error: writing {tmp_path}/o.parquet needs pyarrow: pip install 'bleuberi[data]'\n"
    )


# --- the verl file through every stage -------------------------------------------------------------------


def test_verl_parquet_through_score_and_select(runner, tmp_path) -> None:
    rows = verl_rows(4)
    # Rows 0 and 2 answer with their reference word for word (BLEU 1), rows 1 and 3 share no word with it (0).
    completions = [
        [rows[0]["reward_model"]["ground_truth"]],
        ["zzz qqq"],
        [rows[2]["reward_model"]["ground_truth"]],
        ["xx"],
    ]
    path = write_parquet(tmp_path / "verl.parquet", [{**row, "completions": c} for row, c in zip(rows, completions)])
    scored = tmp_path / "scored.parquet"
    result = runner.invoke(app, ["score", "-i", str(path), *VERL_MAP, "-o", str(scored), "-q"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    records = [row for _, row in iter_rows(scored)]
    assert [r["score"] for r in records] == pytest.approx([1.0, 0.0, 1.0, 0.0], abs=1e-12)
    assert [r["id"] for r in records] == ["0", "1", "2", "3"] and records[1]["messages"] == rows[1]["prompt"]

    chosen = runner.invoke(app, ["select", "-i", str(scored), "--mode", "hard", "-n", "2", "-q"])
    assert chosen.exit_code == 0, chosen.stderr
    assert [r["id"] for r in read_jsonl_text(chosen.stdout)] == ["1", "3"]
    random = runner.invoke(app, ["select", "-i", str(path), *VERL_MAP, "--mode", "random", "-n", "4", "-q"])
    assert random.exit_code == 0, random.stderr
    assert sorted(r["id"] for r in read_jsonl_text(random.stdout)) == ["0", "1", "2", "3"]


TRAIN = ["--num-generations", "4", "--per-device-train-batch-size", "8", "--max-completion-length", "6"]


def test_verl_parquet_trains_exactly_as_the_same_records_in_jsonl(runner, tiny_model, tmp_path) -> None:
    from safetensors.torch import load_file

    parquet = write_parquet(tmp_path / "verl.parquet", verl_rows(4))
    jsonl = write_jsonl(tmp_path / "same.jsonl", [mapped(row) for row in verl_rows(4)])
    # chrF: character n-grams give the tiny model's random answers rewards that differ, so the adapter moves
    common = ["--model", str(tiny_model), *TRAIN, "--max-steps", "2", "--lr", "1e-2", "--reward", "chrf", "-q"]
    a = runner.invoke(app, ["train", "-i", str(parquet), *VERL_MAP, "-o", str(tmp_path / "a"), *common])
    assert a.exit_code == 0, a.stderr
    b = runner.invoke(app, ["train", "-i", str(jsonl), "-o", str(tmp_path / "b"), *common])
    assert b.exit_code == 0, b.stderr
    assert [r["step"] for r in read_jsonl_text(a.stdout)] == [1, 2]
    config_a, config_b = (json.loads((tmp_path / x / "config.json").read_text()) for x in "ab")
    assert config_a["input"]["sha256"] == config_b["input"]["sha256"]
    weights_a, weights_b = (load_file(tmp_path / x / "adapter" / "adapter_model.safetensors") for x in "ab")
    assert weights_a.keys() == weights_b.keys()
    assert all(weights_a[k].equal(weights_b[k]) for k in weights_a)
    assert any(weights_a[k].abs().sum() > 0 for k in weights_a if "lora_B" in k)  # B starts at zero: it learned


def test_verl_parquet_evaluates_and_writes_parquet(runner, tiny_model, tiny_adapter, tmp_path) -> None:
    parquet = write_parquet(tmp_path / "verl.parquet", verl_rows(3))
    jsonl = write_jsonl(tmp_path / "same.jsonl", [mapped(row) for row in verl_rows(3)])
    common = ["--model", str(tiny_model), "--adapter", f"{tiny_adapter}=lora", "--max-new-tokens", "4"]
    common += ["-m", "bleu", "--bootstrap-resamples", "20", "-q"]
    out = tmp_path / "answers.parquet"
    from_parquet = runner.invoke(app, ["eval", "-i", str(parquet), *VERL_MAP, "-o", str(out), *common])
    assert from_parquet.exit_code == 0, from_parquet.stderr
    assert from_parquet.stdout == ""
    from_jsonl = runner.invoke(app, ["eval", "-i", str(jsonl), *common])
    assert from_jsonl.exit_code == 0, from_jsonl.stderr
    expected = read_jsonl_text(from_jsonl.stdout)
    assert [row for _, row in iter_rows(out)] == expected
    assert [set(r["evaluation"]) for r in expected] == [{"base", "lora", "base@len(lora)"}] * 3


def test_bleuberi_run_on_a_verl_pool_and_a_save_to_disk_heldout(runner, tiny_model, tmp_path) -> None:
    from tests.conftest import tiny_overrides

    pool = write_parquet(tmp_path / "pool.parquet", verl_rows(4))
    heldout = save_to_disk_like(tmp_path / "heldout", [verl_rows(4)[:2], verl_rows(4)[2:3]])
    args = ["run", "-o", str(tmp_path / "run"), "-q"]
    settings = [*tiny_overrides(tiny_model), f'data.pool="{pool}"', f'data.heldout="{heldout}"']
    settings += ['data.prompt_field="prompt"', 'data.reference_field=["reward_model.ground_truth"]']
    settings += ['data.id_field="extra_info.index"', "train.max_steps=1"]
    for item in settings:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert read_jsonl_text(result.stdout)[0]["ran"] == ["select", "train", "eval"]
    selected = read_jsonl_text((tmp_path / "run" / "selected.jsonl").read_text())
    by_id = {str(row["extra_info"]["index"]): row for row in verl_rows(4)}
    assert len(selected) == 2
    for record in selected:
        row = by_id[record["id"]]
        assert record["messages"] == row["prompt"] and record["references"] == [row["reward_model"]["ground_truth"]]
        assert record["reward_model"] == row["reward_model"]
    answers = read_jsonl_text((tmp_path / "run" / "eval" / "records.jsonl").read_text())
    assert [r["id"] for r in answers] == ["0", "1", "2"]


def test_a_folder_data_set_is_hashed_by_its_files(tmp_path) -> None:
    from stages.run.config_file import load_config
    from stages.run.recipe import stage_digests

    heldout = save_to_disk_like(tmp_path / "heldout", [verl_rows(2)])
    mapping = ['data.prompt_field="prompt"', 'data.reference_field=["reward_model.ground_truth"]']
    config = load_config(None, [f'data.heldout="{heldout}"', *mapping])
    before = stage_digests(config)
    shard = heldout / "data-00000-of-00001.arrow"
    table = pa.Table.from_pylist(verl_rows(3))
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    after = stage_digests(config)
    assert before[:2] == after[:2] and before[2] != after[2]  # select and train keep theirs; eval is redone
    unmapped = stage_digests(load_config(None, [f'data.heldout="{heldout}"']))
    assert unmapped[0] != after[0]  # the field map is part of what a stage read
