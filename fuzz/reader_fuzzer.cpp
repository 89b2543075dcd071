// libFuzzer target for torchfit's readers: each input is written to a file and
// handed to every reader (see read_everything.h). Build and run with fuzz/run.sh.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "read_everything.h"

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
