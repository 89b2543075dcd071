#pragma once
// LibTorch module archives (torch::save(module)), and the torchfit 0.1 full
// checkpoints built on them: the model at the root plus entries prefixed `torchfit_`.

#include <string>

#include "torchfit/state_dict.h"

namespace torch::optim {
class Optimizer;
}
namespace torch::serialize {
class InputArchive;
}

namespace torchfit::detail {

enum class ArchiveKind { Pickle, Module };
/// Tells a pickled object (torch.save, torchfit files) from a module archive.
ArchiveKind archive_kind(const std::string& path);
/// Reads a module archive; throws CheckpointError naming the path.
void load_archive(torch::serialize::InputArchive& archive, const std::string& path);
/// Every tensor of the archive's module tree under its dotted name (our entries skipped).
void flatten_archive(torch::serialize::InputArchive& archive, const std::string& prefix, TensorMap& out);
/// Restores model and optimizer from a torchfit 0.1 full checkpoint, all or
/// nothing, and returns the rest.
CheckpointContents read_legacy_checkpoint(const std::string& path, torch::nn::Module& module,
                                          torch::optim::Optimizer& optimizer);

}  // namespace torchfit::detail
