# Every row of the BLEUBERI paper's Table 1 on the same selected records, at equal steps, then one
# held-out comparison of all of them (means with 95% intervals, win rates against the base).
# Uses the selection steps of the Makefile in this folder (generate, score, select).
#
#   make -C examples -f paper.mk                              # all rows, demo sizes
#   make -C examples -f paper.mk grpo-rm REWARD_MODEL=/models/Skywork-Reward-Llama-3.1-8B-v0.2
#   make -C examples -f paper.mk HELDOUT=/data/mt-bench-80.jsonl     # another held-out set
#
# Without REWARD_MODEL=..., the RM rows use a stand-in (bench/stand_in_rm.py: SmolLM2-135M with a random
# classification head): they run end to end, but that reward judges nothing.

# Set before the include: the Makefile's own default (30 steps) is for its single demo run.
STEPS ?= 10
BATCH ?= 16

include Makefile

.DEFAULT_GOAL := paper-table
REWARD_MODEL ?=
STAND_IN_RM = $(OUT)/stand-in-rm
RM_PATH = $(if $(REWARD_MODEL),$(REWARD_MODEL),$(STAND_IN_RM))
EVAL_METRICS ?= bleu bleu-paper chrf rouge-l bertscore emb
PYTHON ?= python3
ROWS = grpo-bleu grpo-chrf grpo-rouge-l grpo-bertscore grpo-emb grpo-rm grpo-bleu-rm sft

reward_grpo-bleu      = --reward bleu
reward_grpo-chrf      = --reward chrf
reward_grpo-rouge-l   = --reward rouge-l
reward_grpo-bertscore = --reward bertscore
reward_grpo-emb       = --reward emb
reward_grpo-rm        = --reward rm:$(RM_PATH)
reward_grpo-bleu-rm   = --reward bleu --reward rm:$(RM_PATH) --reward-combine zscore
reward_sft            = --algo sft

PAPER = $(OUT)/paper
REPORT = $(PAPER)/report-$(basename $(notdir $(HELDOUT))).md

paper-table: $(REPORT)

$(STAND_IN_RM)/config.json:
	$(PYTHON) $(CURDIR)/../bench/stand_in_rm.py $(STAND_IN_RM)

# One target per row: `make -f paper.mk grpo-chrf`.
$(ROWS): %: $(PAPER)/%/adapter/adapter_config.json

$(PAPER)/%/adapter/adapter_config.json: $(OUT)/selected.jsonl $(OUT)/.settings/train \
		$(if $(REWARD_MODEL),,$(STAND_IN_RM)/config.json)
	@mkdir -p $(PAPER)
	$(BLEUBERI) train -i $< -o $(PAPER)/$* --overwrite --model $(MODEL) $(reward_$*) --max-steps $(STEPS) \
		--learning-rate $(LR) --num-generations 4 --per-device-train-batch-size $(BATCH) \
		--max-completion-length $(TOKENS) --max-prompt-length 256 --save-steps $(STEPS) --seed $(SEED) \
		> $(PAPER)/$*.metrics.jsonl

$(REPORT): $(foreach row,$(ROWS),$(PAPER)/$(row)/adapter/adapter_config.json) $(HELDOUT)
	$(BLEUBERI) eval -i $(HELDOUT) -o $(basename $@).records.jsonl --model $(MODEL) \
		$(foreach row,$(ROWS),--adapter $(PAPER)/$(row)/adapter=$(row)) \
		$(foreach metric,$(EVAL_METRICS),--metric $(metric)) \
		--max-new-tokens $(TOKENS) --seed $(SEED) --report $@

.PHONY: paper-table $(ROWS)
