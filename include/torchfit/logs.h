#pragma once
/// \file
/// Logs passed to callbacks and the History that `Trainer::fit` returns.

#include <map>
#include <string>

namespace torchfit {

/// Named scalars passed to callback hooks: `"loss"`, each metric by name, and
/// `"val_" + name` after validation.
using Logs = std::map<std::string, double>;

/// Keys of `logs` joined with ", " (for error messages).
std::string join_keys(const Logs& logs);

}  // namespace torchfit
