"""Scoring throughput: a loop of sacrebleu.sentence_bleu against bleuberi's scorer, in one run.

Workload (deterministic, seed 0): 1,000 records, 8 completions of 20-300 words each, 5 references of
20-300 words each, drawn from a vocabulary with punctuation, numbers and a little non-ASCII text.

    python bench/score_bench.py [--records 1000] [--repeats 3] [--process-records 600]

Prints completions/s for (a) sacrebleu.sentence_bleu per completion, (b) our scorer with 1 job,
(c) our scorer with all jobs through the streaming `score_records` API, the ratios against (a), and
the largest absolute difference between our scores and sacrebleu's. Target: ratio >= 10 with one job,
max abs difference <= 1e-12. Times are medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import sacrebleu

from stages.core.threads import available_cores
from stages.score import Scorer, score_records

VOCAB = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if so no will more can out up "
    "model answer data text list step first second result value example because however therefore "
    "café naïve résumé Zürich 東京 über"
).split()
PUNCT = [",", ".", ";", ":", "!", "?", "(", ")", '"', "'", "-", "3.5", "1,000", "2024", "e.g.", "&"]


def _text(rng: random.Random, low: int, high: int) -> str:
    words = []
    for _ in range(rng.randint(low, high)):
        words.append(rng.choice(PUNCT) if rng.random() < 0.12 else rng.choice(VOCAB))
    return " ".join(words)


def make_workload(n_records: int, n_completions: int = 8, n_refs: int = 5, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "id": str(i),
            "prompt": f"prompt {i}",
            "references": [_text(rng, 20, 300) for _ in range(n_refs)],
            "completions": [_text(rng, 20, 300) for _ in range(n_completions)],
        }
        for i in range(n_records)
    ]


def _median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--process-records", type=int, default=600, help="records (x 8 completions) for the whole-process run; 0: none"
    )
    args = parser.parse_args()

    records = make_workload(args.records)
    n = sum(len(r["completions"]) for r in records)
    jobs = available_cores()

    def baseline() -> list[float]:
        return [sacrebleu.sentence_bleu(c, r["references"]).score / 100 for r in records for c in r["completions"]]

    scorer = Scorer(["bleu"])

    def ours_one_job() -> list[float]:
        return [x for r in records for x in scorer.rewards(r["completions"], r["references"])]

    def ours_all_jobs() -> list[float]:
        fresh = ({**r} for r in records)
        return [x for r in score_records(fresh, scorer, jobs=jobs) for x in r["scores"]["bleu"]]

    t_base, base_scores = _median_seconds(baseline, args.repeats)
    t_one, one_scores = _median_seconds(ours_one_job, args.repeats)
    t_all, all_scores = _median_seconds(ours_all_jobs, args.repeats)
    max_diff = max(
        max(abs(a - b) for a, b in zip(base_scores, one_scores)),
        max(abs(a - b) for a, b in zip(base_scores, all_scores)),
    )
    print(f"workload: {args.records} records x 8 completions (20-300 words), 5 references; median of {args.repeats}")
    print(f"(a) sacrebleu.sentence_bleu loop : {n / t_base:10.0f} completions/s")
    print(f"(b) bleuberi scorer, 1 job       : {n / t_one:10.0f} completions/s   ratio {t_base / t_one:5.1f}x")
    print(f"(c) bleuberi scorer, {jobs} jobs      : {n / t_all:10.0f} completions/s   ratio {t_base / t_all:5.1f}x")
    print(f"max |ours - sacrebleu| = {max_diff:.3g}   (target <= 1e-12; ratio target >= 10 with 1 job)")
    if args.process_records:
        whole_process(args.process_records, args.repeats)


def whole_process(n_records: int, repeats: int) -> None:
    """`bleuberi score` as a user runs it (a new process: start-up, imports, reading, scoring, writing) against
    the sacrebleu loop on the same completions (issue 32: at least 8x on 4,800 completions x 5 references)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import orjson

    records = make_workload(n_records)
    n = sum(len(r["completions"]) for r in records)
    t_base, _ = _median_seconds(
        lambda: [sacrebleu.sentence_bleu(c, r["references"]) for r in records for c in r["completions"]], repeats
    )
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "in.jsonl"
        data.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
        argv = [sys.executable, "-m", "bleuberi_cli", "score", "-i", str(data), "-o", str(Path(folder) / "out.jsonl")]
        t_process, _ = _median_seconds(lambda: subprocess.run([*argv, "-q"], check=True), repeats)
    print(
        f"whole process, {n} completions x 5 references: sacrebleu loop {t_base:.2f} s, `bleuberi score` "
        f"{t_process:.2f} s: {t_base / t_process:.1f}x (target >= 8x)"
    )


if __name__ == "__main__":
    main()
