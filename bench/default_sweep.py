"""Which `bleuberi run` default teaches the model something that holds on data it was not tuned on?

    python bench/default_sweep.py --extra ../shared/data/seed-tasks-175.jsonl --extra ../shared/data/mt-bench-80.jsonl
    python bench/default_sweep.py --only default,lr1e-4 --seeds 42,7,1234 --extra ...
    python bench/default_sweep.py --report runs/sweep/sweep.jsonl          # the tables again, no work

Each setting is one `bleuberi run` (the embedded model and demo data, its --set overrides on top of
the built-in defaults) into OUT/<setting>-s<seed>, timed as a whole (select, train, eval). The run's
own eval gives the demo held-out figures. Each --extra held-out set (never trained on) is then
answered greedily by the base model (once per set, cached in OUT/_base) and by the run's adapter with
the run's eval settings (`bleuberi generate`), and compared by `bleuberi eval --answers ... --tokenizer`:
the paired difference of every metric with its bootstrap interval, wins / losses with the sign test,
and the length control (the base cut to the trained answers' lengths, in the model's tokens).

Runs with the same select settings and seed share the selection: a finished run's select files are
copied into the next run's folder, which `bleuberi run` then skips (same stage hash). The time
column is the sum of the run's stage times (stages.json: select, train, eval; a copied selection
keeps the time it took), so it is right for a rerun that skips finished stages too.
One line per (setting, seed, set) goes to OUT/sweep.jsonl as soon as it is known, so a sweep cut
short keeps its figures; a setting whose row is there is not run again (delete the line to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEMO = "demo"
METRIC = "bleu"  # the reward the verdict is about; the other metrics are reported beside it

# name -> --set overrides on top of `bleuberi run`'s defaults (today's default is "default")
SETTINGS: dict[str, list[str]] = {
    "default": [],
    "lr1e-4": ["train.learning_rate=1e-4"],
    "lr1e-4-beta0": ["train.learning_rate=1e-4", "train.beta=0.0"],
    "len96-20steps": ["train.max_completion_length=96", "train.max_steps=20", "eval.max_new_tokens=96"],
    "mask-truncated": ["train.mask_truncated=true"],
    "bleu-paper": ['train.reward=["bleu-paper"]'],
    "bleu+rouge": ['train.reward=["bleu", "rouge-l"]'],
    "bleu+chrf": ['train.reward=["bleu", "chrf"]'],
    "g8-2prompts": ["train.num_generations=8"],
    "lr1e-4-60steps": ["train.learning_rate=1e-4", "train.max_steps=60", "train.save_steps=20"],
    "60steps": ["train.max_steps=60", "train.save_steps=20"],
    "60steps-128prompts": ["select.num=128", "train.max_steps=60", "train.save_steps=20"],
    "len96-30steps": ["train.max_completion_length=96", "eval.max_new_tokens=96"],
}
SELECT_FILES = ("pool.generated.jsonl", "pool.scored.jsonl", "selected.jsonl")


def bleuberi(*args: str, stdout: Any = None) -> None:
    """One bleuberi command in this interpreter (no shell): its stderr goes to ours."""
    subprocess.run([sys.executable, "-m", "bleuberi_cli", *args], check=True, stdout=stdout)


def setting_value(overrides: list[str], key: str, default: str) -> str:
    for item in overrides:
        name, _, value = item.partition("=")
        if name == key:
            return value
    return default


def copy_selection(source: Path, target: Path) -> float:
    """A finished run's selection into a new run folder; returns the select stage's recorded seconds."""
    target.mkdir(parents=True, exist_ok=True)
    for name in SELECT_FILES:
        shutil.copy2(source / name, target / name)
    ledger = json.loads((source / "stages.json").read_text())
    (target / "stages.json").write_text(json.dumps({"select": ledger["select"]}, indent=2) + "\n")
    return float(ledger["select"].get("seconds", 0.0))


def selects_by_default(name: str) -> bool:
    return not any(o.startswith(("select.", "data.")) for o in SETTINGS[name])


def finished_selections(out: Path) -> dict[int, Path]:
    """Run folders of an earlier sweep whose default selection is done, by seed: donors for this one."""
    donors: dict[int, Path] = {}
    for name in (n for n in SETTINGS if selects_by_default(n)):
        for ledger in out.glob(f"{name}-s*/stages.json"):
            if json.loads(ledger.read_text()).get("select", {}).get("done"):
                donors.setdefault(int(ledger.parent.name.rpartition("-s")[2]), ledger.parent)
    return donors


def run_setting(name: str, seed: int, out: Path, donors: dict[int, Path]) -> tuple[Path, float]:
    """`bleuberi run` for one setting and seed; returns the run folder and its time (select included)."""
    overrides = [*SETTINGS[name], f"seed={seed}"]
    run_dir = out / f"{name}-s{seed}"
    copied = 0.0
    default_select = selects_by_default(name)
    if seed in donors and default_select and not (run_dir / "stages.json").exists():
        copied = copy_selection(donors[seed], run_dir)
    args = ["run", "-o", str(run_dir), "-q"]
    for item in overrides:
        args += ["--set", item]
    print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: bleuberi run", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.summary.json", "wb") as summary:
        bleuberi(*args, stdout=summary)
    wall = time.perf_counter() - start + copied
    # the stages' own times (a copied selection keeps the time it took): right also for a rerun that skips
    ledger = json.loads((run_dir / "stages.json").read_text())
    seconds = sum(entry.get("seconds", 0.0) for entry in ledger.values()) or wall
    if default_select:
        donors.setdefault(seed, run_dir)
    return run_dir, seconds


def answers(held: Path, target: Path, tokens: str, adapter: Path | None) -> None:
    if target.exists():
        return
    args = ["generate", "-i", str(held), "-o", str(target), "--temperature", "0", "--max-new-tokens", tokens]
    args += ["--max-prompt-length", "256", "--batch-size", "16", "-q"]
    bleuberi(*args, *(["--adapter", str(adapter)] if adapter else []))


def compare(held: Path, base: Path, trained: Path, report: Path, metrics: list[str]) -> dict[str, Any]:
    args = ["eval", "-i", str(held), "--answers", f"base={base}", "--answers", f"trained={trained}"]
    args += ["--tokenizer", "smollm2-135m", "--report", str(report), "-q"]
    for metric in metrics:
        args += ["-m", metric]
    bleuberi(*args, stdout=subprocess.DEVNULL)
    return json.loads(report.read_text())


def row(summary: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The figures of one comparison: per metric the difference and its interval, and the verdict."""
    from stages.eval.report import gain_status, verdict

    trained = summary["systems"]["trained"]
    return {
        **fields,
        "prompts": summary["prompts"],
        "differences": {m: trained["vs_base"][m]["difference"] for m in summary["metrics"]},
        "status": {m: gain_status(trained, m) for m in summary["metrics"]},
        "win": trained["vs_base"][METRIC]["win"],
        "loss": trained["vs_base"][METRIC]["loss"],
        "sign_p": trained["vs_base"][METRIC]["sign_p"],
        "length_control": trained["vs_length_control"][METRIC]["difference"],
        "tokens": {
            "base": summary["systems"]["base"]["length"]["tokens_mean"],
            "trained": trained["length"]["tokens_mean"],
        },
        "verdict": verdict(summary, "trained", METRIC),
    }


