"""`bleuberi split`: one record file into a training pool and a held-out set that share no id."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bleuberi_cli.common import QuietOpt, read_all_records, say
from bleuberi_cli.config_options import cli_command
from stages.core.errors import UsageError
from stages.core.formats import open_writer
from stages.core.preflight import Output, preflight
from stages.core.records import ReadOptions
from stages.split import SplitConfig, split_records

HELP = """Split one record file into a training pool and a held-out set, by a seed, with no id in both.

Held out are the first --held-out records of a ranking by a seeded hash of their ids, so the split depends
only on the ids and the seed, never on the order of the file: the same command gives the same two files.
Both keep the input order and the records as they are. Train on the pool, evaluate on the held-out set:
the held-out set is never selected from or trained on. Reads the whole file into memory.

\b
Examples:
  bleuberi split -i mine.jsonl --pool pool.jsonl --heldout heldout.jsonl              # a fifth held out
  bleuberi split -i mine.jsonl --held-out 40 --seed 7 --pool pool.jsonl --heldout heldout.jsonl
  bleuberi generate -i pool.jsonl --temperature 0 | bleuberi score | bleuberi select -n 64 > hard.jsonl
"""


@cli_command({"config": SplitConfig, "reading": ReadOptions})
def split(
    config: SplitConfig,
    reading: ReadOptions,
    pool: Annotated[
        str,
        typer.Option("--pool", metavar="FILE", help="Where the training pool goes (JSONL, or FILE.parquet)."),
    ],
    heldout: Annotated[
        str,
        typer.Option("--heldout", metavar="FILE", help="Where the held-out set goes (JSONL, or FILE.parquet)."),
    ],
    quiet: QuietOpt = False,
) -> None:
    if Path(pool).resolve() == Path(heldout).resolve():
        raise UsageError(f"--pool and --heldout are the same file ({pool}): give each part its own")
    if reading.input not in (None, "-") and Path(reading.input).resolve() in (
        Path(p).resolve() for p in (pool, heldout)
    ):
        raise UsageError(f"{reading.input}: an output of split would replace its input: write the parts elsewhere")
    preflight(inputs=[reading.input], outputs=[Output(pool, "--pool"), Output(heldout, "--heldout")])
    records = read_all_records(reading, quiet=quiet, purpose="split", references_optional=True, needed=True)
    if len(records) < 2:
        raise UsageError(f"{len(records)} record: a split needs at least 2 (one for each part)")
    trained_on, held = split_records(records, config)
    for path, part in ((pool, trained_on), (heldout, held)):
        with open_writer(path) as writer:
            for record in part:
                writer.write(record)
    say(
        f"split {len(records)} records (seed {config.seed}): {len(trained_on)} to {pool}, {len(held)} held out "
        f"to {heldout}; no id is in both",
        quiet=quiet,
    )
