"""The `train` stage: LoRA GRPO (or SFT) with reference-metric rewards. Heavy imports live in the
modules, so importing `stages.train.config` stays cheap (`--help`, `run --print-config`)."""
