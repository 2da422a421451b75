"""docs/options.md, made from the option declarations (each config field, declared once).

    python -m bleuberi_cli.options_doc > docs/options.md

tests/test_options.py checks that the committed file is what this prints.
"""

from __future__ import annotations

import sys

from bleuberi_cli.config_options import flags_of
from stages.core.declare import Leaf, leaves
from stages.core.records import ReadOptions
from stages.run.config import DEMO, KEYS, SHARED, STAGE_CONFIGS
from stages.split import SplitConfig

COMMANDS: tuple[tuple[str, type, str | None], ...] = (
    ("bleuberi split (not a stage of a run: a run names its pool and held-out files)", SplitConfig, None),
    *((f"bleuberi {stage}", config_class, stage) for stage, config_class in STAGE_CONFIGS.items()),
    ("reading records (split, generate, score, select, train, eval)", ReadOptions, "data"),
)


def _default(leaf: Leaf) -> str:
    if leaf.default is None or leaf.default == []:
        return ""
    if isinstance(leaf.default, list):
        return ", ".join(map(str, leaf.default))
    return str(leaf.default).lower() if isinstance(leaf.default, bool) else str(leaf.default)


def _run_key(leaf: Leaf, stage: str) -> str:
    """The `bleuberi run` key of a stage's option: top level or [engine] for the shared ones, else [stage];
    `(demo)` where the demo overlay sets it."""
    if leaf.tables[-1:] == ("engine",):
        key = f"engine.{leaf.name}"
    else:
        key = leaf.name if leaf.name in SHARED else f"{stage}.{leaf.name}"
    if stage == "data" and key not in KEYS:
        return ""  # where records come from is the command's own (a run names its data files)
    assert key in KEYS, key  # a stage option the run config would not take
    return f"`{key}` (demo)" if key in DEMO else f"`{key}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def options_markdown() -> str:
    lines = [
        "# Options",
        "",
        "Every option of the commands built from a config, made from its declaration "
        "(`python -m bleuberi_cli.options_doc`; do not edit by hand). `bleuberi run` sets the same options "
        "by the config key shown (top-level keys and `[engine]` for every stage), with the same defaults "
        "except where the demo overlay sets another (marked `(demo)`; [recipe.md](recipe.md) lists its values).",
        "[Back to the README](../README.md)",
    ]
    for title, config_class, section in COMMANDS:
        lines += ["", f"## {title}", "", "| option | run key | default | meaning |", "|---|---|---|---|"]
        for leaf in leaves(config_class):
            if not leaf.info.cli:
                continue
            flags = " / ".join(f"`{flag}`" for flag in flags_of(leaf))
            key = _run_key(leaf, section) if section else ""
            default = f"`{_cell(_default(leaf))}`" if _default(leaf) else ""
            lines.append(f"| {_cell(flags)} | {key} | {default} | {_cell(leaf.info.help)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.stdout.write(options_markdown())


if __name__ == "__main__":
    main()
