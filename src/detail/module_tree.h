#pragma once
// A module's tensors arranged as Module::save writes them, so the same writer
// serves live modules (sync saves) and snapshot copies (async saves).

#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace torch::nn {
class Module;
}
namespace torch::serialize {
class OutputArchive;
}

namespace torchfit::detail {

/// Copies `value` into `buffer`, reusing the buffer when its shape and dtype
/// match and allocating a CPU tensor otherwise; an undefined value clears it.
void copy_into(at::Tensor& buffer, const at::Tensor& value);

struct ModuleTree {
  std::vector<std::pair<std::string, at::Tensor>> parameters;
  std::vector<std::pair<std::string, at::Tensor>> buffers;
  std::vector<std::pair<std::string, ModuleTree>> children;

  /// The module's own tensors (not copies), detached.
  static ModuleTree of(const torch::nn::Module& module);
  /// Copies `source`'s values into this tree's tensors, reusing them when their
  /// shapes and dtypes match (otherwise allocating CPU copies).
  void copy_from(const ModuleTree& source);
  /// Writes the tree into `archive` exactly as Module::save would.
  void write(torch::serialize::OutputArchive& archive) const;
  /// Every tensor under its dotted name, in order.
  std::vector<std::pair<std::string, at::Tensor>> flatten() const;
  /// Bytes of tensor data in the tree.
  size_t nbytes() const;
};

}  // namespace torchfit::detail
