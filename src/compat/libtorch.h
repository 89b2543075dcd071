#pragma once
// Every difference between the LibTorch versions torchfit builds against lives in src/compat/,
// and only src/compat/ reads torch/version.h. Tested: 1.13 (Debian 12) and 2.6 (Debian 13).

#include <string>
#include <type_traits>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/util/StringUtil.h>
#include <torch/optim/optimizer.h>
#include <torch/version.h>

#define TORCHFIT_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace torchfit::compat {

/// Optimizer::state() maps a parameter's TensorImpl to its state: by the address as text
/// ("0x55d3...") up to 1.13, by the address itself from 2.x.
using OptimizerStateMap = std::remove_reference_t<decltype(std::declval<torch::optim::Optimizer&>().state())>;
using OptimizerStateKey = OptimizerStateMap::key_type;

template <typename Key = OptimizerStateKey>
Key optimizer_state_key(const at::Tensor& param) {
  if constexpr (std::is_same_v<Key, std::string>) {
    return c10::str(static_cast<const void*>(param.unsafeGetTensorImpl()));  // 1.13
  } else {
    return param.unsafeGetTensorImpl();  // 2.x
  }
}

}  // namespace torchfit::compat
