#include "format/module_archive.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <sstream>
#include <stdexcept>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include "format/checkpoint_file.h"
#include "format/optimizer_archive.h"
#include "format/byte_sink.h"
#include "format/python_pickle.h"
#include "format/state_dict.h"
#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

constexpr const char* kReservedPrefix = "torchfit_";
constexpr const char* kFormatKey = "torchfit_format";
constexpr const char* kOptimizerKey = "torchfit_optimizer";
constexpr const char* kEpochKey = "torchfit_epoch";
constexpr const char* kGlobalStepKey = "torchfit_global_step";
constexpr const char* kBatchInEpochKey = "torchfit_batch_in_epoch";
constexpr const char* kCallbacksKey = "torchfit_callbacks";
constexpr const char* kSeedKey = "torchfit_seed";
constexpr const char* kEpochSumsKey = "torchfit_epoch_sums";
constexpr const char* kEpochWeightKey = "torchfit_epoch_weight";
constexpr const char* kRngKey = "torchfit_rng_state";
constexpr const char* kFullFormat = "torchfit.checkpoint.v1";

/// The attributes of a module read from an archive; throws std::invalid_argument for anything else.
c10::impl::GenericDict module_attributes(const c10::IValue& value, const std::string& what) {
  if (!value.isGenericDict() || !value.toGenericDict().contains(kScriptClassKey)) {
    throw std::invalid_argument(fmt::format("{} is not a module", what));
  }
  return value.toGenericDict();
}

bool is_module(const c10::IValue& value) {
  return value.isGenericDict() && value.toGenericDict().contains(kScriptClassKey);
}

/// The attribute `key` of `module`, or nullptr.
const c10::IValue* attribute(const c10::impl::GenericDict& module, const std::string& key) {
  auto it = module.find(key);
  return it == module.end() ? nullptr : &it->value();
}

const c10::IValue& required(const c10::impl::GenericDict& module, const std::string& key) {
  const auto* value = attribute(module, key);
  if (value == nullptr) throw std::invalid_argument(fmt::format("it has no '{}'", key));
  return *value;
}

bool is_full_checkpoint(const c10::impl::GenericDict& root) {
  const auto* format = attribute(root, kFormatKey);
  return format != nullptr && format->isString() && format->toStringRef() == kFullFormat;
}

void flatten_module(const c10::impl::GenericDict& module, const std::string& prefix, TensorMap& out) {
  for (const auto& entry : module) {
    const auto& key = entry.key().toStringRef();
    if (key == kScriptClassKey || (prefix.empty() && key.rfind(kReservedPrefix, 0) == 0)) continue;
    if (entry.value().isTensor()) {
      out[prefix + key] = entry.value().toTensor();
    } else if (is_module(entry.value())) {
      flatten_module(entry.value().toGenericDict(), prefix + key + ".", out);
    }
  }
}

/// A list whose items are all of one simple type gets that element type, which LibTorch's
/// readers ask for (an LBFGS history is a List[Tensor]); the unpickler keeps an empty list's
/// tag, so its type is known too.
c10::IValue with_element_type(const c10::IValue& value) {
  if (!value.isList() || value.toListRef().empty()) return value;
  const auto items = value.toListRef();
  auto all = [&](bool (c10::IValue::*is)() const) {
    return std::all_of(items.begin(), items.end(), [&](const c10::IValue& item) { return (item.*is)(); });
  };
  auto list = value.toList();
  if (all(&c10::IValue::isTensor)) list.unsafeSetElementType(c10::TensorType::get());
  else if (all(&c10::IValue::isInt)) list.unsafeSetElementType(c10::IntType::get());
  else if (all(&c10::IValue::isDouble)) list.unsafeSetElementType(c10::FloatType::get());
  else if (all(&c10::IValue::isBool)) list.unsafeSetElementType(c10::BoolType::get());
  else if (all(&c10::IValue::isString)) list.unsafeSetElementType(c10::StringType::get());
  return value;
}

void write_module(const c10::impl::GenericDict& module, torch::serialize::OutputArchive& out) {
  for (const auto& entry : module) {
    const auto& key = entry.key().toStringRef();
    if (key == kScriptClassKey) continue;
    if (is_module(entry.value())) {
      torch::serialize::OutputArchive child(out.compilation_unit());
      write_module(entry.value().toGenericDict(), child);
      out.write(key, child);
    } else if (entry.value().isTensor()) {
      out.write(key, entry.value().toTensor());
    } else {
      out.write(key, with_element_type(entry.value()));
    }
  }
}

}  // namespace

TensorMap read_archive_weights(const CheckpointFile& file) {
  auto root = file.read_module_archive();
  TensorMap out;
  guard_read(file.path(), [&] { flatten_module(module_attributes(root, "its root"), "", out); });
  return out;
}

