"""Write a stand-in reward model: the embedded SmolLM2-135M with a random one-label classification head.

    python bench/stand_in_rm.py OUT_DIR

No real reward model installs offline, so this gives the `rm:` reward a model of a realistic size and
cost (135M parameters, SmolLM2's chat template) for benchmarks and for running the GRPO-RM rows of the
paper's table end to end. Its scores are a random projection of the conversation's last hidden state:
they measure nothing about quality. For real runs use a trained RM (the paper's:
Skywork-Reward-Llama-3.1-8B-v0.2), `rm:/path/to/it`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def build(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.core.models import quiet_transformers, resolve_model

    quiet_transformers()
    source = resolve_model("smollm2-135m").path
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, use_safetensors=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1])))