def sweep(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "sweep.jsonl"
    done = {(r["setting"], r["seed"], r["set"]) for r in read_rows(results)}
    donors = finished_selections(out)
    names = args.only.split(",") if args.only else list(SETTINGS)
    seeds = [int(s) for s in args.seeds.split(",")]
    extras = [Path(p).resolve() for p in args.extra]
    for seed in seeds:
        for name in names:
            wanted = [DEMO, *(p.stem for p in extras)]
            if all((name, seed, s) in done for s in wanted):
                continue
            run_dir, seconds = run_setting(name, seed, out, donors)
            summary = json.loads((run_dir / "eval" / "report.json").read_text())
            base_row = {"setting": name, "seed": seed, "overrides": SETTINGS[name], "seconds": round(seconds, 1)}
            if (name, seed, DEMO) not in done:
                append(results, row(summary, **base_row, set=DEMO))
            tokens = setting_value(SETTINGS[name], "eval.max_new_tokens", "48")
            for held in (h for h in extras if (name, seed, h.stem) not in done):
                base = out / "_base" / f"{held.stem}-{tokens}.jsonl"
                base.parent.mkdir(exist_ok=True)
                answers(held, base, tokens, None)
                trained = run_dir / f"{held.stem}.answers.jsonl"
                answers(held, trained, tokens, run_dir / "train" / "adapter")
                report = run_dir / f"{held.stem}.report.json"
                append(
                    results, row(compare(held, base, trained, report, summary["metrics"]), **base_row, set=held.stem)
                )
            print_report(read_rows(results))


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _interval(entry: dict[str, Any]) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:+.4f} [{low:+.4f}, {high:+.4f}]"


def print_report(rows: list[dict[str, Any]]) -> None:
    """Markdown: one table per held-out set, one row per setting and seed."""
    for name in dict.fromkeys(r["set"] for r in rows):
        prompts = next(r["prompts"] for r in rows if r["set"] == name)
        print(f"\n**{name}** ({prompts} prompts; {METRIC} gain of the trained model over the base)\n")
        header = ["setting", "seed", "time", f"{METRIC} gain [95% CI]", "vs base cut to length", "status"]
        header += ["wins / losses (p)", "tokens base -> trained", "other metrics (gain, status)"]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for r in (r for r in rows if r["set"] == name):
            others = ", ".join(
                f"{m} {d['mean']:+.3f} ({r['status'][m]})" for m, d in r["differences"].items() if m != METRIC
            )
            cells = [
                r["setting"],
                str(r["seed"]),
                f"{r['seconds'] / 60:.1f} min",
                _interval(r["differences"][METRIC]),
                _interval(r["length_control"]),
                r["status"][METRIC],
                f"{100 * r['win']:.0f}% / {100 * r['loss']:.0f}% (p={r['sign_p']:.2g})",
                f"{r['tokens']['base']:.0f} -> {r['tokens']['trained']:.0f}",
                others,
            ]
            print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/sweep", help="run folders and sweep.jsonl (default runs/sweep)")
    parser.add_argument("--only", help=f"comma-separated settings (default all: {', '.join(SETTINGS)})")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds (default 42)")
    parser.add_argument("--extra", action="append", default=[], help="another held-out JSONL; repeatable")
    parser.add_argument("--report", metavar="SWEEP_JSONL", help="print the tables of a sweep.jsonl and exit")
    args = parser.parse_args()
    if args.report:
        print_report(read_rows(Path(args.report)))
        return
    sweep(args)


if __name__ == "__main__":
    main()
