"""Summaries of `eval` as tables: the same rows feed the Markdown report and the table on stderr.

Scores are shown x100 (as BLEU is usually quoted); the JSON summary keeps the 0..1 scale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.core.files import atomic_path

Table = tuple[str, list[str], list[list[str]]]  # title, headers, rows


def _score(entry: dict[str, Any]) -> str:
    if entry.get("mean") is None:
        return "-"
    low, high = entry["ci95"]
    return f"{100 * entry['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _share(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def eval_tables(summary: dict[str, Any]) -> list[Table]:
    metrics = summary["metrics"]
    systems = summary["systems"]
    judged = "judge_model" in summary
    headers = ["system", *metrics, "tokens mean / median", "truncated"] + (["judge reward"] if judged else [])
    rows = []
    for name, entry in systems.items():
        length = entry["length"]
        tokens = "-" if length["tokens_mean"] is None else f"{length['tokens_mean']:.1f} / {length['tokens_median']:g}"
        row = [name, *(_score(entry["metrics"][m]) for m in metrics), tokens, _share(entry["truncation_rate"])]
        if judged:
            reward = entry["judge_reward"]
            row.append("-" if reward["mean"] is None else f"{reward['mean']:.3f}")
        rows.append(row)
    tables: list[Table] = [(f"Held-out scores x100, mean [95% CI], {summary['prompts']} prompts", headers, rows)]

    others = {name: entry for name, entry in systems.items() if "vs_base" in entry}
    if others:
        judges = (["judge reward"] if judged else []) + (["judge verdict"] if "judge_url" in summary else [])
        win_rows = []
        for name, entry in others.items():
            cells = [_win_cell(entry["vs_base"][m]) for m in metrics]
            if judged:
                cells.append(_win_cell(entry["judge_reward_vs_base"]))
            if "judge_url" in summary:
                cells.append(_win_cell(entry["judge_vs_base"]))
            win_rows.append([name, *cells])
        against = summary.get("baseline", "base")
        tables.append((f"Per prompt against {against}: win / tie / loss", ["system", *metrics, *judges], win_rows))
    return tables


def _win_cell(rates: dict[str, Any]) -> str:
    if rates.get("win") is None:
        return "-"
    cell = f"{_share(rates['win'])} / {_share(rates['tie'])} / {_share(rates['loss'])}"
    return cell + (f" ({rates['invalid']} unreadable)" if rates.get("invalid") else "")


def agreement_tables(summary: dict[str, Any]) -> list[Table]:
    by_k = summary["by_num_references"]
    ks = max((len(v) for v in by_k.values()), default=0)
    headers = ["metric", "agreement", "95% CI", *(f"k={k}" for k in range(1, ks + 1))]
    rows = []
    for name, entry in summary["agreement"].items():
        interval = "-" if entry["ci95"] is None else f"[{100 * entry['ci95'][0]:.1f}, {100 * entry['ci95'][1]:.1f}]"
        per_k = [_share(row["mean"], 1) for row in by_k.get(name, [])] + [""] * (ks - len(by_k.get(name, [])))
        rows.append([name, _share(entry["mean"], 1), interval, *per_k])
    title = (
        f"Agreement with human preference on {summary['pairs']} pairs "
        f"({summary['dropped_both_bad']} 'tie (bothbad)' dropped); k = references used"
    )
    return [(title, headers, rows)]


def markdown(tables: list[Table]) -> str:
    parts = []
    for title, headers, rows in tables:
        lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_report(path: str | Path, summary: dict[str, Any], tables: list[Table]) -> None:
    """`.md`: the Markdown tables; anything else: the summary as JSON. Written atomically."""
    text = markdown(tables) if str(path).endswith(".md") else json.dumps(summary, indent=2) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def print_tables(tables: list[Table], console: Any) -> None:
    from rich.table import Table as RichTable

    for title, headers, rows in tables:
        table = RichTable(title=title, title_justify="left")
        for header in headers:
            table.add_column(header)
        for row in rows:
            table.add_row(*row)
        console.print(table)
