#!/usr/bin/env bash
# Builds the reader fuzz target with clang (libFuzzer, ASan, UBSan) in build-fuzz/
# and runs it over the seed corpus and the saved crashes for SECONDS seconds
# (default 60; 0 only replays them). New inputs go to build-fuzz/corpus, crashes
# to build-fuzz/ (copy them into fuzz/crashes/ once fixed). FUZZ_SEED (default 1) makes
# a run repeatable; set another to explore further.
#
#     fuzz/run.sh 600
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds=${1:-60}
./third_party/install.sh
flags="-fsanitize=address,undefined,fuzzer-no-link -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -gline-tables-only"
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_CXX_FLAGS="$flags" -DTORCHFIT_FUZZ=ON -DTORCHFIT_BUILD_TESTS=OFF \
  -DTORCHFIT_BUILD_EXAMPLES=OFF -DTORCHFIT_BUILD_BENCHMARKS=OFF -DTORCHFIT_INSTALL=OFF > /dev/null
cmake --build build-fuzz --target reader_fuzzer
mkdir -p build-fuzz/corpus
# LibTorch itself is not instrumented; its one-time allocations are not leaks of ours.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
seeds=(fuzz/corpus/torchfit fuzz/corpus/pickles fuzz/corpus/python fuzz/corpus/python-v3 fuzz/crashes)
echo "fuzz: replaying $(find "${seeds[@]}" -type f ! -name '*.tsv' ! -name '*.expected' | wc -l) seed and crash files"
build-fuzz/reader_fuzzer -runs=0 "${seeds[@]}"
if ((seconds > 0)); then
  build-fuzz/reader_fuzzer -seed="${FUZZ_SEED:-1}" -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=4096 \
    -artifact_prefix=build-fuzz/ build-fuzz/corpus "${seeds[@]}"
fi
