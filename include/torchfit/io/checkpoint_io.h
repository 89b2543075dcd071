#pragma once
/// \file
/// Where checkpoints are stored, behind one interface (as Lightning's CheckpointIO):
/// save a checkpoint to a path, load it, remove it, list what exists. The engine
/// (`CheckpointManager`) decides *when* to save and what to keep; a `CheckpointIO`
/// decides *how* the bytes are stored.
///
///     auto io = std::make_shared<torchfit::AsyncCheckpointIO>(std::make_shared<torchfit::FileCheckpointIO>());
///     torchfit::CheckpointManager manager(torchfit::CheckpointOptions("ckpt/{step}.pt").io(io));
///
/// A checkpoint is data: a `c10::IValue` dict (names to tensors, numbers, strings,
/// lists and dicts), as `Checkpoint::state_dict()` builds it.

#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "torchfit/arg.h"
#include "torchfit/io/async_policy.h"

namespace c10 {
struct IValue;
}
namespace at {
class Tensor;
}

namespace torchfit {

namespace detail {
class AsyncWriter;
class KnownCrcs;
class Snapshot;
}  // namespace detail

/// How a file is written.
struct SaveOptions {
  /// False skips the fsyncs: faster, but a crash can lose the file (for comparisons only).
  TORCHFIT_ARG(bool, fsync) = true;
};

/// What a caller knows about a checkpoint's tensors, so async storage can copy less
/// and later (`CheckpointManager` fills it in).
struct SaveHints {
  /// True for tensors that only optimizer steps change in place (parameters and
  /// optimizer state). Async storage does not copy such a tensor again while its
  /// storage and version counter are those of the copy it holds.
  std::function<bool(const at::Tensor&)> updated_by_step;
  /// The caller calls `before_update()` before those tensors change, so async
  /// storage may copy them after `save` returned, while training goes on.
  bool defer_copy = false;
  /// The caller waits for this save as soon as `save` returns (a run's last save):
  /// async storage stores it inline, as waiting for a background save costs more.
  /// `AsyncPolicy::Always` still stores it in the background.
  bool caller_waits = false;
  /// CRC32s of buffers whose bytes the storage may take as known, so a writer skips
  /// reading them again (async storage passes its snapshot's to the storage it wraps).
  detail::KnownCrcs* known_crcs = nullptr;
};

/// Bytes of a checkpoint's tensors by what an async save did with them.
struct SnapshotStats {
  size_t copied = 0;    ///< copied on the caller's thread, in `save`
  size_t deferred = 0;  ///< copied later, by the writer (helped by `before_update()`)
  size_t reused = 0;    ///< unchanged since the previous save: not copied again
};

/// Where the time of an `AsyncCheckpointIO`'s saves went, summed since it was made (seconds).
/// "Caller" is the thread calling `save`, `before_update` and `wait` (the training thread).
struct AsyncSaveProfile {
  int64_t background_saves = 0;    ///< saves stored by the writer thread
  int64_t inline_saves = 0;        ///< saves the rule stored on the caller's thread
  double save_wait = 0;            ///< caller, in `save`: waiting for the previous save
  double capture = 0;              ///< caller, in `save`: copying into the snapshot buffers
  double inline_save = 0;          ///< caller: storing the inline saves
  double before_update = 0;        ///< caller, in `before_update`: copying deferred tensors and waiting
  double wait = 0;                 ///< caller, in `wait` and the reads that wait
  double step_excess = 0;          ///< caller: steps slower than the usual while a save was in flight
  int64_t caller_page_faults = 0;  ///< caller: minor page faults in `save` and `before_update`
  double writer_copy = 0;          ///< writer: copying deferred tensors (wall)
  double writer_store = 0;         ///< writer: serializing and committing (wall)
  double writer_cpu = 0;           ///< writer: CPU time of the two
  double background_cost = 0;      ///< the rule's estimate of a background save's cost to the caller
  double inline_cost = 0;          ///< the rule's estimate of an inline save's cost
};

/// Name of the pointer file `save_last` keeps next to the checkpoints.
inline constexpr const char* kLatestPointer = "torchfit_latest.txt";

/// The newest intact checkpoint in `dir`: the one the `save_last` pointer names,
/// or else the most recently modified file that verifies. Temporary and
/// unverifiable files are ignored. Empty when there is none.
std::optional<std::string> latest_checkpoint(const std::string& dir);

/// Storage of checkpoints. Implementations must make `save` all or nothing: after
/// a failed or interrupted save, `path` holds what it held before.
class CheckpointIO {
 public:
  /// Runs once the save is committed (on the writer thread for async storage).
  using OnCommit = std::function<void()>;

