# kdray: one command to set up, one to run the main job, one to test.
PY      ?= python3.11
VENV    := .venv
STAMP   := $(VENV)/.kdray-installed
PYBIN   := $(VENV)/bin/python

.PHONY: setup demo test test-all clean

setup: $(STAMP)

# Reinstall only when the pins or the project metadata change (a no-op when current).
$(STAMP): constraints.txt pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11)"; exit 1; }
	test -x $(PYBIN) || $(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PYBIN) pipelines/two_stage.py --config configs/demo.yaml

test: setup
	$(PYBIN) -m pytest -q -m "not slow"

test-all: setup
	$(PYBIN) -m pytest -q

clean:
	rm -rf runs data/synthpose data/synthpose-demo .pytest_cache
