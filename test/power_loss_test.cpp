// Power-loss testing of the commit protocol, as ALICE and CrashMonkey test file systems: a child
// process saves under an LD_PRELOAD recorder (fs_recorder_shim.cpp) that logs every file-system
// call changing its directory; the parent builds every state a power cut at any point of that
// log could leave, materialises each in a directory, and checks it with torchfit's readers.
//
// The persistence model is ext4's (data=ordered), as ALICE models it:
// - metadata operations (create, rename, unlink, mkdir, rmdir) reach the disk in the order they
//   were issued, so a cut keeps a prefix of them; the fsync of a directory makes every earlier
//   operation on an entry of that directory durable, and with it everything before;
// - a file's data is durable once the file is fsynced. Writes after its last fsync may be lost,
//   kept, kept in part (all but the last), or the last one torn: its first half written and
//   zeros where the rest would be.
// ext4 also commits its journal when a file is fsynced; the model does not count on that.
#include <dlfcn.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <functional>
#include <map>
#include <set>
#include <sstream>

#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "io/atomic_file.h"
#include "support.h"

namespace torchfit::test {
namespace {

/// One recorded call (see fs_recorder_shim.cpp for the kinds).
struct FsOp {
  char kind = 0;
  uint64_t ino = 0;
  uint64_t offset = 0;  // W: where; T: the new size
  std::string path, to, bytes;  // K: the mark's text in `path`
};

std::vector<FsOp> read_fs_log(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  std::vector<FsOp> ops;
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> f;
    std::istringstream fields(line);
    for (std::string field; std::getline(fields, field, '\t');) f.push_back(field);
    FsOp op;
    op.kind = f.at(0).at(0);
    switch (op.kind) {
      case 'C': op.ino = std::stoull(f.at(1)); op.path = f.at(2); break;
      case 'W':
        op.ino = std::stoull(f.at(1));
        op.offset = std::stoull(f.at(2));
        op.bytes.resize(std::stoull(f.at(3)));
        in.read(op.bytes.data(), static_cast<std::streamsize>(op.bytes.size()));
        break;
      case 'T': op.ino = std::stoull(f.at(1)); op.offset = std::stoull(f.at(2)); break;
      case 'S': op.ino = std::stoull(f.at(1)); break;
      case 'R': op.path = f.at(1); op.to = f.at(2); break;
      case 'D': case 'U': case 'M': case 'X': case 'K': op.path = f.at(1); break;
      default: throw std::runtime_error("fs log: unknown record " + line);
    }
    ops.push_back(std::move(op));
  }
  // The file system reuses the numbers of deleted inodes: each created file gets its own.
  std::map<uint64_t, uint64_t> current;
  uint64_t fresh = uint64_t{1} << 40;
  for (auto& op : ops) {
    if (op.kind == 'C') current[op.ino] = fresh++;
    auto renumbered = current.find(op.ino);
    if (std::string("CWTS").find(op.kind) != std::string::npos && renumbered != current.end()) {
      op.ino = renumbered->second;
    }
  }
  return ops;
}

bool is_metadata(const FsOp& op) { return std::string("CRUMX").find(op.kind) != std::string::npos; }

std::string parent_of(const std::string& path) {
  auto parent = fs::path(path).parent_path().string();
  return parent.empty() ? "." : parent;
}

/// What the directory held before the recorded run; all of it durable.
struct FsImage {
  std::set<std::string> dirs;
  std::map<std::string, uint64_t> names;  // file path -> inode
  std::map<uint64_t, std::string> data;   // inode -> contents

  static FsImage scan(const fs::path& root) {
    FsImage image;
    for (const auto& entry : fs::recursive_directory_iterator(root)) {
      auto rel = fs::relative(entry.path(), root).string();
      if (entry.is_directory()) {
        image.dirs.insert(rel);
      } else {
        struct stat st {};
        ::lstat(entry.path().c_str(), &st);
        image.names[rel] = st.st_ino;
        image.data[st.st_ino] = read_file(entry.path().string());
      }
    }
    return image;
  }
};

void apply_write(std::string& contents, const FsOp& op) {
  if (op.kind == 'T') {
    contents.resize(op.offset);
    return;
  }
  if (contents.size() < op.offset + op.bytes.size()) contents.resize(op.offset + op.bytes.size());
  contents.replace(op.offset, op.bytes.size(), op.bytes);
}

/// A state a power cut can leave.
struct CrashState {
  size_t cut = 0;                  // calls made before the cut
  std::vector<std::string> marks;  // the program's marks before the cut
  std::set<std::string> dirs;
  std::map<std::string, std::string> files;
  std::map<std::string, size_t> written_at;  // for modification times: the call that last wrote the file
};

class PowerCuts {
 public:
  PowerCuts(FsImage before, std::vector<FsOp> ops) : before_(std::move(before)), ops_(std::move(ops)) {}