  virtual ~CheckpointIO();

  /// Stores `checkpoint` at `path`, then runs `on_commit`. Throws `CheckpointError`.
  virtual void save(const c10::IValue& checkpoint, const std::string& path, const OnCommit& on_commit = {}) = 0;
  /// `save` with hints about the tensors. Storage that has no use for them (the
  /// default) calls `save`.
  virtual void save_with_hints(const c10::IValue& checkpoint, const std::string& path, const SaveHints& hints,
                               const OnCommit& on_commit = {}) {
    (void)hints;
    save(checkpoint, path, on_commit);
  }
  /// Returns once no save reads the tensors a `save_with_hints` with `defer_copy`
  /// left to copy later: call it before they change (before `optimizer.step()`).
  /// A no-op for storage that copies nothing late.
  virtual void before_update() {}
  /// The checkpoint at `path`, verified. Throws `CheckpointError` naming the path
  /// when it is missing, damaged or not a checkpoint.
  virtual c10::IValue load(const std::string& path) = 0;
  /// Whether every `load` returns a state of its own, held nowhere else (read from a file just
  /// then): a restore may hand its tensors' memory to the model and optimizer instead of
  /// copying. False by default, as for storage that keeps the states it returns.
  virtual bool loads_fresh_tensors() const { return false; }
  /// Removes `path` if it exists; throws `CheckpointError` when it cannot.
  virtual void remove(const std::string& path) = 0;
  /// The checkpoints stored in `directory` ("" is the current one), newest first.
  virtual std::vector<std::string> list(const std::string& directory) = 0;
  /// Waits until every save handed over so far is committed, and raises the
  /// error of a failed one. A no-op for synchronous storage.
  virtual void wait() {}
  /// Records `path` as the newest checkpoint of its directory (`save_last`).
  virtual void mark_latest(const std::string& path) { (void)path; }
  /// What `mark_latest` recorded for `directory`, if anything.
  virtual std::optional<std::string> latest(const std::string& directory) {
    (void)directory;
    return std::nullopt;
  }
  /// Whether `path` holds a checkpoint. The default looks for it in `list` of its directory.
  virtual bool exists(const std::string& path);
  /// Why the checkpoint at `path` cannot be loaded; empty when it can. The default loads it.
  virtual std::string verify(const std::string& path);
  /// Replaces `to` by `from` (which then no longer exists), all or nothing. The default
  /// loads `from`, saves it as `to` and removes `from`.
  virtual void rename(const std::string& from, const std::string& to);
  /// Readies `directory` for writing when a run starts, so a bad path fails then: throws
  /// `CheckpointError` naming `owner` and the directory unless it can be written. A no-op
  /// by default.
  virtual void prepare(const std::string& directory, const std::string& owner) {
    (void)directory;
    (void)owner;
  }
  /// Removes `directory` if nothing is left in it. A no-op by default.
  virtual void remove_directory(const std::string& directory) { (void)directory; }
};

/// Files on a local or network filesystem, each committed crash-safely: written to
/// a temporary file in the target's directory, fsynced, renamed over the target,
/// the directory fsynced. Every file carries a CRC32 of its bytes, checked on load.
/// The format is `torch.save`'s zip of a pickle, so Python's `torch.load` reads it.
class FileCheckpointIO : public CheckpointIO {
 public:
  explicit FileCheckpointIO(SaveOptions options = SaveOptions()) : fsync_(options.fsync()) {}

  void save(const c10::IValue& checkpoint, const std::string& path, const OnCommit& on_commit = {}) override;
  /// Uses `hints.known_crcs`.
  void save_with_hints(const c10::IValue& checkpoint, const std::string& path, const SaveHints& hints,
                       const OnCommit& on_commit = {}) override;
  c10::IValue load(const std::string& path) override;
  bool loads_fresh_tensors() const override { return true; }
  void remove(const std::string& path) override;
  /// Regular files that are not temporaries or the pointer file, by modification
  /// time, newest first.
  std::vector<std::string> list(const std::string& directory) override;
  /// Atomically rewrites `<directory>/torchfit_latest.txt` to name `path`.
  void mark_latest(const std::string& path) override;
  std::optional<std::string> latest(const std::string& directory) override;
  /// A regular file at `path`.
  bool exists(const std::string& path) override;
  /// `verify_checkpoint(path)`'s reason.
  std::string verify(const std::string& path) override;
  /// `rename(2)`, then an fsync of the directory (with `fsync()`).
  void rename(const std::string& from, const std::string& to) override;
  /// The directory is writable, or can be created (it is not created here).
  void prepare(const std::string& directory, const std::string& owner) override;
  void remove_directory(const std::string& directory) override;

