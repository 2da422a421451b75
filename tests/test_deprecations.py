"""The warning filters of pyproject.toml (issue 36): a deprecation from our code, or from a library whose API
we call, fails the test that meets it; the few that are not ours, named there with their versions, do not."""

from __future__ import annotations

import warnings

import pytest


def warn_from(module: str, message: str, category: type[Warning]) -> None:
    """`message` as if raised in `module` (the module name the filters match)."""
    warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module, registry={})


@pytest.mark.parametrize("module", ["stages.train.policy", "bleuberi_cli.app", "tests.test_train"])
@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_a_deprecation_in_our_code_is_an_error(module, category) -> None:
    with pytest.raises(category):
        warn_from(module, "`old` is deprecated", category)


def test_a_deprecation_that_a_library_raises_at_its_own_frame_is_an_error() -> None:
    # transformers' renamed forward arguments warn from torch's Module.__call__, not from our calling frame
    with pytest.raises(FutureWarning, match="past_key_values"):
        warn_from("torch.nn.modules.module", "`past_key_values` is deprecated", FutureWarning)


def test_only_the_named_deprecations_of_others_pass() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warn_from("transformers.modeling_utils", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        warn_from("matplotlib._mathtext", "'enablePackrat' deprecated", DeprecationWarning)
    assert seen == []
    with pytest.raises(FutureWarning):
        warn_from("transformers.modeling_utils", "`gradient_checkpointing_enable` is deprecated", FutureWarning)
