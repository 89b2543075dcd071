// libFuzzer target for torchfit's readers: each input is written to a file and
// handed to every reader (see read_everything.h), mutated as a zip of pickles
// (zip_mutator.h). Build and run with fuzz/run.sh.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include <spdlog/spdlog.h>

#include "read_everything.h"
#include "torchfit/log.h"
#include "zip_mutator.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  torchfit::logger()->set_level(spdlog::level::off);  // skipped files are warned about, once per input
  return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned int seed) {
  return torchfit::fuzz::mutate_checkpoint(data, size, max_size, seed);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/torchfit-fuzz-" + std::to_string(::getpid()) + ".pt";
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  auto problems = torchfit::fuzz::read_everything(path);
  if (!problems.empty()) {
    std::fprintf(stderr, "%s", problems.c_str());
    std::abort();
  }
  return 0;
}
