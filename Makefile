# mixinfer — every workflow is one target. The README's quick start is `make serve` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
DEVICE ?= auto
SERVE_VENV := .venv-serve
PY := $(VENV)/bin/python
MIXINFER_HOST ?= 127.0.0.1
MIXINFER_PORT ?= 8000
MIXINFER_MODEL_DIR ?= model_store
export MIXINFER_HOST MIXINFER_PORT MIXINFER_MODEL_DIR
PYTEST_ARGS ?=

.PHONY: help install serve test lint format bench bundle bundle-iat evaluate evaluate-iat examples examples-recheck system-deps schema lock dockerignore clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[serve,cpu,client,train,eval,dev]'
	# torchattacks' own requirements would swap the torch build: install it alone.
	$(VENV)/bin/pip install -q --no-deps torchattacks==3.5.1
	touch $@

$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q -e '.[serve,cpu,client]'
	touch $@

install: $(VENV)/.installed  ## create .venv with .[serve,cpu,client,train,eval,dev]

serve: $(SERVE_VENV)/.installed  ## serve the default bundle on $MIXINFER_HOST:$MIXINFER_PORT (lean env, no torch)
	$(SERVE_VENV)/bin/mixinfer serve

system-deps:  ## Debian's prometheus (promtool), docker-compose, wrk, chromium and its driver, for the tests and benchmarks
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null || ! command -v docker-compose >/dev/null || ! command -v wrk >/dev/null || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus docker-compose wrk chromium chromium-driver >/dev/null; \
	fi

lint: install  ## ruff, import contracts, mypy on service/
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy service

format: install
	$(VENV)/bin/ruff format service tests bench
	$(VENV)/bin/ruff check --fix service tests bench

test: install $(SERVE_VENV)/.installed system-deps lint  ## install what the tests need, then run the whole suite
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: install system-deps  ## benchmarks; writes bench/results.md
	$(PY) bench/engine.py
	$(PY) bench/http.py
	$(PY) bench/structure.py --results
	$(PY) bench/tail.py --results
	$(PY) bench/query_watch.py --requests 1250 --results

bundle: install  ## rebuild model_store/mnist-mixup/1 end to end on CPU, and its version 2 (the served one) with the Combined OL λ its sweep picked
	$(VENV)/bin/mixinfer bundle --dataset mnist5k --name mnist-mixup --version 1 --target-fpr 0.05 --force
	rm -rf model_store/mnist-mixup/2
	$(VENV)/bin/mixinfer calibrate --bundle model_store/mnist-mixup/1 --new-version 2 --lam-ol-combined 0.5

bundle-iat: install  ## an interpolated-adversarial-training MNIST bundle next to it, and its version 2 with the OL λ its sweep picked
	$(VENV)/bin/mixinfer bundle --dataset mnist5k --name mnist-iat --version 1 --training iat --target-fpr 0.05 --force
	rm -rf model_store/mnist-iat/2
	$(VENV)/bin/mixinfer calibrate --bundle model_store/mnist-iat/1 --new-version 2 --lam-ol-standalone 0.8 --lam-ol-combined 0.8

EVAL_SEEDS := --seeds 101 102 103  # fixed server seeds: a rerun reproduces the committed reports (attack seed 0)

evaluate: install  ## robustness reports of the default bundle's two versions: version 1 at eps 0.3 (cpu budget, 32 images) and eps 0.1 (20 images) with its λ sweep, the served version 2 at eps 0.3; DEVICE=cuda for a GPU
	$(VENV)/bin/mixinfer calibrate --bundle model_store/mnist-mixup/1 --sweep --sweep-out docs/robustness/mnist-mixup-eps0.1/sweep
	$(VENV)/bin/mixinfer evaluate --bundle model_store/mnist-mixup/1 --budget cpu $(EVAL_SEEDS) --device $(DEVICE) --out docs/robustness/mnist-mixup
	$(VENV)/bin/mixinfer evaluate --bundle model_store/mnist-mixup/1 --budget cpu --n-images 20 --eps 0.1 $(EVAL_SEEDS) --device $(DEVICE) --out docs/robustness/mnist-mixup-eps0.1
	$(VENV)/bin/mixinfer evaluate --bundle model_store/mnist-mixup/2 --budget cpu $(EVAL_SEEDS) --device $(DEVICE) --out docs/robustness/mnist-mixup-2
	$(PY) -m service.robustness.tables

evaluate-iat: install  ## robustness reports of the interpolated-AT bundle's two versions (cpu budget, eps 0.3), their λ sweeps, and the plateaus of version 1's two strongest attacks and of version 2's attacks through MI; DEVICE=cuda for a GPU
	$(VENV)/bin/mixinfer calibrate --bundle model_store/mnist-iat/1 --sweep --sweep-eps 0.3 --sweep-out docs/robustness/mnist-iat/sweep
	$(VENV)/bin/mixinfer evaluate --bundle model_store/mnist-iat/1 --budget cpu $(EVAL_SEEDS) --device $(DEVICE) --out docs/robustness/mnist-iat
	$(VENV)/bin/mixinfer evaluate --bundle model_store/mnist-iat/1 --budget cpu $(EVAL_SEEDS) --device $(DEVICE) --out docs/robustness/mnist-iat --plateau smooth-switch force-flagged --plateau-images 8 --plateau-only
	$(VENV)/bin/mixinfer calibrate --bundle model_store/mnist-iat/2 --sweep --sweep-eps 0.3 --sweep-out docs/robustness/mnist-iat-2/sweep
	$(VENV)/bin/mixinfer evaluate --bundle model_store/mnist-iat/2 --budget cpu $(EVAL_SEEDS) --device $(DEVICE) --out docs/robustness/mnist-iat-2
	$(VENV)/bin/mixinfer evaluate --bundle model_store/mnist-iat/2 --budget cpu $(EVAL_SEEDS) --device $(DEVICE) --out docs/robustness/mnist-iat-2 --plateau apgd-eot eot-combined eot-combined-from-transfer --plateau-images 8 --plateau-only
	$(PY) -m service.robustness.tables

# what `make serve` serves: the highest version of the default model (the server's own rule)
SERVED_BUNDLE = $(shell $(PY) -c 'from service.store import resolve_bundle; print(resolve_bundle("model_store", "mnist-mixup"))')

examples: install  ## regenerate examples/ (new clean digits and adversarial ones the server flags) on the served bundle, and the page's samples
	$(PY) -m service.robustness.examples --bundle $(SERVED_BUNDLE) --out examples
	cp examples/*.png service/api/static/samples/  # the browser page's sample digits

examples-recheck: install  ## keep examples/ and check them on the served bundle (after a new version with the same model and threshold); rewrites examples/README.md's table
	$(PY) -m service.robustness.examples --bundle $(SERVED_BUNDLE) --out examples --recheck

schema: install  ## regenerate model_store/manifest.schema.json
	$(PY) -c 'from pathlib import Path; from service.manifest import write_json_schema; write_json_schema(Path("model_store/manifest.schema.json"))'

lock: install  ## re-resolve deploy/requirements/{cpu,gpu}.txt (pinned, hashed) from pyproject.toml for the images
	$(PY) deploy/lock.py

dockerignore:  ## re-list the git-tracked model_store/ files in .dockerignore (untracked bundles stay out of images)
	sed -i '/^!model_store\//d' .dockerignore
	git ls-files model_store | sed 's/^/!/' >> .dockerignore

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
