# Every target creates the virtualenv and installs requirements.txt first,
# so a fresh clone needs only python3 (3.10 or newer) with venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OPTION ?= 1
ROWS ?= 1000000
NBVAL_FLAGS := --nbval --nbval-sanitize-with runbooks/sanitize.cfg

.PHONY: install demo demo-option2 test test-package test-notebooks notebooks bench clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# The whole chain on a throwaway embedded PostgreSQL; prints the output folder.
demo: $(STAMP)
	$(BIN)/fkrunbook chain --demo --option $(OPTION)

demo-option2:
	$(MAKE) demo OPTION=2

# Package tests, papermill chain runs, squawk over sql/migrations, and
# nbval over the committed notebooks.
test: $(STAMP)
	$(BIN)/python -m pytest tests runbooks $(NBVAL_FLAGS)

test-package: $(STAMP)
	$(BIN)/python -m pytest tests

test-notebooks: $(STAMP)
	$(BIN)/python -m pytest runbooks $(NBVAL_FLAGS)

# Re-run each committed notebook alone in demo mode and keep its outputs,
# which nbval then compares against.
notebooks: $(STAMP)
	$(BIN)/python -m fkrunbook.refresh

bench: $(STAMP)
	$(BIN)/python bench/run.py --rows $(ROWS)

clean:
	rm -rf $(VENV) outputs/*/
