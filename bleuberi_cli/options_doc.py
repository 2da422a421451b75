"""docs/options.md, made from the option declarations (each config field, declared once).

    python -m bleuberi_cli.options_doc > docs/options.md

tests/test_options.py checks that the committed file is what this prints.
"""

from __future__ import annotations

import sys

from bleuberi_cli.config_options import flags_of
from stages.core.options import Leaf, leaves
from stages.core.records import ReadOptions
from stages.eval.config import EvalConfig
from stages.generate import GenerateConfig
from stages.run.config import KEYS, SHARED
from stages.train.config import TrainConfig

COMMANDS = (
    ("bleuberi train", TrainConfig, "train"),
    ("bleuberi generate", GenerateConfig, None),
    ("bleuberi eval", EvalConfig, None),
    ("reading records (generate, score, select, train, eval)", ReadOptions, None),
)


def _default(leaf: Leaf) -> str:
    if leaf.default is None or leaf.default == []:
        return ""
    if isinstance(leaf.default, list):
        return ", ".join(map(str, leaf.default))
    return str(leaf.default).lower() if isinstance(leaf.default, bool) else str(leaf.default)


def _run_key(leaf: Leaf) -> str:
    """The `bleuberi run` key of a train option: top level or [engine] for the shared ones, else [train]."""
    if leaf.path == ("engine",):
        key = f"engine.{leaf.name}"
    else:
        key = leaf.name if leaf.name in SHARED else f"train.{leaf.name}"
    assert key in KEYS, key  # a train option the run config would not take
    return key


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def options_markdown() -> str:
    lines = [
        "# Options",
        "",
        "Every option of the commands built from a config, made from its declaration "
        "(`python -m bleuberi_cli.options_doc`; do not edit by hand). `bleuberi run` sets the same options "
        "by the config key shown (top-level keys and `[engine]` for every stage).",
    ]
    for title, config_class, section in COMMANDS:
        lines += ["", f"## {title}", "", "| option | run key | default | meaning |", "|---|---|---|---|"]
        for leaf in leaves(config_class):
            if not leaf.info.cli:
                continue
            flags = " / ".join(f"`{flag}`" for flag in flags_of(leaf))
            key = f"`{_run_key(leaf)}`" if section else ""
            default = f"`{_cell(_default(leaf))}`" if _default(leaf) else ""
            lines.append(f"| {_cell(flags)} | {key} | {default} | {_cell(leaf.info.help)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.stdout.write(options_markdown())


if __name__ == "__main__":
    main()
