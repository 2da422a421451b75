"""The summary of `eval`: per system, metric means with bootstrap intervals, lengths, truncation,
and prompt-by-prompt comparisons with the baseline and with the system's length control."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stages.eval.config import EvalConfig, System
from stages.eval.length_control import control_name
from stages.eval.stats import WinRate, bootstrap_seed, mean_with_ci, paired_difference

if TYPE_CHECKING:
    from stages.eval.judges import HttpJudge, RewardModelJudge


def summarise(
    records: Sequence[dict[str, Any]],
    systems: Sequence[System],
    config: EvalConfig,
    *,
    reward_judge: RewardModelJudge | None = None,
    http_judge: HttpJudge | None = None,
) -> dict[str, Any]:
    """Per system: metric means with bootstrap intervals, lengths, truncation, and wins against the base."""
    columns = _Columns(records)
    controlled = {s.length_of for s in systems if s.length_of}
    out = {
        system.name: _system_summary(
            columns, system, config, judged=reward_judge is not None, http=http_judge, controlled=controlled
        )
        for system in systems
    }
    summary: dict[str, Any] = {
        "model": config.base_model,
        "prompts": len(records),
        "generation": {
            "max_new_tokens": config.sampling.max_new_tokens,
            "temperature": config.sampling.temperature,
            "top_p": config.sampling.top_p,
            "seed": config.seed,
        },
        "metrics": config.metric_names,
        "signatures": {spec.name: spec.metric().signature() for spec in config.metric_specs},
        "bootstrap": {"resamples": config.bootstrap_resamples, "confidence": 0.95, "seed": config.seed},
        "baseline": config.baseline_name,
        "systems": out,
    }
    if reward_judge is not None:
        summary["judge_model"] = reward_judge.name
    if http_judge is not None:
        summary["judge_url"] = {"url": http_judge.url, "model": http_judge.model, **http_judge.stats()}
    return summary


@dataclass
class _Columns:
    """One value per record of a system's answers."""

    records: Sequence[dict[str, Any]]

    def __call__(self, system: str, key: str) -> list[Any]:
        return [r["evaluation"][system][key] for r in self.records]

    def scores(self, system: str, metric: str) -> list[float]:
        return [r["evaluation"][system]["scores"][metric] for r in self.records]


def _system_summary(
    column: _Columns,
    system: System,
    config: EvalConfig,
    *,
    judged: bool,
    http: HttpJudge | None,
    controlled: set[str],
) -> dict[str, Any]:
    name, baseline = system.name, config.baseline_name
    if system.length_of is not None:  # judges see only real systems' answers
        judged, http = False, None
    # answers from files may lack token counts and finish reasons: those columns use what is known
    tokens = [t for t in column(name, "tokens") if t is not None]
    words = column(name, "words")
    finishes = [f for f in column(name, "finish_reason") if f is not None]
    entry: dict[str, Any] = {
        "adapter": system.adapter,
        **({"answers": system.answers} if system.answers else {}),
        **({"length_of": system.length_of} if system.length_of else {}),
        "metrics": {
            m: mean_with_ci(
                column.scores(name, m), seed=bootstrap_seed(config.seed, name, m), resamples=config.bootstrap_resamples
            )
            for m in config.metric_names
        },
        "length": {
            "tokens_mean": statistics.fmean(tokens) if tokens else None,
            "tokens_median": statistics.median(tokens) if tokens else None,
            "words_mean": statistics.fmean(words) if words else None,
            "words_median": statistics.median(words) if words else None,
        },
        "truncation_rate": finishes.count("length") / len(finishes) if finishes else None,
    }
    if judged:
        seed = bootstrap_seed(config.seed, name, "judge")
        entry["judge_reward"] = mean_with_ci(
            column(name, "judge_reward"), seed=seed, resamples=config.bootstrap_resamples
        )
    if name != baseline:  # "vs_base": against the baseline (the base model unless --baseline says otherwise)
        entry["vs_base"] = _compare(column, name, baseline, config)
        if name in controlled:
            entry["vs_length_control"] = _compare(column, name, control_name(baseline, name), config)
        if judged:
            rewards, base_rewards = column(name, "judge_reward"), column(baseline, "judge_reward")
            entry["judge_reward_vs_base"] = WinRate.count(rewards, base_rewards).rates()
        if http is not None:
            entry["judge_vs_base"] = http_judge_rates(column(name, "judge_verdict"))
    return entry


def _compare(column: _Columns, name: str, other: str, config: EvalConfig) -> dict[str, Any]:
    """Per metric, prompt by prompt: win / tie / loss shares (with the sign test) and the mean
    difference `name - other` with its paired bootstrap interval."""
    comparison = {}
    for m in config.metric_names:
        scores, others = column.scores(name, m), column.scores(other, m)
        seed = bootstrap_seed(config.seed, name, other, m)
        comparison[m] = {
            **WinRate.count(scores, others).rates(),
            "difference": paired_difference(scores, others, seed=seed, resamples=config.bootstrap_resamples),
        }
    return comparison


def http_judge_rates(verdicts: Sequence[str | None]) -> dict[str, float | int | None]:
    """Shares of win/tie/loss among valid verdicts; `invalid` counts replies that could not be read."""
    valid = [v for v in verdicts if v is not None]
    rates = WinRate(valid.count("win"), valid.count("tie"), valid.count("loss")).rates()
    rates["invalid"] = len(verdicts) - len(valid)
    return rates
