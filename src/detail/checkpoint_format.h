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

class ChecksumSink;
struct ModuleTree;

/// A torch.save-compatible pickled dict of the tree's tensors.
void write_weights(ChecksumSink& sink, const ModuleTree& tree);
/// A LibTorch module archive: the tree at the root plus our `torchfit_` entries.
void write_full(ChecksumSink& sink, const ModuleTree& tree, const torch::optim::Optimizer& optimizer,
                const TrainerState& trainer, const std::map<std::string, CallbackState>& callbacks);

}  // namespace torchfit::detail
