#pragma once
// Runs every torchfit reader over one file, as a hostile input. Shared by the
// libFuzzer target and the corpus replay test.

#include <string>

namespace torchfit::fuzz {

/// Runs verify_checkpoint, read_weights (with and without a key), load_weights,
/// torchfit::load and load_checkpoint on `path` (and the LibTorch pickle reader on its
/// raw bytes) against a small model and an Adam
/// optimizer. Returns an empty string when every reader behaved: it either
/// succeeded or threw a CheckpointError and left model and optimizer as they
/// were. Otherwise says which reader misbehaved and how.
std::string read_everything(const std::string& path);

/// The model the corpus files are made for: torch::nn::Linear(3, 2).
inline constexpr int kInFeatures = 3;
inline constexpr int kOutFeatures = 2;

}  // namespace torchfit::fuzz
