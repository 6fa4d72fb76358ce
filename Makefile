# fastbcast: `make run` runs the main job, `make test` the tests. Each sets up
# what it needs first: a local .venv (seeing the system's packages, so a
# machine that already has torch keeps it), the CPU wheel torch==2.13.0 if no
# torch is importable, the dev requirements, and an incremental build of the
# extension (ninja rebuilds only what changed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
SO      = $(wildcard fastbcast/_C*.so)
export MAX_JOBS ?= 2

.PHONY: all build run test test-integrations test-releases bench-codec wheel sanitize fuzz clean

all: build

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The integration extras (sglang 0.5.23 with the import-time dependencies it
# and verl need on a CPU machine, about 2.7 GB, triton and ray the largest) are
# installed too, so the integration tests run against the real packages;
# sglang goes in with --no-deps because its declared dependencies pull CUDA
# kernels and another torch. FASTBCAST_NO_INTEGRATIONS=1 skips them (those
# tests then skip, saying why), and the release pairs below.
$(DEPS): $(PY) requirements-dev.txt requirements-integrations.txt requirements-integrations-nodeps.txt constraints.txt
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	if [ "$${FASTBCAST_NO_INTEGRATIONS:-0}" != 1 ]; then \
	  $(PY) -m pip install -q -c constraints.txt -r requirements-integrations.txt && \
	  $(PY) -m pip install -q --no-deps -c constraints.txt -r requirements-integrations-nodeps.txt; fi
	touch $@

build: $(DEPS)
	$(PY) setup.py -q build_ext --inplace

run: build
	$(PY) -m fastbcast.bench $(ARGS)

# The release pairs users run, each in its own venv layered on .venv: it sees
# .venv's packages (torch, triton, ray, ...) after its own, so only the
# packages that differ are installed there, with --no-deps (about 200 MB
# each; 100-160 s each from a cold pip cache on a busy 2-core machine, venv
# creation included). .venv-sglang0512: sglang 0.5.12 (verl 0.9.1's pin).
# .venv-verl061: verl 0.6.1 with sglang 0.5.5. Their tests take about 2 min.
RELEASES := sglang0512 verl061
RELEASE_TESTS_sglang0512 := tests/test_integration_sglang_release.py
# (the pickle oracle's verl payloads need verl, which only this venv has)
RELEASE_TESTS_verl061 := tests/test_integration_verl.py tests/test_codec_pickle_oracle.py -k verl
$(VENV)-%/.deps-installed: requirements-integrations-%.txt $(DEPS)
	rm -rf $(VENV)-$*
	$(PYTHON) -m venv --system-site-packages $(VENV)-$*
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  "$$($(VENV)-$*/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_fastbcast_base.pth"
	$(VENV)-$*/bin/python -m pip install -q --no-deps -r requirements-integrations-$*.txt
	touch $@

test-releases: build $(foreach r,$(RELEASES),$(VENV)-$(r)/.deps-installed)
	$(foreach r,$(RELEASES),$(VENV)-$(r)/bin/python -m pytest $(RELEASE_TESTS_$(r)) -q -p no:cacheprovider $(ARGS) &&) true

# pytest exits 5 when it collects nothing: that is a failure here, as is any
# other non-zero code, so the exit status is passed through unchanged.
test: build
	$(PY) -m pytest tests -q $(ARGS)
	if [ "$${FASTBCAST_NO_INTEGRATIONS:-0}" != 1 ]; then $(MAKE) --no-print-directory test-releases ARGS="$(ARGS)"; fi

test-integrations: build
	$(PY) -m pytest tests/test_patching.py tests/test_integration_sglang.py tests/test_integration_sglang_sites.py \
	  tests/test_integration_sglang_release.py tests/test_autopatch.py tests/test_p2p.py tests/test_p2p_shm.py \
	  tests/test_integrations_nodeps.py tests/test_integration_nccl.py -q $(ARGS)
	$(MAKE) --no-print-directory test-releases ARGS="$(ARGS)"

bench-codec: build
	$(PY) benchmarks/bench_codec.py $(ARGS)

wheel: $(DEPS)
	$(PY) -m pip wheel . --no-build-isolation --no-deps -w dist/

# ASan + UBSan build of the codec, run over the codec tests and the corpus,
# and the shared-memory channel's receive path fed hostile slots.
# It builds in a copy of the tree (build/sanitize) so the normal in-place
# build stays untouched; the sanitizer runtimes load before Python itself.
SAN_TESTS ?= tests/test_codec.py tests/test_codec_hostile.py tests/test_codec_props.py tests/test_corpus.py \
	tests/test_reliability_codec.py tests/test_codec_pickle_oracle.py tests/test_shm_fuzz.py
sanitize: $(DEPS)
	rm -rf build/sanitize && mkdir -p build/sanitize
	cp -r csrc fastbcast tests setup.py pyproject.toml build/sanitize/
	rm -f build/sanitize/fastbcast/_C*.so
	cd build/sanitize && FASTBCAST_SANITIZE=1 ../../$(PY) setup.py -q build_ext --inplace
	cd build/sanitize && ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ../../$(PY) -m pytest $(SAN_TESTS) -q -p no:cacheprovider --capture=sys $(ARGS)

# Coverage-guided fuzzing of the decoder with atheris against a clang
# ASan/UBSan build (needs clang-16: apt-get install clang-16; see
# tests/fuzz/run_fuzz.sh for minimising a crash and refreshing the corpus).
FUZZ_SECONDS ?= 1800
fuzz: $(DEPS)
	$(PY) -m pip install -q atheris
	bash tests/fuzz/run_fuzz.sh $(FUZZ_SECONDS)

clean:
	rm -rf build dist *.egg-info fastbcast/_C*.so fastbcast/_build_info.py $(VENV)-*
