#include "torchfit/distributed.h"

#include <cstdlib>
#include <string>

#include <fmt/format.h>
#include "compat/distributed.h"
#include "torchfit/error.h"

namespace torchfit::distributed {
namespace {

std::string required(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') {
    throw ValueError(fmt::format("init_from_env: environment variable {} is not set (torchrun sets RANK, "
                                 "WORLD_SIZE, MASTER_ADDR and MASTER_PORT)",
                                 name));
  }
  return value;
}

int64_t number(const char* name, int64_t low, int64_t high) {
  auto text = required(name);
  try {
    size_t used = 0;
    int64_t value = std::stoll(text, &used);
    if (used == text.size() && value >= low && value <= high) return value;
  } catch (const std::exception&) {
  }
  throw ValueError(fmt::format("init_from_env: invalid {}={} (expected an integer in [{}, {}])", name, text, low, high));
}

}  // namespace

c10::intrusive_ptr<c10d::ProcessGroup> init_from_env(std::chrono::milliseconds timeout) {
  auto world = number("WORLD_SIZE", 1, 1 << 20);
  auto rank = number("RANK", 0, world - 1);
  if (const char* local = std::getenv("LOCAL_RANK"); local != nullptr && *local != '\0') {
    number("LOCAL_RANK", 0, world - 1);  // validated; it would pick the GPU of a CUDA build
  }
  auto address = required("MASTER_ADDR");
  auto port = number("MASTER_PORT", 1, 65535);
  try {
    auto store_options = compat::tcp_store_options();
    store_options.port = static_cast<uint16_t>(port);
    store_options.isServer = rank == 0;
    store_options.numWorkers = static_cast<size_t>(world);
    store_options.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(address, store_options);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    // On one host everything stays on loopback; across hosts Gloo picks this
    // host's address (or GLOO_SOCKET_IFNAME's interface).
    bool local = address == "127.0.0.1" || address == "localhost";
    const char* interface = std::getenv("GLOO_SOCKET_IFNAME");
    options->devices.push_back(interface ? c10d::ProcessGroupGloo::createDeviceForInterface(interface)
                               : local   ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                         : c10d::ProcessGroupGloo::createDefaultDevice());
    return compat::make_gloo_group(store, static_cast<int>(rank), static_cast<int>(world), options);
  } catch (const std::exception& e) {
    throw Error(fmt::format("init_from_env: rank {} of {} could not join {}:{}: {}", rank, world, address, port,
                            e.what()));
  }
}

}  // namespace torchfit::distributed
