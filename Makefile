# Two commands on a fresh machine with Python 3.11:  `make demo`  and  `make test`.
# Both create a local virtual environment (.venv) and install flashfuse into it.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU machines take torch's CPU build (2.13.0) from local disk; GPU machines keep their own torch.
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors.
test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) build *.egg-info
