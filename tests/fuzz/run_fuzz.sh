#!/usr/bin/env bash
# Builds fastbcast with clang (ASan + UBSan + libFuzzer coverage) in a copy of
# the tree, build/fuzz, and fuzzes fastbcast.decode with atheris.
#
#   bash tests/fuzz/run_fuzz.sh [SECONDS=1800] [extra libFuzzer flags...]
#
# Needs clang (Debian: apt-get install clang-16; set CLANG_VERSION for
# another) and atheris in .venv (pip install atheris: wheels for CPython
# 3.8-3.11 bundle libFuzzer and clang's ASan runtime, asan_with_fuzzer.so).
#
# Why clang and not the gcc build of `make sanitize`: atheris only sees the
# C++ decoder's branches when it is compiled with -fsanitize=fuzzer-no-link,
# a clang flag, and the instrumented extension must run with atheris's own
# ASan runtime preloaded. -fsanitize=vptr and =function are left out: that
# runtime lacks their handlers. PYTHONMALLOC=malloc sends every Python object
# through ASan's allocator, so an overrun of a list or tuple the decoder fills
# is caught too.
#
# New inputs go to build/fuzz/work (kept between runs), crashes to
# build/fuzz/artifacts/, the log to build/fuzz/logs/. Minimise a crash with
#   PATH=$PWD/.venv/bin:$PATH bash tests/fuzz/run_fuzz.sh 0 -minimize_crash=1 -runs=20000 \
#     $PWD/build/fuzz/artifacts/crash-...
# and copy the result to tests/corpus/crash-<what>.bin (tests/test_corpus.py
# replays it from then on). To refresh the tests/corpus/cov-*.bin set (inputs
# that reach branches no seed reaches), merge the fuzzing corpus over the
# seeds with edges only, then copy the new files as cov-<name>.bin:
#   mkdir build/fuzz/m && cp tests/corpus/seed-* build/fuzz/m/
#   PATH=$PWD/.venv/bin:$PATH bash tests/fuzz/run_fuzz.sh 0 -set_cover_merge=1 -use_counters=0 \
#     $PWD/build/fuzz/m $PWD/build/fuzz/work
# (merging and minimising run fuzz_decode.py itself as a program, hence the
# venv on PATH, and need absolute paths: the script runs in build/fuzz.)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SECONDS_TOTAL=${1:-1800}
shift || true
V=${CLANG_VERSION:-16}
PY=$ROOT/.venv/bin/python
SP=$($PY -c "import atheris, os; print(os.path.dirname(os.path.dirname(atheris.__file__)))")
FUZZ=$ROOT/build/fuzz

# Rebuild when the C++ sources changed since the last fuzz build.
if ! diff -rq csrc "$FUZZ/csrc" >/dev/null 2>&1 || ! ls "$FUZZ"/fastbcast/_C*.so >/dev/null 2>&1; then
  rm -rf "$FUZZ/csrc" "$FUZZ/fastbcast" "$FUZZ/build"
  mkdir -p "$FUZZ"
  cp -r csrc fastbcast setup.py pyproject.toml "$FUZZ/"
  rm -f "$FUZZ"/fastbcast/_C*.so
  flags="-fsanitize=address,undefined,fuzzer-no-link -fno-sanitize=vptr,function -fno-sanitize-recover=undefined"
  (cd "$FUZZ" && CC=clang-$V CXX=clang++-$V LDSHARED="clang-$V -shared" \
     CFLAGS="$flags -fno-omit-frame-pointer -g" LDFLAGS="$flags" \
     FASTBCAST_CUDA=0 "$PY" setup.py -q build_ext --inplace)
fi
mkdir -p "$FUZZ/work" "$FUZZ/artifacts" "$FUZZ/logs"
cd "$FUZZ"
log=logs/fuzz-$(date +%Y%m%d-%H%M%S).log
echo "fuzzing for ${SECONDS_TOTAL}s; log: $FUZZ/$log"
limit=()
[ "$SECONDS_TOTAL" -gt 0 ] && limit=(-max_total_time="$SECONDS_TOTAL")
# A file named on the command line (a crash to minimise or replay) replaces
# the corpus directories.
inputs=(work "$ROOT/tests/corpus")
for a in "$@"; do [[ $a != -* ]] && inputs=(); done
ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
PYTHONMALLOC=malloc FASTBCAST_FUZZ_ROOT="$FUZZ" LD_PRELOAD="$SP/asan_with_fuzzer.so" \
  nice -n 10 "$PY" "$ROOT/tests/fuzz/fuzz_decode.py" "${inputs[@]}" \
  -max_len=4096 -timeout=10 -rss_limit_mb=6144 -malloc_limit_mb=256 \
  -artifact_prefix=artifacts/ -print_final_stats=1 "${limit[@]}" "$@" 2>&1 | tee "$log" | grep -E "^(INFO|Done|stat|==|SUMMARY)|crash|ERROR" || true
