#pragma once
/// \file
/// Logs passed to callbacks and the History that `Trainer::fit` returns.
///
///     torchfit::History history = trainer.fit(x, y, options);
///     double last = history.history.at("val_loss").back();

#include <map>
#include <string>
#include <vector>

namespace torchfit {

/// Named scalars passed to callback hooks: `"loss"`, each metric by name, and
/// `"val_" + name` after validation.
using Logs = std::map<std::string, double>;

/// Keys of `logs` joined with ", " (for error messages).
std::string join_keys(const Logs& logs);

/// " Did you mean 'val_accuracy'?" when one of `keys` is a likely misspelling
/// of `name` (the nearest by edit distance, within a third of its length);
/// otherwise "".
std::string did_you_mean(const std::string& name, const std::vector<std::string>& keys);
std::string did_you_mean(const std::string& name, const Logs& logs);

}  // namespace torchfit
