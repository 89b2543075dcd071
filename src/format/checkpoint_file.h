#pragma once
// One checkpoint file open for one load. Everything is read through a single
// descriptor, from the first check to the last byte, so a rename or a retention
// delete in between cannot change what is read.
//
// Files torchfit wrote carry a checksum of their whole content; it is checked
// before anything parsed counts (while everything is read, in one pass, when the
// whole file is wanted), and only such files are parsed as LibTorch's pickles
// (by read_libtorch_pickle).
// Files of other tools, and module archives (torchfit 0.1 full checkpoints, after
// their checksum), are parsed by our own unpickler, and the zip CRC32 of every
// record is checked as it is read. No LibTorch parser reads a file: a module
// archive's TorchScript objects are read as dicts and its code/ never looked at.

#include <functional>
#include <map>
#include <memory>
#include <string>

#include <ATen/core/ivalue.h>

#include "format/libtorch_pickle.h"
#include "format/pickle_file.h"
#include "format/zip.h"

namespace torchfit::detail {

class CheckpointFile {
 public:
  /// Opens and checks `path`: an existing regular file, a zip archive whose
  /// records all lie inside it. Throws CheckpointError naming the path and what
  /// is wrong. The checksum is compared by `verify()`, which everything that
  /// trusts the file calls first.
  explicit CheckpointFile(const std::string& path);

  const std::string& path() const { return reader_.path(); }
  const FileReader& reader() const { return reader_; }
  /// Written by torchfit: the file carries a whole-file checksum.
  bool checksummed() const { return checksummed_; }
  /// Compares the checksum of a checksummed file with its content, once; throws
  /// CheckpointError when they differ.
  void verify() const;
  /// The records by name. A checksummed file's offsets are resolved only while
  /// read_all reads it: use their names and sizes.
  const RecordMap& records() const { return records_; }
  /// A LibTorch module archive: torch::save(module), torchfit 0.1 full checkpoints, TorchScript.
  bool is_module_archive() const { return records_.count("constants.pkl") > 0; }

  /// The pickled object of a file without a checksum (another tool's) or of a
  /// module archive, parsed by our own unpickler (TorchScript objects as dicts with
  /// `script_objects`, see python_pickle.h), with its storages allocated but not yet
  /// read. Other checksummed files are read whole, with read_all().
  DeferredPickle unpickle(bool script_objects = false) const;
  /// Runs the reads (each a whole record) of a file unpickle() reads, checking their
  /// zip CRC32s.
  void read(const std::vector<ReadJob>& jobs) const;
  /// Looks at the object before its storages hold their bytes (structure, names,
  /// sizes and dtypes are there), on the calling thread. It must change nothing,
  /// as the read may still fail after it.
  using Inspect = std::function<void(const c10::IValue&)>;
  /// The whole object with every storage read. A checksummed file is read in one
  /// pass: every byte once, into fresh storages (small records in shared
  /// stretches, local headers included), checksummed as it arrives. Meanwhile
  /// read_libtorch_pickle parses the pickle and `inspect` runs; their errors count
  /// only once the checksum matched, and storages are bound only then.
  c10::IValue read_all(const Inspect& inspect = {}) const { return read_all(inspect, {}); }
  /// A quicker way than the parse to what a caller wants from some files read whole.
  /// `recognise(pickle)` runs in place of the parse and `inspect` and says whether it takes
  /// the file, changing nothing; if it does, `bind(take)` runs once the checksum matched,
  /// and read_all returns None. Files it does not take, and module archives, are read as by
  /// read_all(inspect).
  struct Shortcut {
    std::function<bool(std::string_view pickle)> recognise;
    std::function<void(const TakeStorage& take)> bind;
  };
  c10::IValue read_all(const Inspect& inspect, const Shortcut& shortcut) const;
  /// What torchfit::load reads: read_all() of a file torchfit wrote. Other files are
  /// refused, saying what they are and what reads them.
  c10::IValue read_torchfit() const;
  /// A module archive (torch::save(module), torchfit 0.1 full checkpoints), checksum
  /// first where it has one: its root object as a dict of attributes, submodules as
  /// dicts within (kScriptClassKey), every storage read and its CRC checked.
  c10::IValue read_module_archive() const;

 private:
  /// Read in one pass, checksummed as it arrives: files torchfit wrote, but for module archives.
  bool read_whole() const { return checksummed_ && !is_module_archive(); }
  c10::IValue read_records(DeferredPickle pickle, const Inspect& inspect) const;
  c10::IValue read_all_once(const Inspect& inspect, const Shortcut& shortcut) const;
  FileReader reader_;
  Trailer trailer_;
  bool checksummed_ = false;
  mutable bool verified_ = false;
  RecordMap records_;
  uint64_t directory_offset_ = 0;
  std::map<uint64_t, std::string> names_;  // record name by data offset, for messages
  // A file of many small records is read whole from its opening, on a helper, into one block
  // its storages share, while its directory and pickle are parsed (read_from_opening).
  mutable at::DataPtr whole_;
  mutable std::unique_ptr<BackgroundRead> reading_;  // until read_all or verify finishes it
};

/// Runs `read` and turns every exception that is not a torchfit::Error (LibTorch's
/// c10::Error, std::filesystem_error, std::bad_alloc, ...) into a CheckpointError
/// naming `path`.
template <typename Read>
auto guard_read(const std::string& path, Read&& read) -> decltype(read());

[[noreturn]] void rethrow_as_checkpoint_error(const std::string& path);

template <typename Read>
auto guard_read(const std::string& path, Read&& read) -> decltype(read()) {
  try {
    return read();
  } catch (...) {
    rethrow_as_checkpoint_error(path);
  }
}

/// The one way a checkpoint file is opened and read: through one descriptor, every error a
/// CheckpointError naming `path`. `read(file)` reads files of torchfit 0.2 and later and of other
/// tools; `read_0_1(file)` reads torchfit 0.1's module archives, which need the target to read
/// into. Both return the same type.
template <typename Read, typename Read01>
auto read_checkpoint_file(const std::string& path, Read&& read, Read01&& read_0_1) -> decltype(read(
    std::declval<const CheckpointFile&>())) {
  return guard_read(path, [&] {
    const CheckpointFile file(path);
    return file.is_module_archive() ? read_0_1(file) : read(file);
  });
}

}  // namespace torchfit::detail
