#pragma once
/// \file
/// The exceptions torchfit throws. Catch `torchfit::Error` to catch them all.
///
///     try {
///       torchfit::load(state, path);
///     } catch (const torchfit::CheckpointError& e) {  // names the path and what is wrong
///       ...
///     }

#include <stdexcept>
#include <string>

namespace torchfit {

/// Base of every torchfit exception.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A bad option or argument; the message names the offending value.
class ValueError : public Error {
 public:
  using Error::Error;
};

/// A checkpoint could not be written or read: I/O failures, corrupt or mismatched files.
/// The message names the path and what is wrong.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

/// Reading a checkpoint failed in the storage (an I/O error such as EIO, or a file that cannot be
/// opened for another reason than not existing), not in the file's content: the file may be
/// intact, so nothing treats it as damaged (`CheckpointManager::restore_latest` raises it).
class StorageError : public CheckpointError {
 public:
  using CheckpointError::CheckpointError;
};

}  // namespace torchfit
