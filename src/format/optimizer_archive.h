#pragma once
// LibTorch's own optimizer archive (Optimizer::save), which torchfit 0.1 full checkpoints hold, and
// 0.2 files for optimizer types without a Python layout. Read here rather than with
// Optimizer::load, which reads only its own version's parameter keys: LibTorch writes each key as
// the parameter's address in text, hex up to 1.13 ("0x55d3...") and decimal from 2.0.

#include <functional>
#include <string>

namespace torch::optim {
class Optimizer;
struct LBFGSOptions;
struct LBFGSParamState;
}
namespace torch::serialize {
class InputArchive;
}

namespace torchfit::detail {

/// Checks `archive` against `optimizer` completely (param groups, their sizes, every state and
/// option) and returns a function that applies it. For the built-in optimizers (SGD, Adam, AdamW,
/// RMSprop, Adagrad, LBFGS) that function cannot fail; any other type goes through its own
/// Optimizer::load when applied, so it reads only archives of the same LibTorch version, and
/// `archive` must outlive the function; if that load fails, the optimizer's state is put back.
/// Throws CheckpointError starting with `where`.
std::function<void()> prepare_optimizer_archive_load(torch::optim::Optimizer& optimizer,
                                                     torch::serialize::InputArchive& archive,
                                                     const std::string& where);

/// Checks an LBFGS state read from a file against its group's options before LibTorch's step
/// indexes with it: as many old_dirs, old_stps and ro, at most history_size of them. The step's
/// scratch buffer `al` is dropped: the step sizes it itself, and one from a file that is shorter
/// than the history would be written past its end. Throws CheckpointError starting with `where`.
void check_lbfgs_state(const torch::optim::LBFGSOptions& options, torch::optim::LBFGSParamState& state,
                       const std::string& where);

}  // namespace torchfit::detail
