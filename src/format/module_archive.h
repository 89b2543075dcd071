#pragma once
// LibTorch module archives (torch::save(module), OutputArchive), and the torchfit 0.1 full
// checkpoints built on them: the model at the root plus entries prefixed `torchfit_`. Read with
// torchfit's own unpickler, a module being a dict of its attributes (kScriptClassKey): LibTorch's
// importer, which compiles the archive's code/ and trusts what it reads, never sees a file.

#include <string>

#include <ATen/core/ivalue.h>

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

/// The root module of the archive held in `bytes` (the LibTorch optimizer archive inside a 0.2
/// checkpoint), read as CheckpointFile::read_module_archive reads a file. Throws CheckpointError
/// starting with `where`.
c10::IValue read_module_archive_bytes(const std::string& bytes, const std::string& where);

/// An InputArchive holding `module` (read by read_module_archive), for LibTorch's optimizer
/// readers (ParamState::serialize): LibTorch's OutputArchive writes the values already read, and
/// its importer loads them back, so it parses only what LibTorch itself just wrote.
void to_input_archive(const c10::IValue& module, torch::serialize::InputArchive& archive);

}  // namespace torchfit::detail
