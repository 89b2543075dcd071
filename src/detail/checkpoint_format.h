#pragma once
// The writers of the two checkpoint kinds, shared by sync saves (live tensors)
// and the async writer (snapshot copies).

#include <map>
#include <string>

#include "torchfit/callback.h"
#include "torchfit/trainer_state.h"

namespace torch::optim {
class Optimizer;
}

namespace torchfit::detail {

struct ModuleTree;

/// Commits a torch.save-compatible pickled dict of the tree's tensors to `path`.
void commit_weights(const std::string& path, const ModuleTree& tree, bool fsync);
/// Commits a LibTorch module archive: the tree at the root plus our `torchfit_` entries.
void commit_full(const std::string& path, const ModuleTree& tree, const torch::optim::Optimizer& optimizer,
                 const TrainerState& trainer, const std::map<std::string, CallbackState>& callbacks,
                 bool fsync);

}  // namespace torchfit::detail
