#include "detail/module_tree.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/serialize/output-archive.h>

namespace torchfit::detail {
namespace {

void copy_tensors(std::vector<std::pair<std::string, at::Tensor>>& target,
                  const std::vector<std::pair<std::string, at::Tensor>>& source) {
  if (target.size() != source.size()) target.assign(source.size(), {});
  for (size_t i = 0; i < source.size(); ++i) {
    target[i].first = source[i].first;
    copy_into(target[i].second, source[i].second);
  }
}

}  // namespace

void copy_into(at::Tensor& buffer, const at::Tensor& value) {
  if (!value.defined()) {
    buffer = at::Tensor();
    return;
  }
  at::NoGradGuard no_grad;
  bool reusable = buffer.defined() && buffer.sizes() == value.sizes() &&
                  buffer.scalar_type() == value.scalar_type() && buffer.is_contiguous();
  if (!reusable) {
    // Pinned host memory for device tensors, so the device-to-host copy runs at full speed.
    auto options = value.options().device(at::kCPU).pinned_memory(value.is_cuda());
    buffer = at::empty(value.sizes(), options);
  }
  buffer.copy_(value);
}

ModuleTree ModuleTree::of(const torch::nn::Module& module) {
  ModuleTree tree;
  for (const auto& item : module.named_parameters(/*recurse=*/false)) {
    tree.parameters.emplace_back(item.key(), item.value().detach());
  }
  for (const auto& item : module.named_buffers(/*recurse=*/false)) {
    tree.buffers.emplace_back(item.key(), item.value().detach());
  }
  for (const auto& item : module.named_children()) {
    if (item.value()->is_serializable()) tree.children.emplace_back(item.key(), of(*item.value()));
  }
  return tree;
}

void ModuleTree::copy_from(const ModuleTree& source) {
  copy_tensors(parameters, source.parameters);
  copy_tensors(buffers, source.buffers);
  if (children.size() != source.children.size()) children.assign(source.children.size(), {});
  for (size_t i = 0; i < source.children.size(); ++i) {
    children[i].first = source.children[i].first;
    children[i].second.copy_from(source.children[i].second);
  }
}

void ModuleTree::write(torch::serialize::OutputArchive& archive) const {
  for (const auto& [name, tensor] : parameters) archive.write(name, tensor);
  for (const auto& [name, tensor] : buffers) archive.write(name, tensor, /*is_buffer=*/true);
  for (const auto& [name, child] : children) {
    torch::serialize::OutputArchive child_archive(archive.compilation_unit());
    child.write(child_archive);
    archive.write(name, child_archive);
  }
}

std::vector<std::pair<std::string, at::Tensor>> ModuleTree::flatten() const {
  std::vector<std::pair<std::string, at::Tensor>> out(parameters);
  out.insert(out.end(), buffers.begin(), buffers.end());
  for (const auto& [name, child] : children) {
    for (auto& [key, tensor] : child.flatten()) out.emplace_back(name + "." + key, std::move(tensor));
  }
  return out;
}

size_t ModuleTree::nbytes() const {
  size_t total = 0;
  for (const auto& [name, tensor] : flatten()) total += tensor.nbytes();
  return total;
}

}  // namespace torchfit::detail
