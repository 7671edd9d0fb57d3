# The two commands a new user runs are `make demo` and `make test` (README.md).
VENV := .venv/bin
export PATH := $(CURDIR)/$(VENV):$(PATH)

.PHONY: setup demo test lint unit cluster cluster-down bench clean

setup:
	@hack/setup

demo: setup
	$(VENV)/python hack/demo.py

lint: setup
	$(VENV)/ruff check relay operator tests
	$(VENV)/ruff format --check relay operator tests
	$(VENV)/mypy relay/outbound_relay operator/outbound_operator tests
	$(VENV)/lint-imports

test: lint
	$(VENV)/pytest

unit: setup
	$(VENV)/pytest tests/unit

cluster: setup
	@hack/control-plane up

cluster-down:
	@hack/control-plane down

bench: setup
	$(VENV)/python -m bench

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
