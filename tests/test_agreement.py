"""`eval --agreement` on the example pairs, with results worked out by hand.

examples/pairs.jsonl has 13 pairs; pair-11 is `tie (bothbad)` and is dropped. Of the other 12 the
human winner is a in 7, b in 3, a tie in 2. By hand (13a tokens, case-sensitive):
- BLEU agrees on 01 02 03 05 07 10 12 (7/12). It disagrees where word overlap misleads it: 06 (the
  wrong answer repeats the reference's words), 09 ("12 times 12 is 124" shares more with the
  reference than "It equals 144"), 13 ("Positive." vs "positive"), and the human ties 04 and 08.
- With only the first reference, pair 12's answers ("2000 metres" vs "200 metres") tie against
  "2,000 metres": BLEU agrees on 6/12; the second reference "That is 2000 metres." makes it 7/12.
- ROUGE-L (punctuation dropped) also ties pair 12 with both references: 6/12.
- `longer` agrees on 02 07 10 12 only (4/12).
"""

from __future__ import annotations

import json

import pytest

from bleuberi_cli.app import app
from stages.core.errors import InputError
from stages.eval.agreement import PairStats, measure_agreement, read_pairs
from tests.conftest import EXAMPLES, read_jsonl_text, write_jsonl

PAIRS = EXAMPLES / "pairs.jsonl"


@pytest.fixture(scope="module")
def result():
    stats = PairStats()
    pairs = list(read_pairs(PAIRS, stats=stats))
    return measure_agreement(pairs, ["bleu", "rouge-l"], seed=42, dropped_both_bad=stats.dropped_both_bad)


def test_hand_checked_agreement(result) -> None:
    summary = result.summary
    assert summary["pairs"] == 12 and summary["dropped_both_bad"] == 1
    assert summary["human_winners"] == {"a": 7, "b": 3, "tie": 2}
    agreement = summary["agreement"]
    assert agreement["bleu"]["mean"] == pytest.approx(7 / 12)
    assert agreement["rouge-l"]["mean"] == pytest.approx(6 / 12)
    assert agreement["longer"]["mean"] == pytest.approx(4 / 12)
    agreed = {r["id"] for r in result.records if r["agreement"]["metrics"]["bleu"]["agrees"]}
    assert agreed == {f"pair-{n}" for n in ("01", "02", "03", "05", "07", "10", "12")}
    by_k = summary["by_num_references"]["bleu"]
    assert [row["k"] for row in by_k] == [1, 2]
    assert [row["mean"] for row in by_k] == pytest.approx([6 / 12, 7 / 12])
    pair12 = next(r for r in result.records if r["id"] == "pair-12")["agreement"]
    assert pair12["metrics"]["rouge-l"]["winner"] == "tie" and pair12["metrics"]["bleu"]["winner"] == "a"


def test_arena_winners_are_normalised(result) -> None:
    winners = {r["id"]: r["winner"] for r in result.records}
    assert winners["pair-03"] == "a" and winners["pair-04"] == "tie" and "pair-11" not in winners


def test_the_interval_is_the_bootstrap_distribution_of_the_agreement(result) -> None:
    """12 pairs, 7 agreeing (0/1 each): a bootstrap mean is Binomial(12, 7/12) / 12, so the 95% percentile
    interval lies within one step (1/12) of that distribution's 2.5% and 97.5% quantiles."""
    from math import comb

    n, k = 12, 7
    cdf, total = [], 0.0
    for j in range(n + 1):
        total += comb(n, j) * (k / n) ** j * (1 - k / n) ** (n - j)
        cdf.append(total)
    q_low = next(j for j in range(n + 1) if cdf[j] >= 0.025) / n
    q_high = next(j for j in range(n + 1) if cdf[j] >= 0.975) / n
    low, high = result.summary["agreement"]["bleu"]["ci95"]
    assert abs(low - q_low) <= 1 / n and abs(high - q_high) <= 1 / n, (low, high, q_low, q_high)
    assert high - low > 4 / n  # not a degenerate interval: 12 pairs leave a wide one


def test_the_random_baseline_is_a_fair_seeded_coin(result) -> None:
    """Its agreement is the share of pairs where the coin named the human winner, and its coins follow the
    seed: another seed flips some of them."""
    records = result.records
    coins = [r["agreement"]["random"] for r in records]
    matches = sum(c == r["winner"] for c, r in zip(coins, records))
    assert result.summary["agreement"]["random"]["mean"] == pytest.approx(matches / len(records))
    assert set(coins) == {"a", "b"}
    other = measure_agreement(list(read_pairs(PAIRS)), ["bleu"], seed=7)
    assert coins != [r["agreement"]["random"] for r in other.records]


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"prompt": "p", "response_a": "a", "response_b": "b", "winner": "c", "references": ["r"]}, "winner", "one of"),
        ({"prompt": "p", "response_a": "a", "winner": "a", "references": ["r"]}, "response_b", "missing"),
        ({"prompt": "p", "response_a": "a", "response_b": "b", "winner": "a", "references": []}, "references", "list"),
    ],
)
def test_bad_pairs_name_file_line_and_field(tmp_path, row, field, message) -> None:
    good = {"prompt": "p", "response_a": "a", "response_b": "b", "winner": "a", "references": ["r"]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    with pytest.raises(InputError) as error:
        list(read_pairs(path))
    assert str(error.value).startswith(f"{path}:2: field '{field}': ") and message in str(error.value)


def test_agreement_command(runner, tmp_path) -> None:
    report = tmp_path / "agreement.md"
    result = runner.invoke(app, ["eval", "--agreement", "-i", str(PAIRS), "-m", "bleu", "--report", str(report)])
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl_text(result.stdout)
    assert len(rows) == 12 and all("agreement" in r for r in rows)
    text = report.read_text()
    assert "| bleu | 58.3% |" in text and "| longer | 33.3% |" in text and "1 'tie (bothbad)' dropped" in text
    as_json = runner.invoke(app, ["eval", "--agreement", "-i", str(PAIRS), "-q", "--report", str(tmp_path / "a.json")])
    assert as_json.exit_code == 0 and as_json.stderr == ""
    summary = json.loads((tmp_path / "a.json").read_text())
    assert set(summary["agreement"]) == {"bleu", "bleu-paper", "chrf", "rouge-l", "longer", "random"}
