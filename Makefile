# The two commands a new user runs are `make demo` and `make test` (README.md).
VENV := .venv/bin
export PATH := $(CURDIR)/$(VENV):$(PATH)

.PHONY: setup demo test lint unit crds fuzz cluster cluster-down image bench bench-hooks bench-operator clean

setup:
	@hack/setup

demo: setup
	$(VENV)/python hack/demo.py

PY_PATHS := relay operator tests bench hack/demo.py hack/control-plane hack/image

lint: setup
	$(VENV)/ruff check $(PY_PATHS)
	$(VENV)/ruff format --check $(PY_PATHS)
	$(VENV)/mypy relay/outbound_relay operator/outbound_operator tests bench hack/demo.py hack/control-plane
	$(VENV)/mypy hack/image  # apart: two extensionless scripts are both module __main__ to mypy
	$(VENV)/lint-imports

test: lint
	$(VENV)/pytest

unit: setup
	$(VENV)/pytest tests/unit

# crds/*.yaml and the generated parts of the chart's values.schema.json, from the operator's models
# (docs/crds.md); tests/operator/test_crd_generation.py fails when they differ from what this writes.
crds: setup
	$(VENV)/python -m outbound_operator.crdgen

# The parsers and wire formats under hypothesis, 20,000 examples a property (tens of minutes; no per-test timeout).
FUZZ_TESTS := tests/unit/test_fuzz.py tests/unit/test_smuggling.py tests/unit/test_reply.py tests/unit/test_reply_meaning.py tests/unit/test_dsn_params.py
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(VENV)/pytest --timeout=0 $(FUZZ_TESTS)

# NODE=kubelet: a real kubelet on containerd instead of kwok's fake node (README.md).
cluster: setup
	@hack/control-plane up $(if $(NODE),--node $(NODE))

# The image, from the Dockerfile, without a Docker daemon or a registry (hack/image).
image:
	@hack/image build

cluster-down:
	@hack/control-plane down

bench: setup
	$(VENV)/python -m bench $(BENCH_ARGS)

bench-hooks: setup
	$(VENV)/python -m bench.hooks_bench

bench-operator: setup
	$(VENV)/python -m bench.operator_bench

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
