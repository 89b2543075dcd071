#pragma once
/// \file
/// Checkpoint files. Every write goes to a temporary file in the target's
/// directory, is fsynced, renamed over the target and the directory fsynced, so
/// the target never holds a half-written file.
///
/// Each file torchfit writes carries a CRC32 of its content, checked on load
/// (see `verify_checkpoint`). Both kinds of file are `torch.save`'s format, a zip
/// holding a pickled dict that Python's `torch.load` reads:
/// - weights: dotted names to tensors (`model.load_state_dict(torch.load(path))`);
/// - full: a `Checkpoint`'s items ("model", "optimizer", ... see checkpoint.h)
///   and a "torchfit" entry naming the format version.
/// torchfit 0.1's full checkpoints (LibTorch module archives) still load.
///
///     torchfit::save_weights(*model, "model.pt");
///     torchfit::load_weights(*model, "model.pt");

#include <map>
#include <string>

#include <ATen/core/Tensor.h>

#include "torchfit/io/checkpoint_io.h"
#include "torchfit/state_dict.h"
#include "torchfit/trainer_state.h"

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}

namespace torchfit {

/// Writes the module's parameters and buffers as a weights file.
void save_weights(const torch::nn::Module& module, const std::string& path,
                  const SaveOptions& options = SaveOptions());
/// torchfit 0.1's form of the above.
void save_weights(const torch::nn::Module& module, const std::string& path, bool fsync);

/// Writes a full checkpoint of a module, its optimizer, progress and callback
/// states (0.1's text form); `Checkpoint` and `save` hold any set of items.
void save_checkpoint(const torch::nn::Module& module, const torch::optim::Optimizer& optimizer,
                     const TrainerState& trainer, const std::map<std::string, CallbackState>& callbacks,
                     const std::string& path, const SaveOptions& options = SaveOptions());
/// torchfit 0.1's form of the above (path first).
void save_checkpoint(const std::string& path, const torch::nn::Module& module,
                     const torch::optim::Optimizer& optimizer, const TrainerState& trainer,
                     const std::map<std::string, CallbackState>& callbacks, bool fsync = true);

/// Whether a checkpoint is complete and intact, and if not, why.
struct VerifyResult {
  bool ok = false;
  std::string reason;
  explicit operator bool() const { return ok; }
};

/// Checks a checkpoint file: its zip structure and the CRC32 of its whole
/// content, stored in the zip's end-of-archive comment when torchfit wrote it.
/// Files written by other tools carry no checksum and are reported as such.
/// Never throws.
VerifyResult verify_checkpoint(const std::string& path) noexcept;

/// Reads the model weights of a file: torchfit's weights or full checkpoints,
/// Python's `torch.save` of a state dict, LibTorch module archives. With `key`,
/// the state dict under that key of a dict, as in Python's usual
/// `{"model": ..., "optimizer": ...}` checkpoints. Throws `CheckpointError`
/// naming the path and what is wrong (and, for a dict that is no state dict, its
/// keys); never anything else.
TensorMap read_weights(const std::string& path);
TensorMap read_weights(const std::string& path, const std::string& key);

/// Copies `weights` into the module after checking that names, shapes and dtypes
/// all match; otherwise throws `CheckpointError` naming `path` and every
/// mismatching key, and leaves the module untouched.
void assign_weights(torch::nn::Module& module, const TensorMap& weights, const std::string& path);

/// Loads the weights of a file (see `read_weights`) into the module, all or
/// nothing: every tensor is checked against the model before a byte of it is
/// read, and the module changes only after everything was read and checked.
/// Where nothing else shares them, the model's storages take the memory the file
/// was read into instead of a copy (they stay the same storages; their old memory
/// serves the next load, see `release_load_memory`). Throws `CheckpointError` only.
void load_weights(torch::nn::Module& module, const std::string& path);
void load_weights(torch::nn::Module& module, const std::string& path, const std::string& key);

/// Loads read files into memory kept from earlier loads where its sizes fit (a model's old
/// memory, once the file's was swapped in; a load's storages, once freed), so repeated loads into
/// an existing model do not fault in fresh pages. A single load keeps nothing; from the second
/// on, at most the bytes of the largest file loaded are kept. This frees them, and the buffers
/// the calling thread keeps for reading a file's end, directory and pickle (up to 4 MiB), and
/// the count of loads starts again.
void release_load_memory();

/// Restores model and optimizer from a full checkpoint, all or nothing, and
/// returns the rest. Throws `CheckpointError` for weights-only or foreign files.
CheckpointContents load_checkpoint(torch::nn::Module& module, torch::optim::Optimizer& optimizer,
                                   const std::string& path);
/// torchfit 0.1's form of the above (path first).
CheckpointContents load_checkpoint(const std::string& path, torch::nn::Module& module,
                                   torch::optim::Optimizer& optimizer);

}  // namespace torchfit
