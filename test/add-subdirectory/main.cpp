// Compiled, not linked, by the add_subdirectory_consumer test: its CMakeLists.txt asks
// for C++14, so this builds only if torchfit::torchfit passes C++17 on to its users.
#include <optional>
#include <utility>

#include <torchfit/torchfit.h>

static_assert(__cplusplus >= 201703L, "torchfit::torchfit should require C++17 of its users");

int main() {
  auto [epochs, batch_size] = std::pair<int64_t, int64_t>{2, 8};  // structured bindings
  std::optional<torchfit::FitOptions> options;
  options.emplace().epochs(epochs).batch_size(batch_size);
  if constexpr (sizeof(int64_t) == 8) {
    return options->epochs() == 2 ? 0 : 1;
  }
  return 1;
}
