# jest-operator: every target sets itself up on a fresh machine (venv, pip, apt).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test test-fast lint crds controlplane xla-venv cluster-up cluster-down cluster-status bench bench-selection bench-scaling bench-reconcile bench-energy bench-arithmetic bench-data bench-real-data emoji-font prometheus clean

$(STAMP): pyproject.toml setup.py trainer_image/jest_trainer/_selection_native.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[operator,trainer,dev]'
	touch $(STAMP)

venv: $(STAMP)

## make demo: run examples/quickstart.yaml locally (2 CPU workers, digits, JEST at f=0.8)
demo: $(STAMP)
	rm -rf .demo
	$(VENV)/bin/jestctl run examples/quickstart.yaml --workdir .demo --json .demo/summary.json

## make test: lint, CRD drift, unit, integration and end-to-end tests
test: $(STAMP) prometheus emoji-font controlplane xla-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest tests --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

crds: $(STAMP)
	$(VENV)/bin/jestctl crds --out crds/

## kube-apiserver, kube-controller-manager and etcd built from the pinned release (hack/controlplane);
## cached per version under JEST_CONTROLPLANE_CACHE (default ~/.cache/jest-operator/controlplane); a no-op when warm
controlplane:
	bash hack/controlplane/build.sh

## make cluster-up: a real API server + controller manager + node agent on 127.0.0.1; prints export KUBECONFIG=...
cluster-up: $(STAMP) controlplane
	@$(PY) -m hack.devcluster up

cluster-down:
	@$(PY) -m hack.devcluster down

cluster-status:
	@$(PY) -m hack.devcluster status

## torch_xla 2.9 (with its own torch 2.9) in .venv-xla, for tests/integration/test_xla.py (the TPU code path on
## PJRT_DEVICE=CPU); ~3 min and ~7 GB the first time, then a no-op
xla-venv:
	bash hack/xla/venv.sh >/dev/null

## Debian's prometheus + promtool (real server in the telemetry tests)
prometheus:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

## Debian's Noto Color Emoji (the real image-text data set of bench/real_data_shards.py and its tests)
emoji-font:
	@test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji >/dev/null; }

bench: bench-selection bench-scaling bench-reconcile bench-energy bench-arithmetic bench-data bench-real-data

## every selection method at f = 0.5 / 0.8 / 0.9, 3 seeds (about 5 min each on 2 cores)
bench-selection: $(STAMP)
	for f in 0.5 0.8 0.9; do \
	  $(VENV)/bin/jestctl bench selection --seeds 3 --filter-ratio $$f \
	    --out bench/results/selection-f$$f.json --plot bench/results/selection-f$$f.png || exit 1; \
	done

bench-scaling: $(STAMP)
	$(VENV)/bin/jestctl bench scaling --workers 1,2 --batch-size 256 --steps 60 --out bench/results/scaling.json

bench-reconcile: $(STAMP)
	$(PY) bench/reconcile_scale.py

bench-energy: $(STAMP)
	$(PY) bench/energy_sampler.py

bench-arithmetic: $(STAMP)
	$(PY) bench/selection_arithmetic.py

## streaming input: peak RSS over 1x vs 10x the shards, and loader samples/s vs plain webdataset + DataLoader
bench-data: $(STAMP)
	$(PY) bench/data_stream.py memory
	$(PY) bench/data_stream.py loader

## real data (Noto emoji glyphs named by Unicode): uniform, learnability_topk, jest at f = 0.8, 3 seeds via jestctl run
bench-real-data: $(STAMP) emoji-font
	$(PY) bench/real_data_shards.py --out /tmp/jest-real-data/shards
	$(PY) bench/real_data.py --data /tmp/jest-real-data/shards --workdir /tmp/jest-real-data/runs --partial

clean:
	rm -rf $(VENV) .venv-xla .venv-xla.lock .demo .pytest_cache build trainer_image/jest_trainer/*.so
