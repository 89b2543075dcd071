#!/usr/bin/env bash
# Line coverage of the readers by the fuzz corpus: builds the fuzz target with clang's
# source-based coverage in build-cov/, replays the seeds, the crashes and the corpus a campaign
# grew (build-fuzz/corpus), and prints llvm-cov's report for the files that read bytes.
#
#     fuzz/coverage.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./third_party/install.sh
flags="-fsanitize=fuzzer-no-link -fprofile-instr-generate -fcoverage-mapping -O1"
cmake -S . -B build-cov -G Ninja -DCMAKE_BUILD_TYPE=None -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_CXX_FLAGS="$flags" -DTORCHFIT_FUZZ=ON -DTORCHFIT_BUILD_TESTS=OFF \
  -DTORCHFIT_BUILD_EXAMPLES=OFF -DTORCHFIT_BUILD_BENCHMARKS=OFF -DTORCHFIT_INSTALL=OFF > /dev/null
cmake --build build-cov --target reader_fuzzer
rm -f build-cov/*.profraw
inputs=(fuzz/corpus/torchfit fuzz/corpus/pickles fuzz/corpus/python fuzz/corpus/python-v3 fuzz/crashes)
[[ -d build-fuzz/corpus ]] && inputs+=(build-fuzz/corpus)
LLVM_PROFILE_FILE=build-cov/reader-%p.profraw build-cov/reader_fuzzer -runs=0 "${inputs[@]}" > /dev/null 2>&1
llvm-profdata merge -sparse build-cov/*.profraw -o build-cov/reader.profdata
llvm-cov report build-cov/reader_fuzzer -instr-profile=build-cov/reader.profdata \
  src/format/zip.cpp src/format/checkpoint_file.cpp src/format/python_pickle.cpp src/format/pickle_types.cpp src/format/libtorch_pickle.cpp \
  src/format/optimizer_state.cpp src/format/optimizer_archive.cpp src/format/module_archive.cpp \
  src/format/state_dict.cpp src/sys/posix_file.cpp src/engine/checkpoint.cpp src/engine/checkpoint_manager.cpp