  /// Every complete version each path held: its contents before the run and the contents of each
  /// file renamed onto it, whole at that moment.
  std::map<std::string, std::set<std::string>> committed_versions() const {
    std::map<std::string, std::set<std::string>> out;
    auto names = before_.names;
    auto data = before_.data;
    for (const auto& [path, ino] : names) out[path].insert(data[ino]);
    for (const auto& op : ops_) {
      if (op.kind == 'W' || op.kind == 'T') apply_write(data[op.ino], op);
      if (op.kind == 'C') names[op.path] = op.ino;
      if (op.kind == 'U') names.erase(op.path);
      if (op.kind == 'R' && names.count(op.path) != 0) {
        names[op.to] = names[op.path];
        names.erase(op.path);
        out[op.to].insert(data[names[op.to]]);
      }
    }
    return out;
  }

  /// Visits every distinct state; returns how many there were.
  size_t for_each(const std::function<void(const CrashState&)>& visit) const {
    std::set<std::string> seen;
    for (size_t cut = 0; cut <= ops_.size(); ++cut) {
      std::vector<size_t> metadata;
      size_t forced = 0;  // how many of `metadata` a directory fsync made durable
      std::vector<std::string> marks;
      for (size_t i = 0; i < cut; ++i) {
        const auto& op = ops_[i];
        if (op.kind == 'K') marks.push_back(op.path);
        if (is_metadata(op)) metadata.push_back(i);
        if (op.kind != 'D') continue;
        for (size_t m = 0; m < metadata.size(); ++m) {
          const auto& earlier = ops_[metadata[m]];
          if (parent_of(earlier.path) == op.path || (earlier.kind == 'R' && parent_of(earlier.to) == op.path)) {
            forced = std::max(forced, m + 1);
          }
        }
      }
      for (size_t kept = forced; kept <= metadata.size(); ++kept) {
        for_each_data_variant(cut, metadata, kept, [&](CrashState state) {
          state.marks = marks;
          std::string key = std::to_string(marks.size());
          for (const auto& d : state.dirs) key += "\1" + d;
          for (const auto& [path, bytes] : state.files) key += "\2" + path + "\3" + bytes;
          if (seen.insert(key).second) visit(state);
        });
      }
    }
    return seen.size();
  }

 private:
  void for_each_data_variant(size_t cut, const std::vector<size_t>& metadata, size_t kept,
                             const std::function<void(CrashState)>& visit) const {
    CrashState state;
    state.cut = cut;
    state.dirs = before_.dirs;
    auto names = before_.names;
    for (size_t m = 0; m < kept; ++m) {
      const auto& op = ops_[metadata[m]];
      switch (op.kind) {
        case 'C': names[op.path] = op.ino; break;
        case 'U': names.erase(op.path); break;
        case 'M': state.dirs.insert(op.path); break;
        case 'X': state.dirs.erase(op.path); break;
        case 'R':
          if (names.count(op.path) != 0) {
            names[op.to] = names[op.path];
            names.erase(op.path);
          }
          break;
      }
    }
    // Per named inode: its durable contents and the writes a cut may have lost.
    struct Inode {
      std::string durable;
      size_t durable_at = 0;
      std::vector<size_t> pending;
    };
    std::map<uint64_t, Inode> inodes;
    for (const auto& [path, ino] : names) {
      if (inodes.count(ino) != 0) continue;
      Inode inode;
      auto found = before_.data.find(ino);
      if (found != before_.data.end()) inode.durable = found->second;
      size_t last_sync = 0;
      for (size_t i = 0; i < cut; ++i) {
        if (ops_[i].kind == 'S' && ops_[i].ino == ino) last_sync = i + 1;
      }
      for (size_t i = 0; i < cut; ++i) {
        const auto& op = ops_[i];
        if ((op.kind == 'W' || op.kind == 'T') && op.ino == ino) {
          if (i < last_sync) {
            apply_write(inode.durable, op);
            inode.durable_at = i;
          } else {
            inode.pending.push_back(i);
          }
        }
        if (op.kind == 'C' && op.ino == ino && inode.durable_at == 0) inode.durable_at = i;
      }
      inodes[ino] = std::move(inode);
    }
    // The variants of each inode with lost writes, then every combination of them.
    std::vector<std::pair<uint64_t, std::vector<std::pair<std::string, size_t>>>> choices;
    std::map<uint64_t, std::pair<std::string, size_t>> contents;
    for (const auto& [ino, inode] : inodes) {
      contents[ino] = {inode.durable, inode.durable_at};
      if (inode.pending.empty()) continue;
      std::vector<std::pair<std::string, size_t>> variants{{inode.durable, inode.durable_at}};
      std::string applied = inode.durable;
      for (size_t n = 0; n < inode.pending.size(); ++n) {
        const auto& op = ops_[inode.pending[n]];
        if (n + 1 == inode.pending.size() && op.kind == 'W' && op.bytes.size() > 1) {
          FsOp torn = op;
          size_t half = op.bytes.size() / 2;
          if (half >= 4096) half -= half % 4096;
          std::fill(torn.bytes.begin() + static_cast<std::ptrdiff_t>(half), torn.bytes.end(), '\0');
          std::string with_torn = applied;
          apply_write(with_torn, torn);
          variants.emplace_back(with_torn, inode.pending[n]);
        }
        apply_write(applied, op);
        if (n + 2 >= inode.pending.size()) variants.emplace_back(applied, inode.pending[n]);
      }
      choices.emplace_back(ino, std::move(variants));
    }
    std::function<void(size_t)> combine = [&](size_t next) {
      if (next == choices.size()) {
        state.files.clear();
        state.written_at.clear();
        for (const auto& [path, ino] : names) {
          state.files[path] = contents[ino].first;
          state.written_at[path] = contents[ino].second;
        }
        visit(state);
        return;
      }
      for (const auto& variant : choices[next].second) {
        contents[choices[next].first] = variant;
        combine(next + 1);
      }
    };
    combine(0);
  }

