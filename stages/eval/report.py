"""Summaries of `eval` as tables: the same rows feed the Markdown report and the table on stderr.

Scores are shown x100 (as BLEU is usually quoted), in the tables and in the verdict line alike; the JSON
summary keeps the 0..1 scale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.core.files import atomic_path
from stages.eval.stats import SIGNIFICANCE, excludes_zero

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
            reward = entry.get("judge_reward", {"mean": None})  # length controls are not judged
            row.append("-" if reward["mean"] is None else f"{reward['mean']:.3f}")
        rows.append(row)
    tables: list[Table] = [(f"Held-out scores x100, mean [95% CI], {summary['prompts']} prompts", headers, rows)]

    against = summary.get("baseline", "base")
    others = {name: entry for name, entry in systems.items() if "vs_base" in entry}
    if others:
        tables.append(_difference_table(others, metrics, against))
        tables.append(_win_table(others, summary, against))
    controlled = {name: entry for name, entry in others.items() if "vs_length_control" in entry}
    if controlled:
        rows = [[name, *(_control_cell(entry, m, against) for m in metrics)] for name, entry in controlled.items()]
        title = (
            f"Length control: each system minus {against}'s answers cut to its lengths, x100 [95% CI]; in "
            f"brackets, the system against {against} and against those cut answers (cut {against}): a gain that "
            f"survives the length control holds against both; length only: the cut {against} differs from "
            f"{against} as much, so the difference is a change of length"
        )
        tables.append((title, ["system", *metrics], rows))
    return tables


def _difference_table(others: dict[str, Any], metrics: list[str], against: str) -> Table:
    rows = [[name, *(_signed(entry["vs_base"][m]["difference"]) for m in metrics)] for name, entry in others.items()]
    title = f"Difference from {against}, x100, mean [paired bootstrap 95% CI]"
    return (title, ["system", *metrics], rows)


def _win_table(others: dict[str, Any], summary: dict[str, Any], against: str) -> Table:
    metrics = summary["metrics"]
    judged = "judge_model" in summary
    judges = (["judge reward"] if judged else []) + (["judge verdict"] if "judge_url" in summary else [])
    rows = []
    for name, entry in others.items():
        cells = [_win_cell(entry["vs_base"][m]) for m in metrics]
        if judged:
            cells.append(_win_cell(entry.get("judge_reward_vs_base", {})))
        if "judge_url" in summary:
            cells.append(_win_cell(entry.get("judge_vs_base", {})))
        rows.append([name, *cells])
    title = f"Per prompt against {against}: win / tie / loss (sign test p, ties left out)"
    return (title, ["system", *metrics, *judges], rows)


def _signed(entry: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if entry.get("mean") is None:
        return "-"
    low, high = entry["ci95"]
    mean, low_text, high_text = (_fixed(scale * value, digits) for value in (entry["mean"], low, high))
    return f"{'' if mean.startswith('-') else '+'}{mean} [{low_text}, {high_text}]"


def _fixed(value: float, digits: int) -> str:
    """`value` to `digits` decimals, with up to three more when those would show a nonzero value as 0: an
    interval bound of 0.0003 printed "0.000" would read as touching zero when it does not."""
    for extra in range(4):
        text = f"{value:.{digits + extra}f}"
        if value == 0 or float(text) != 0:
            return text
    return text


def _control_cell(entry: dict[str, Any], metric: str, against: str = "base") -> str:
    """The difference from the cut baseline, labelled with what both intervals say: the one over the
    baseline and the one over the cut baseline (the figure in the cell), so no label contradicts it."""
    cell = _signed(entry["vs_length_control"][metric]["difference"])
    label = control_label(entry, metric, against)
    return f"{cell} ({label})" if label else cell


# Each label by (side of the gain over the baseline, side of the gain over the cut baseline): 1 the interval
# lies above 0, 0 it includes 0, -1 it lies below 0. Worded as `verdict` words the first interval ("gain",
# "no gain", "worse"); the cut baseline is named plainly, as "cut base" for a baseline called base.
CONTROL_LABELS = {
    (1, 1): "gain over {a}, survives the length control",
    (1, 0): "gain over {a}, length only",  # the cut baseline gains as much: the shorter answers did it
    (1, -1): "gain over {a}, length only; worse than cut {a}",  # cutting alone would gain more
    (0, 1): "no gain over {a}, but a gain over cut {a}",  # shorter, and still above the baseline cut as short
    (0, 0): "no gain over {a} or cut {a}",
    (0, -1): "no gain over {a}, worse than cut {a}",
    (-1, 1): "worse than {a}, but a gain over cut {a}",  # the loss is the shorter length; at that length it wins
    (-1, 0): "worse than {a}, length only",  # the cut baseline loses as much
    (-1, -1): "worse than {a} and than cut {a}",
}


def control_label(entry: dict[str, Any], metric: str, against: str = "base") -> str | None:
    """What a system's two intervals in `metric` say together (see CONTROL_LABELS); None without both."""
    base = _side(entry["vs_base"][metric]["difference"])
    control = _side(entry["vs_length_control"][metric]["difference"])
    if base is None or control is None:
        return None
    return CONTROL_LABELS[base, control].format(a=against)


