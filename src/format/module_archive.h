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

class CheckpointFile;

/// Every tensor of a module archive's module tree under its dotted name (our
/// entries skipped): full 0.1 checkpoints and plain torch::save(module) archives.
TensorMap read_archive_weights(const CheckpointFile& file);
/// Restores model and optimizer from a torchfit 0.1 full checkpoint, all or
/// nothing (the generator state included, checked first), and returns the rest.
CheckpointContents read_legacy_checkpoint(const CheckpointFile& file, torch::nn::Module& module,
                                          torch::optim::Optimizer& optimizer);

}  // namespace torchfit::detail