  bool fsync() const { return fsync_; }

 private:
  bool fsync_;
};

/// Saves in the background through another `CheckpointIO`. `save` copies the
/// checkpoint's tensors into reusable buffers on the caller's thread and returns;
/// one writer thread stores the copy. With `SaveHints`, tensors unchanged since
/// the last save are not copied again, and with `defer_copy` the writer copies
/// the step-updated tensors itself while the caller runs the next forward and
/// backward pass; a `before_update()` that finds the copy unfinished copies the
/// tensors the writer has not reached, then waits for the rest. At most one save is in flight:
/// the next `save` waits for it first. A failed background save is raised by the
/// next `save` or `wait`; the destructor waits and logs it. With `AsyncPolicy::Measured` a
/// save runs on the caller's thread (as the storage's own `save`, errors raised there) when
/// that measured cheaper for the caller, as on small states on a busy machine.
class AsyncCheckpointIO : public CheckpointIO {
 public:
  explicit AsyncCheckpointIO(std::shared_ptr<CheckpointIO> storage, AsyncPolicy policy = AsyncPolicy::Measured);
  ~AsyncCheckpointIO() override;

  void save(const c10::IValue& checkpoint, const std::string& path, const OnCommit& on_commit = {}) override;
  void save_with_hints(const c10::IValue& checkpoint, const std::string& path, const SaveHints& hints,
                       const OnCommit& on_commit = {}) override;
  void before_update() override;
  /// Waits for the save in flight first, so a file being written is read whole.
  c10::IValue load(const std::string& path) override;
  bool loads_fresh_tensors() const override { return storage_->loads_fresh_tensors(); }
  void remove(const std::string& path) override;
  std::vector<std::string> list(const std::string& directory) override;
  void wait() override;
  void mark_latest(const std::string& path) override;
  std::optional<std::string> latest(const std::string& directory) override;
  /// These wait for the save in flight first, then ask the storage.
  bool exists(const std::string& path) override;
  std::string verify(const std::string& path) override;
  void rename(const std::string& from, const std::string& to) override;
  void prepare(const std::string& directory, const std::string& owner) override;
  void remove_directory(const std::string& directory) override;

  const std::shared_ptr<CheckpointIO>& storage() const { return storage_; }
  /// What the last background save copied, deferred and reused.
  SnapshotStats last_snapshot() const;
  /// Where the time went so far. Call it from the thread that saves (or once that thread is done).
  AsyncSaveProfile profile() const;

 private:
  struct Timing;
  /// Waits for the save in flight, adding the time to `field` and to that save's cost.
  void wait_for_writer(double AsyncSaveProfile::*field);
  std::shared_ptr<CheckpointIO> storage_;
  std::unique_ptr<detail::Snapshot> snapshot_;
  std::unique_ptr<Timing> timing_;  // before writer_: the writer's jobs write into it
  std::unique_ptr<detail::AsyncWriter> writer_;
};

/// Reads through another `CheckpointIO` and writes nothing: what the ranks other
/// than 0 of a data-parallel run use, so they make every decision rank 0 makes and
/// restore from the files it wrote.
class ReadOnlyCheckpointIO : public CheckpointIO {
 public:
  explicit ReadOnlyCheckpointIO(std::shared_ptr<CheckpointIO> storage);

  /// Stores nothing, then runs `on_commit`.
  void save(const c10::IValue& checkpoint, const std::string& path, const OnCommit& on_commit = {}) override;
  c10::IValue load(const std::string& path) override;
  bool loads_fresh_tensors() const override { return storage_->loads_fresh_tensors(); }
  /// Removes nothing.
  void remove(const std::string& path) override;
  std::vector<std::string> list(const std::string& directory) override;
  std::optional<std::string> latest(const std::string& directory) override;
  bool exists(const std::string& path) override;
  std::string verify(const std::string& path) override;
  /// Renames nothing.
  void rename(const std::string& from, const std::string& to) override;

 private:
  std::shared_ptr<CheckpointIO> storage_;
};

}  // namespace torchfit
