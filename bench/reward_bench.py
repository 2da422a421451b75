"""Reward throughput per completion for every reward, at G=8 completions and 5 references per prompt.

    python bench/reward_bench.py [--groups 100] [--model-groups 8] [--device cpu]

Workload (deterministic, seed 0): groups of 8 completions and 5 references of 20-300 words each (the
text generator of bench/score_bench.py). Each reward scores group by group through `Scorer.score`, as
the trainer does (references prepared once per group: n-gram counts, reference embeddings). String
metrics run `--groups` groups; model-based rewards `--model-groups` groups, after one warm-up group
that loads the model (loading is not timed). Prints completions/s per reward and the slowdown against
`bleu` measured in the same invocation.

The `rm` row uses a stand-in reward model (bench/stand_in_rm.py: the embedded SmolLM2-135M with a
random one-label classification head), written to a temporary folder: the cost of a 135M-parameter
RM, not its judgement. The `rm-url` row scores against a stand-in server in this process that returns the
completion length: it measures the client's protocol cost (JSON, HTTP on 127.0.0.1), not a model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from stages.score import Scorer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stand_in_rm import build as build_stand_in_rm

G, REFERENCES = 8, 5
VOCAB = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if so no will more can out up "
    "model answer data text list step first second result value example because however therefore"
).split()
PUNCT = [",", ".", ";", ":", "!", "?", "(", ")", "-", "3.5", "1,000", "2024"]
PROMPT = [{"role": "user", "content": "Explain the result step by step, with an example."}]


def _text(rng: random.Random, low: int = 20, high: int = 300) -> str:
    return " ".join(
        rng.choice(PUNCT) if rng.random() < 0.12 else rng.choice(VOCAB) for _ in range(rng.randint(low, high))
    )


def workload(groups: int) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(0)
    return [([_text(rng) for _ in range(G)], [_text(rng) for _ in range(REFERENCES)]) for _ in range(groups)]


@contextlib.contextmanager
def length_server():
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            payload = json.dumps({"scores": [len(c[-1]["content"]) for c in body["batch_conversations"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score"
    finally:
        server.shutdown()
        server.server_close()


def rate(spec: str, groups: list[tuple[list[str], list[str]]], device: str) -> float:
    scorer = Scorer.from_names([spec], device=device)
    completions, references = groups[0]
    scorer.score(completions, references, messages=PROMPT)  # warm-up: loads a model where there is one
    start = time.perf_counter()
    for completions, references in groups[1:]:
        scorer.score(completions, references, messages=PROMPT)
    return (len(groups) - 1) * G / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--model-groups", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    text_groups = workload(args.groups + 1)
    model_groups = text_groups[: args.model_groups + 1]
    print(f"torch threads: {torch.get_num_threads()}; G={G}, {REFERENCES} references, device {args.device}")
    with tempfile.TemporaryDirectory() as tmp, length_server() as url:
        rm = build_stand_in_rm(Path(tmp) / "rm")
        rows = [(name, text_groups) for name in ("bleu", "bleu-paper", "chrf", "rouge-l", "bleu-rouge-f1", "format")]
        rows += [("bertscore", model_groups), ("emb", model_groups), (f"rm:{rm}", model_groups)]
        rows += [(f"rm-url:{url}", text_groups)]
        results = {spec: rate(spec, groups, args.device) for spec, groups in rows}
    bleu = results["bleu"]
    print(f"{'reward':<16} {'completions/s':>14} {'ms/completion':>14} {'x slower than bleu':>19}")
    for spec, value in results.items():
        name = "rm (135M)" if spec.startswith("rm:") else "rm-url (local)" if spec.startswith("rm-url:") else spec
        print(f"{name:<16} {value:14.1f} {1000 / value:14.2f} {bleu / value:19.1f}")


if __name__ == "__main__":
    main()
