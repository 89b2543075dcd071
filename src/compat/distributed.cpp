#include "compat/distributed.h"

#include <type_traits>

#include "compat/libtorch.h"

namespace torchfit::compat {
namespace {

template <typename Options, typename = void>
struct HasUseLibUV : std::false_type {};
template <typename Options>
struct HasUseLibUV<Options, std::void_t<decltype(std::declval<Options&>().useLibUV)>> : std::true_type {};

template <typename Options>
void use_classic_server(Options& options) {
  if constexpr (HasUseLibUV<Options>::value) options.useLibUV = false;  // the field exists from 2.2
}

}  // namespace

c10d::TCPStoreOptions tcp_store_options() {
  c10d::TCPStoreOptions options;
  use_classic_server(options);
  return options;
}

c10::intrusive_ptr<c10d::ProcessGroup> make_gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                       int size,
                                                       c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> options) {
  auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, std::move(options));
#if TORCHFIT_TORCH_AT_LEAST(2, 0)
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, size);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
  // Gloo also reduces CUDA tensors (through host copies), as Python's "gloo" group does.
  group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
  group->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::GLOO, gloo);
  return group;
#else
  return gloo;
#endif
}

}  // namespace torchfit::compat