  FsImage before_;
  std::vector<FsOp> ops_;
};

/// Writes `state` under `root` (emptied first), with modification times in the order of the writes.
void materialise(const CrashState& state, const fs::path& root) {
  fs::remove_all(root);
  fs::create_directories(root);
  for (const auto& dir : state.dirs) fs::create_directories(root / dir);
  for (const auto& [path, bytes] : state.files) {
    fs::create_directories((root / path).parent_path());
    write_file((root / path).string(), bytes);
    struct timespec times[2] = {{1'700'000'000 + static_cast<time_t>(state.written_at.at(path)), 0},
                                {1'700'000'000 + static_cast<time_t>(state.written_at.at(path)), 0}};
    ::utimensat(AT_FDCWD, (root / path).c_str(), times, 0);
  }
}

int count_marks(const CrashState& state, char kind) {
  return static_cast<int>(std::count_if(state.marks.begin(), state.marks.end(),
                                        [&](const std::string& m) { return !m.empty() && m[0] == kind; }));
}

/// The last number of a mark of `kind` ("E 3" gives 3), or -1.
int64_t last_mark(const CrashState& state, char kind) {
  int64_t out = -1;
  for (const auto& m : state.marks) {
    if (!m.empty() && m[0] == kind) out = std::stoll(m.substr(2));
  }
  return out;
}

using Mark = void (*)(const char*);

void fill_parameters(torch::nn::Module& module, double value) {
  torch::NoGradGuard no_grad;
  for (auto& p : module.parameters()) p.fill_(value);
}

/// The parameter value every parameter of `module` holds, or NaN if they differ.
double parameter_value(const torch::nn::Module& module) {
  std::set<double> values;
  for (const auto& p : module.parameters()) {
    auto flat = p.flatten();
    for (int64_t i = 0; i < flat.numel(); ++i) values.insert(flat[i].item<double>());
  }
  return values.size() == 1 ? *values.begin() : std::nan("");
}

CheckpointOptions manager_options(const fs::path& root, bool fsync) {
  return CheckpointOptions((root / "ck/e{epoch}.pt").string()).max_to_keep(2).save_last(true).fsync(fsync);
}

BackupOptions backup_options(const fs::path& root) {
  return BackupOptions((root / "bk").string()).save_freq(SaveFreq::batches(1)).double_checkpoint(true);
}

// The child side: runs scenario TORCHFIT_POWER_LOSS under the recorder, marking what returned.
TEST(PowerLossChild, Run) {
  const char* scenario_env = std::getenv("TORCHFIT_POWER_LOSS");
  if (scenario_env == nullptr) GTEST_SKIP() << "run by PowerLossTest";
  auto mark = reinterpret_cast<Mark>(::dlsym(RTLD_DEFAULT, "torchfit_fs_mark"));
  ASSERT_NE(mark, nullptr) << "the recorder is not preloaded";
  const std::string scenario = scenario_env;
  const fs::path root = std::getenv("TORCHFIT_FS_ROOT");
  torch::manual_seed(0);
  if (scenario == "manager" || scenario == "manager-no-fsync" || scenario == "manager-async") {
    Mlp model;
    auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-3);
    Checkpoint state;
    state.add("model", model);
    state.add("optimizer", adam);
    CheckpointManager manager(
        manager_options(root, scenario != "manager-no-fsync").async_save(scenario == "manager-async"));
    for (int epoch = 1; epoch <= 4; ++epoch) {
      fill_parameters(*model, epoch);
      manager.save(state, {{"epoch", static_cast<double>(epoch)}});
      manager.wait();
      mark(("E " + std::to_string(epoch)).c_str());
    }
  } else if (scenario == "weights") {
    Mlp model;
    fill_parameters(*model, 2);
    save_weights(*model, (root / "w.pt").string());
    mark("E 2");
  } else if (scenario == "backup") {
    auto h = make_setup();
    auto data = make_data(12, 4);
    auto ending = std::make_shared<LambdaCallback>();
    ending->train_end = [&](const Logs&) { mark("F 0"); };
    auto backed_up = std::make_shared<LambdaCallback>();
    backed_up->train_batch_begin = [&](int64_t, const Logs&) {
      mark(("E " + std::to_string(h.trainer->state().global_step)).c_str());
    };
    h.trainer->fit(data.x_train, data.y_train,
                   FitOptions().epochs(2).batch_size(4).callbacks(
                       {ending, std::make_shared<BackupAndRestore>(backup_options(root)), backed_up}));
  } else {
    FAIL() << "unknown scenario " << scenario;
  }
}

class PowerLossTest : public TorchfitTest {
 protected:
  /// Records `scenario` in a child over the directory as it is now.
  PowerCuts record(const std::string& scenario) {
    const auto image = FsImage::scan(path("run"));
    pid_t child = spawn_self("PowerLossChild.Run",
                             {std::string("LD_PRELOAD=") + TORCHFIT_FS_RECORDER_LIB, "TORCHFIT_POWER_LOSS=" + scenario,
                              "TORCHFIT_FS_ROOT=" + path("run"), "TORCHFIT_FS_LOG=" + path("fs.log")});
    int status = 0;
    EXPECT_EQ(::waitpid(child, &status, 0), child);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the recorded child failed";
    return PowerCuts(image, read_fs_log(path("fs.log")));
  }

  /// Materialises every state and collects what `check` says is wrong with it.
  std::vector<std::string> check_every_state(const PowerCuts& cuts,
                                             const std::function<std::string(const CrashState&)>& check) {
    // Skipped files are warned about and resumes announced, as they should be: thousands of lines.
    const auto level = logger()->level();
    logger()->set_level(spdlog::level::off);
    struct Restore {
      spdlog::level::level_enum level;
      ~Restore() { logger()->set_level(level); }
    } restore{level};
    std::vector<std::string> problems;
    states_ = cuts.for_each([&](const CrashState& state) {
      materialise(state, path("state"));
      std::string problem;
      try {
        problem = check(state);
      } catch (const std::exception& e) {
        problem = std::string("threw: ") + e.what();
      }
      if (!problem.empty()) problems.push_back(fmt::format("cut after call {}: {}", state.cut, problem));
    });
    return problems;
  }

  /// Checks a state of the manager scenarios: every checkpoint file is a version that was
  /// committed whole, the pointer and restore_latest find an intact file no older than the last
  /// save that returned, and retention kept at least as many files as it promised.
  std::string check_manager_state(const CrashState& state,
                                  const std::map<std::string, std::set<std::string>>& committed) {
    const fs::path root = path("state");
    const int returned = count_marks(state, 'E');
    int intact = 0;
    for (const auto& [file, bytes] : state.files) {
      if (file.rfind("ck/", 0) != 0 || file == std::string("ck/") + kLatestPointer ||
          file.find(detail::kTempMarker) != std::string::npos) {
        continue;
      }
      auto versions = committed.find(file);
      if (versions == committed.end() || versions->second.count(bytes) == 0) return file + " is not a whole file";
      if (!verify_checkpoint((root / file).string())) return file + " does not verify";
      ++intact;
    }
    if (intact < std::min(returned, 2)) return fmt::format("{} intact files after {} saves returned", intact, returned);
    auto latest = latest_checkpoint((root / "ck").string());
    if (returned > 0 && !(latest && verify_checkpoint(*latest))) return "latest_checkpoint finds no intact file";
    Mlp model;
    auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-3);
    Checkpoint restored;
    restored.add("model", model);
    restored.add("optimizer", adam);
    CheckpointManager manager(manager_options(root, true));
    auto from = manager.restore_latest(restored);
    if (returned > 0 && !from) return "restore_latest found nothing";
    if (from && parameter_value(*model) < returned) {
      return fmt::format("restore_latest restored epoch {} after epoch {} returned", parameter_value(*model), returned);
    }
    return "";
  }

  /// Records a manager scenario over an empty directory and checks every state it can leave.
  std::vector<std::string> check_manager_scenario(const std::string& scenario) {
    fs::create_directories(path("run"));
    auto cuts = record(scenario);
    const auto committed = cuts.committed_versions();
    return check_every_state(cuts, [&](const CrashState& s) { return check_manager_state(s, committed); });
  }

  size_t states_ = 0;
};

TEST_F(PowerLossTest, AManagerSavingWithRetentionAndThePointerNeverLosesACommittedCheckpoint) {
  auto problems = check_manager_scenario("manager");
  EXPECT_TRUE(problems.empty()) << fmt::format("{}", fmt::join(problems, "\n"));
  EXPECT_GT(states_, 30u);
  std::cout << "[ power    ] manager: " << states_ << " crash states checked\n";
}

TEST_F(PowerLossTest, AsyncSavesKeepTheSameGuarantees) {
  auto problems = check_manager_scenario("manager-async");
  EXPECT_TRUE(problems.empty()) << fmt::format("{}", fmt::join(problems, "\n"));
  EXPECT_GT(states_, 30u);
  std::cout << "[ power    ] manager, async: " << states_ << " crash states checked\n";
}

TEST_F(PowerLossTest, TheCheckerFindsTheLossesOfSavesWithoutFsync) {
  // The control: without fsync a renamed file's data may not have reached the disk, and the
  // checker must see it.
  auto problems = check_manager_scenario("manager-no-fsync");
  bool found_partial = std::any_of(problems.begin(), problems.end(),
                                   [](const std::string& p) { return p.find("is not a whole file") != std::string::npos; });
  EXPECT_TRUE(found_partial) << fmt::format("{}", fmt::join(problems, "\n"));
}

TEST_F(PowerLossTest, ASaveOverAnOlderFileLeavesTheOldOrTheNewFile) {
  fs::create_directories(path("run"));
  Mlp old_model;
  fill_parameters(*old_model, 1);
  save_weights(*old_model, path("run/w.pt"));
  auto cuts = record("weights");
  auto problems = check_every_state(cuts, [&](const CrashState& state) -> std::string {
    Mlp model;
    load_weights(*model, path("state/w.pt"));
    double value = parameter_value(*model);
    if (value != 1 && value != 2) return fmt::format("w.pt holds {}", value);
    if (count_marks(state, 'E') > 0 && value != 2) return "the old file after the save returned";
    return "";
  });
  EXPECT_TRUE(problems.empty()) << fmt::format("{}", fmt::join(problems, "\n"));
  EXPECT_GT(states_, 5u);
  std::cout << "[ power    ] weights: " << states_ << " crash states checked\n";
}

TEST_F(PowerLossTest, BackupAndRestoreResumesFromTheLastBackupAfterAnyCut) {
  fs::create_directories(path("run"));
  auto cuts = record("backup");
  auto problems = check_every_state(cuts, [&](const CrashState& state) -> std::string {
    auto h = make_setup();
    auto data = make_data(12, 4);
    int64_t resumed = -1;
    auto at_start = std::make_shared<LambdaCallback>();
    at_start->train_begin = [&](const Logs&) { resumed = h.trainer->state().global_step; };
    h.trainer->fit(data.x_train, data.y_train,
                   FitOptions().epochs(2).batch_size(4).callbacks(
                       {std::make_shared<BackupAndRestore>(backup_options(path("state"))), at_start}));
    const int64_t backed_up = last_mark(state, 'E');
    const bool ended = count_marks(state, 'F') > 0;  // the finished run removes its backups
    if (resumed < backed_up && !(ended && resumed == 0)) {
      return fmt::format("resumed at step {} after the backup of step {} returned{}", resumed, backed_up,
                         ended ? " (while removing the backups)" : "");
    }
    return "";
  });
  EXPECT_TRUE(problems.empty()) << fmt::format("{}", fmt::join(problems, "\n"));
  EXPECT_GT(states_, 30u);
  std::cout << "[ power    ] backup: " << states_ << " crash states checked\n";
}

}  // namespace
}  // namespace torchfit::test
