#pragma once
// Runs every torchfit reader over one file, as a hostile input. Shared by the
// libFuzzer target and the corpus replay test.

#include <string>

namespace torchfit::fuzz {

/// Runs every entry point that reads a file on `path`: verify_checkpoint,
/// read_weights and load_weights (with and without a key), load_checkpoint,
/// torchfit::load into checkpoints holding a model with Adam, the generator and a
/// value, with SGD, and with LBFGS, Trainer::load_checkpoint,
/// CheckpointManager::restore_latest (kManagedTemplate) of the file, and the
/// LibTorch pickle reader on its raw bytes. Returns an empty string when every
/// reader behaved: it either succeeded or threw a CheckpointError and left
/// everything it loads into as it was. Otherwise says which reader misbehaved and how.
std::string read_everything(const std::string& path);

/// The template of the manager that restores the file (its record in a file is keyed by it).
inline constexpr const char* kManagedTemplate = "fuzz/e{epoch}.pt";

/// The model the corpus files are made for: torch::nn::Linear(3, 2).
inline constexpr int kInFeatures = 3;
inline constexpr int kOutFeatures = 2;

}  // namespace torchfit::fuzz
