"""The rungs' cost per 1,000 completions (bleu, emb, bertscore, the judge) and what the judge tells apart.

    python bench/judge_bench.py [--url http://127.0.0.1:8000/v1#smol] [--records 100] [--answers FILE]

Workload: the first --records records of the demo pool, each answered twice: with its own reference (a
right answer) and with the next record's reference (a wrong one, of the same length class). Each metric
scores them as `bleuberi score` does (`score_records`, one process; a judge is handed each chunk of 64
records at once). The encoders load their model first (not timed). The judge is `--url` (default: a vLLM
server started here on the default model, served as `smol`), timed cold (an empty cache) at concurrency 1
and at the default 8, then warm (every grade from the cache).

For the judge it also says what it tells apart: how many right answers it grades above the wrong answer to
the same prompt (ties apart), its nulls, and its mean grade of each. With --answers (a scored file with one
completion per record, e.g. the base model's greedy answers), the rank correlation of its grades with bleu
and emb over those answers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from stages.core.records import read_records
from stages.score import Scorer, score_records

ROOT = Path(__file__).resolve().parent.parent


def workload(count: int) -> list[dict]:
    rows = list(read_records(str(ROOT / "examples" / "data" / "pool.jsonl")))[:count]
    return [
        {**row, "completions": [row["references"][0], rows[(i + 1) % len(rows)]["references"][0]]}
        for i, row in enumerate(rows)
    ]


def timed(spec: str, records: list[dict]) -> tuple[float, list[dict]]:
    """Seconds per 1,000 completions, and the scored records."""
    scorer = Scorer.from_names([spec])
    if not spec.startswith("judge-url"):  # load the encoder before the clock starts
        list(score_records([dict(records[0])], scorer, jobs=1))
    start = time.perf_counter()
    scored = list(score_records([dict(r) for r in records], scorer, jobs=1))
    seconds = time.perf_counter() - start
    return 1000 * seconds / sum(len(r["completions"]) for r in records), scored


def tells_apart(scored: list[dict], spec: str) -> str:
    pairs = [r["scores"][spec] for r in scored]
    both = [(own, other) for own, other in pairs if own is not None and other is not None]
    right = sum(own > other for own, other in both)
    ties = sum(own == other for own, other in both)
    nulls = sum(v is None for pair in pairs for v in pair)
    mean = [sum(p[i] for p in both) / max(len(both), 1) for i in (0, 1)]
    return (
        f"right above wrong {right}/{len(both)} ({ties} ties), nulls {nulls}/{2 * len(pairs)}, "
        f"mean grade right {mean[0]:.3f} wrong {mean[1]:.3f}"
    )


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            result[i] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearmanr(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: Pearson's on the ranks."""
    x, y = ranks(a), ranks(b)
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((i - mx) * (j - my) for i, j in zip(x, y))
    var = (sum((i - mx) ** 2 for i in x) * sum((j - my) ** 2 for j in y)) ** 0.5
    return cov / var if var else float("nan")


def correlation(path: str, spec: str) -> str:
    records = [r for r in read_records(path) if r.get("completions")]
    scorer = Scorer.from_names([spec, "bleu", "emb"])
    scored = list(score_records(records, scorer, jobs=1))
    rows = [(r["scores"][spec][0], r["scores"]["bleu"][0], r["scores"]["emb"][0]) for r in scored]
    rows = [row for row in rows if row[0] is not None]
    judge, bleu, emb = (list(column) for column in zip(*rows))
    return (
        f"{len(rows)} answers graded ({len(records) - len(rows)} nulls): Spearman with bleu "
        f"{spearmanr(judge, bleu):.2f}, with emb {spearmanr(judge, emb):.2f}; bleu with emb {spearmanr(bleu, emb):.2f}"
    )


def judge_url(url: str | None) -> str:
    if url:
        return url
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vllm_server import start_server

    from stages.core.models import resolve_model

    log = Path(tempfile.mkdtemp(prefix="judge-bench-")) / "server.log"
    server = start_server(resolve_model("smollm2-135m").path, log, max_lora_rank=16)
    print(f"vLLM server up after {server.start_seconds:.0f} s ({log})")
    return f"{server.url}#smol"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="the judge's base URL[#MODEL] (default: start vLLM on the default model)")
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--answers", help="a scored file of model answers, for the rank correlations")
    args = parser.parse_args()
    records = workload(args.records)
    print(f"{len(records)} prompts x 2 answers (own reference, next record's reference)")
    for spec in ("bleu", "emb", "bertscore"):
        print(f"{spec:<28} {timed(spec, records)[0]:9.1f} s per 1,000 completions")
    spec = f"judge-url:{judge_url(args.url)}"
    with tempfile.TemporaryDirectory() as cache:
        os.environ["BLEUBERI_JUDGE_CACHE"] = cache
        for concurrency in ("1", "8"):
            os.environ["BLEUBERI_JUDGE_CONCURRENCY"] = concurrency
            for name in Path(cache).iterdir():  # cold: nothing cached
                shutil.rmtree(name)
            cost, scored = timed(spec, records)
            print(f"judge, concurrency {concurrency:<10} {cost:9.1f} s per 1,000 completions (cold)")
        cost, _ = timed(spec, records)
        print(f"judge, from the cache        {cost:9.1f} s per 1,000 completions")
        print(f"judge: {tells_apart(scored, spec)}")
        if args.answers:
            print(f"judge on {args.answers}: {correlation(args.answers, spec)}")


if __name__ == "__main__":
    main()