def _side(difference: dict[str, Any]) -> int | None:
    """1 when the interval lies above 0 (as `excludes_zero` has it), -1 below 0, 0 when it includes 0;
    None without an interval (no prompts)."""
    interval = difference.get("ci95")
    if not interval:
        return None
    return 1 if excludes_zero(difference) else -1 if interval[1] < 0 else 0


def gain_status(entry: dict[str, Any], metric: str) -> str:
    """`survives`, `length` (a gain over the base that the cut base gets too, or more), `gain` (no length
    control), `no gain` or `loss`: the gain over the base, for the verdict line."""
    side = _side(entry["vs_base"][metric]["difference"])
    if side != 1:
        return "loss" if side == -1 else "no gain"
    control = entry.get("vs_length_control", {}).get(metric)
    if control is None:
        return "gain"
    return "survives" if _side(control["difference"]) == 1 else "length"


def verdict(summary: dict[str, Any], system: str, metric: str) -> str:
    """One line on a system against the baseline in one metric: is the gain real, and is it only length?
    Differences are x100, as in the tables."""
    entry = summary["systems"][system]
    against = summary.get("baseline", "base")
    comparison = entry["vs_base"][metric]
    if comparison["difference"]["mean"] is None:
        return f"{metric}: no prompts, nothing to compare"
    difference = _signed(comparison["difference"])
    status = gain_status(entry, metric)
    control = ""
    if status in ("survives", "length"):
        control = _signed(entry["vs_length_control"][metric]["difference"])
    head = {
        "survives": f"gain in {metric} (x100) {difference} over {against}, survives the length control "
        f"({control} over {against} cut to the same lengths)",
        "gain": f"gain in {metric} (x100) {difference} over {against} (no length control)",
        "length": f"gain in {metric} (x100) {difference} over {against}, but not over {against} cut to the same "
        f"lengths ({control}): a change of length, not learning",
        "no gain": f"no significant gain in mean {metric} (x100): {difference} over {against} "
        "(the interval includes 0)",
        "loss": f"{metric} (x100) got worse: {difference} against {against}",
    }[status]
    return head + _per_prompt(comparison, status)


def _per_prompt(comparison: dict[str, Any], status: str) -> str:
    """Wins and losses with the sign test, and which way it points when it is significant: the mean can
    rise on a few large wins while most prompts get worse, and a reader of one line should not miss that.
    When the sign test points the other way from the mean's verdict the line says "though", so the two
    do not read as a contradiction."""
    rates = f"wins {_share(comparison['win'])} / losses {_share(comparison['loss'])}"
    p = comparison.get("sign_p")
    if p is None:
        return f"; {rates}"
    test = f"sign test p={p:.2g}"
    if p >= SIGNIFICANCE:
        return f"; {rates}, {test}"
    more, fewer = ("wins", "losses") if comparison["win"] > comparison["loss"] else ("losses", "wins")
    mean_gain = status in ("survives", "gain", "length")
    if (more == "wins") == mean_gain:
        return f"; {rates}, {test} (significantly more {more})"
    return f"; per prompt, though, significantly more {more} than {fewer}: {rates}, {test}"


def _win_cell(rates: dict[str, Any]) -> str:
    if rates.get("win") is None:
        return "-"
    cell = f"{_share(rates['win'])} / {_share(rates['tie'])} / {_share(rates['loss'])}"
    if rates.get("sign_p") is not None:
        cell += f" (p={rates['sign_p']:.2g})"
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
    """Each table under its title (a line of its own: never cut to the table's width). A table too wide
    for the console is printed turned, one row per column, so no header or cell is cut either (and one
    still too wide folds its cells rather than cutting them)."""
    for title, headers, rows in tables:
        table = _rich_table(headers, rows)
        if rows and _width(table, console) > console.width:
            table = _rich_table(*_turned(headers, rows))
        console.print(title, markup=False)
        console.print(table)


def _rich_table(headers: list[str], rows: list[list[str]]) -> Any:
    from rich import box
    from rich.table import Table as RichTable

    table = RichTable(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _width(table: Any, console: Any) -> int:
    """The table's width with no cell wrapped."""
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update(width=10**6), table).maximum


def _turned(headers: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
    """Rows become columns: the first column's cells head the new columns."""
    turned_headers = ["", *(row[0] for row in rows)]
    turned_rows = [[header, *(row[i] for row in rows)] for i, header in enumerate(headers) if i > 0]
    return turned_headers, turned_rows
