"""Check `bleuberi eval --answers` on the BLEUBERI paper's own answers to the 80 MT-Bench questions.

    python bench/paper_answers.py ../shared/data/mt-bench-80.jsonl ../shared/data/mt-bench-80-paper-answers.jsonl

The answers file holds every system's answers (field `system`); this script writes one answers file per
system into a temporary folder (the data never enters the repository), runs
`bleuberi eval -i HELDOUT --answers NAME=FILE ... --baseline base` in a subprocess, and checks that the
mean sacrebleu BLEU x100 of each system, rounded to one decimal, is the number published with the
paper's data: base 12.5, GRPO-BLEU 22.3, GRPO-RM 18.6, SFT 18.2, GRPO-BLEU+RM 21.8, Qwen2.5-7B-Instruct
27.2. It also checks that no model was configured (summary `model` is null: nothing was generated),
prints the tables and exits 1 on any mismatch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

EXPECTED = {
    "base": 12.5,
    "bleuberi-grpo-bleu": 22.3,
    "grpo-rm": 18.6,
    "sft": 18.2,
    "grpo-bleu-rm": 21.8,
    "instruct": 27.2,
}


def main(heldout: str, answers: str) -> int:
    by_system: dict[str, list[dict]] = defaultdict(list)
    for line in Path(answers).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_system[row["system"]].append({"id": row["id"], "completion": row["completion"]})
    with tempfile.TemporaryDirectory() as tmp:
        specs = []
        for system, rows in by_system.items():
            path = Path(tmp) / f"{system}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            specs += ["--answers", f"{system}={path}"]
        report = Path(tmp) / "report.json"
        argv = [sys.executable, "-m", "bleuberi_cli", "eval", "-i", heldout, *specs, "--baseline", "base"]
        argv += ["--report", str(report), "-o", str(Path(tmp) / "records.jsonl")]
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        summary = json.loads(report.read_text())
    print(done.stderr)
    systems, prompts = len(by_system), summary["prompts"]
    print(f"eval of {systems} answer systems x {prompts} prompts: {seconds:.1f}s, model: {summary['model']}")
    failures = 0
    for system, expected in EXPECTED.items():
        mean = 100 * summary["systems"][system]["metrics"]["bleu"]["mean"]
        ok = round(mean, 1) == expected
        failures += not ok
        verdict = "ok" if ok else "MISMATCH"
        print(f"{system:<20} bleu x100 {mean:8.4f} -> {round(mean, 1):5.1f}  expected {expected:5.1f}  {verdict}")
    if summary["model"] is not None:
        print("a model was configured although only --answers were given")
        failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