CheckpointContents read_legacy_checkpoint(const CheckpointFile& file, torch::nn::Module& module,
                                          torch::optim::Optimizer& optimizer) {
  const std::string& path = file.path();
  if (!file.is_module_archive()) {
    throw CheckpointError(fmt::format(
        "Checkpoint {} is not a full torchfit checkpoint: it holds weights only (use load_weights)",
        path));
  }
  const auto root_value = file.read_module_archive();
  const auto root = guard_read(path, [&] { return module_attributes(root_value, "its root"); });
  if (!is_full_checkpoint(root)) {
    throw CheckpointError(fmt::format(
        "Checkpoint {} is not a full torchfit checkpoint (a weights-only file? use "
        "load_weights)",
        path));
  }
  CheckpointContents contents;
  try {
    flatten_module(root, "", contents.weights);
    auto integer = [&](const char* key) {
      const auto& value = required(root, key);
      if (!value.isInt()) throw std::invalid_argument(fmt::format("'{}' is not an integer", key));
      return value.toInt();
    };
    contents.trainer.epoch = integer(kEpochKey);
    contents.trainer.global_step = integer(kGlobalStepKey);
    contents.trainer.batch_in_epoch = integer(kBatchInEpochKey);
    if (attribute(root, kSeedKey) != nullptr) contents.trainer.seed = static_cast<uint64_t>(integer(kSeedKey));
    if (const auto* sums = attribute(root, kEpochSumsKey)) {
      for (const auto& entry : sums->toGenericDict()) {
        contents.trainer.epoch_sums[entry.key().toStringRef()] = entry.value().toDouble();
      }
    }
    if (const auto* weight = attribute(root, kEpochWeightKey)) contents.trainer.epoch_weight = weight->toDouble();
    if (const auto* rng_value = attribute(root, kRngKey)) {
      auto rng = rng_value->toTensor().contiguous();
      if (rng.scalar_type() != at::kByte) throw std::invalid_argument("the generator state is not bytes");
      contents.trainer.rng_state.assign(rng.data_ptr<uint8_t>(), rng.data_ptr<uint8_t>() + rng.numel());
    }
    for (const auto& entry : required(root, kCallbacksKey).toGenericDict()) {
      CallbackState& state = contents.callbacks[entry.key().toStringRef()];
      for (const auto& field : entry.value().toGenericDict()) {
        state[field.key().toStringRef()] = field.value().toStringRef();
      }
    }
  } catch (...) {
    rethrow_as_checkpoint_error(path);
  }
  if (!contents.trainer.rng_state.empty()) {
    // Checked on a scratch generator, so a bad record fails before anything changes.
    auto scratch = at::make_generator<at::CPUGeneratorImpl>();
    auto bytes = at::from_blob(contents.trainer.rng_state.data(),
                               {static_cast<int64_t>(contents.trainer.rng_state.size())}, at::kByte);
    try {
      scratch.set_state(bytes.clone());
    } catch (const c10::Error& e) {
      throw CheckpointError(fmt::format("Checkpoint {}: the saved generator state is unusable ({})", path,
                                        e.what_without_backtrace()));
    }
  }
  TensorMap targets = check_weights(module, contents.weights, path);

  torch::serialize::InputArchive optimizer_archive;
  std::function<void()> load_optimizer;
  try {
    const auto& saved = required(root, kOptimizerKey);
    module_attributes(saved, "its optimizer");
    to_input_archive(saved, optimizer_archive);
    load_optimizer = prepare_optimizer_archive_load(optimizer, optimizer_archive,
                                                    fmt::format("Checkpoint {} does not match the optimizer", path));
  } catch (...) {
    rethrow_as_checkpoint_error(path);
  }
  load_optimizer();
  copy_weights(targets, contents.weights);
  return contents;
}

c10::IValue read_module_archive_bytes(const std::string& bytes, const std::string& where) {
  // Our zip reader reads files: the bytes become an anonymous one, gone when closed.
  int fd = ::memfd_create("torchfit-archive", MFD_CLOEXEC);
  if (fd < 0) throw CheckpointError(errno_message(where + ": failed making a memory file", "memfd", errno));
  auto close_fd = std::shared_ptr<void>(nullptr, [fd](void*) { ::close(fd); });
  for (size_t done = 0; done < bytes.size();) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw CheckpointError(errno_message(where + ": failed writing a memory file", "memfd", errno));
    done += static_cast<size_t>(n);
  }
  const auto memory = fmt::format("/proc/self/fd/{}", fd);
  try {
    return CheckpointFile(memory).read_module_archive();
  } catch (const CheckpointError& e) {
    // The reader's messages name the memory file: they are said of the bytes instead.
    std::string what = e.what();
    if (what.rfind("Checkpoint " + memory + " ", 0) == 0) {
      what = "it " + what.substr(memory.size() + 12);
    } else if (what.rfind("Failed reading checkpoint " + memory + ": ", 0) == 0) {
      what = what.substr(memory.size() + 28);
    }
    throw CheckpointError(fmt::format("{} is not a LibTorch optimizer archive: {}", where, what));
  }
}

void to_input_archive(const c10::IValue& module, torch::serialize::InputArchive& archive) {
  torch::serialize::OutputArchive out;
  write_module(module.toGenericDict(), out);
  std::ostringstream bytes;
  out.save_to(bytes);
  std::istringstream in(bytes.str());
  archive.load_from(in);
}

}  // namespace torchfit::detail
