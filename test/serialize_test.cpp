// Checkpoint files: round trips, the commit protocol, and bad files.
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <thread>

#include <c10/core/CPUAllocator.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/csrc/jit/serialization/unpickler.h>

#include <zlib.h>

#include "format/crc32.h"
#include "format/libtorch_pickle.h"
#include "format/load_memory.h"
#include "format/python_pickle.h"  // kMaxPickleDepth
#include "format/state_dict.h"
#include "format/zip.h"
#include "io/atomic_file.h"
#include "sys/posix_file.h"
#include "sys/threads.h"
#include "support.h"

namespace torchfit::test {
namespace {

class SerializeTest : public TorchfitTest {};

TEST_F(SerializeTest, WeightsFileIsAPickledDictWithDottedNames) {
  Mlp model;
  save_weights(*model, path("w.pt"));
  auto bytes = read_file(path("w.pt"));
  auto value = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  ASSERT_TRUE(value.isGenericDict());
  std::vector<std::string> keys;
  for (const auto& entry : value.toGenericDict()) {
    keys.push_back(entry.key().toStringRef());
    EXPECT_TRUE(torch::equal(entry.value().toTensor(), state_dict(*model).at(keys.back())));
  }
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, (std::vector<std::string>{"fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"}));
}

TEST(Crc32Test, FoldedEqualsZlibAtEverySizeOffsetAndStart) {
  // zlib's crc32 is an implementation apart from both paths crc32_of takes: folded (VPCLMULQDQ,
  // from 256 bytes where the CPU has it) and libdeflate's.
  std::mt19937_64 random(7);
  std::vector<unsigned char> bytes((1 << 20) + 64);
  for (auto& b : bytes) b = static_cast<unsigned char>(random());
  auto expect_zlib = [&](size_t offset, size_t size, uint32_t start) {
    const auto expected = static_cast<uint32_t>(crc32(start, bytes.data() + offset, static_cast<uInt>(size)));
    ASSERT_EQ(detail::crc32_of(bytes.data() + offset, size, start), expected)
        << "offset " << offset << " size " << size << " start " << start;
  };
  for (size_t size = 0; size <= 1100; ++size) expect_zlib(size % 61, size, size % 3 ? 0 : 0x12345678u);
  for (int i = 0; i < 200; ++i) expect_zlib(random() % 64, random() % (1 << 20), static_cast<uint32_t>(random()));
  expect_zlib(0, 1 << 20, 0);
  // Chained calls give the CRC of the whole, as the writer and the reader chain them.
  const uint32_t first = detail::crc32_of(bytes.data(), 5000);
  EXPECT_EQ(detail::crc32_of(bytes.data() + 5000, 70000, first),
            static_cast<uint32_t>(crc32(0, bytes.data(), 75000)));
  std::printf("crc32_of folds with VPCLMULQDQ here: %s\n", detail::crc32_is_folded() ? "yes" : "no");
}

TEST(ThreadsTest, RunPairStartsItsHelperOnAnotherCpuThanTheCallers) {
  cpu_set_t allowed;
  ASSERT_EQ(sched_getaffinity(0, sizeof allowed, &allowed), 0);
  if (CPU_COUNT(&allowed) < 2) GTEST_SKIP() << "a single CPU: the helper has nowhere else to go";
  // Every other CPU is busy too, as when another process has just run there: Linux then starts
  // a new thread on its parent's CPU, behind a caller that stays busy until the helper starts, as
  // a load's caller does. Rounds where the caller itself moved are not counted.
  std::atomic<bool> stop{false};
  std::vector<std::thread> others;
  const int caller_cpu = sched_getcpu();
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &allowed) || cpu == caller_cpu) continue;
    others.emplace_back([&stop, cpu] {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(cpu, &one);
      pthread_setaffinity_np(pthread_self(), sizeof one, &one);
      while (!stop) {
      }
    });
  }
  int counted = 0, shared = 0;
  for (int round = 0; round < 40; ++round) {
    std::atomic<bool> started{false};
    // Half the rounds wake the helper ahead of the call, as a load does while it opens the file.
    if (round % 2 == 1) detail::expect_run_pair();
    int caller_before = sched_getcpu(), caller_after = -1, helper = -1;
    detail::run_pair(
        [&] {
          caller_after = sched_getcpu();
          while (!started) {
          }
        },
        [&] {
          helper = sched_getcpu();
          started = true;
        });
    if (caller_before != caller_after) continue;
    ++counted;
    if (helper == caller_before) ++shared;
  }
  stop = true;
  for (auto& other : others) other.join();
  EXPECT_EQ(shared, 0) << "of " << counted << " rounds: a load's helper must not queue behind its busy caller";
}

TEST(ThreadsTest, RunPairServesConcurrentNestedFailingAndForkedCallers) {
  // The kept helper serves one call at a time: the others, and calls inside a call, start their own.
  auto sum_pair = [](int depth, auto& self) -> int {
    std::atomic<int> sum{0};
    detail::run_pair([&] { sum += depth > 0 ? self(depth - 1, self) : 1; },
                     [&] { sum += depth > 0 ? self(depth - 1, self) : 1; });
    return sum;
  };
  std::vector<std::thread> callers;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&] {
      for (int round = 0; round < 50; ++round) {
        if (round % 3 == 0) detail::expect_run_pair();  // while another call may hold the helper
        wrong += sum_pair(2, sum_pair) != 8;
      }
    });
  }
  for (auto& caller : callers) caller.join();
  EXPECT_EQ(wrong, 0);
  // Each side's error reaches the caller, the caller's first, and the helper serves on after them.
  EXPECT_THROW_MSG(detail::run_pair([] {}, [] { throw std::runtime_error("helper failed"); }), std::runtime_error,
                   "helper failed");
  EXPECT_THROW_MSG(detail::run_pair([] { throw std::runtime_error("caller failed"); },
                                    [] { throw std::runtime_error("helper failed"); }),
                   std::runtime_error, "caller failed");
  EXPECT_EQ(sum_pair(0, sum_pair), 2);
  // A forked child has no helper thread of its parent's: it must not wait for one, even one
  // woken ahead of a call.
  detail::expect_run_pair();
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    alarm(20);  // a hang fails the test instead of stalling it
    _exit(sum_pair(1, sum_pair) == 4 ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child status " << status;
}

TEST(ZipTest, RecordMapKeepsNameOrderWhateverOrderRecordsComeIn) {
  detail::RecordMap records;
  const std::vector<std::string> names = {"data/10", "data/2", "data.pkl", "data/0", "version", "data/1", "byteorder"};
  for (size_t i = 0; i < names.size(); ++i) {
    EXPECT_TRUE(records.insert(names[i], detail::RecordSpan{i, i * 10}));
  }
  EXPECT_FALSE(records.insert("data/2", detail::RecordSpan{99, 99})) << "a name twice is refused";
  std::vector<std::string> listed;
  for (const auto& [name, span] : records) listed.push_back(name);
  // By length, then bytes.
  EXPECT_EQ(listed, (std::vector<std::string>{"data/0", "data/1", "data/2", "data/10", "version", "data.pkl",
                                              "byteorder"}));
  EXPECT_EQ(records.at("data/2").offset, 1u);  // the first insertion, not the refused one
  EXPECT_EQ(records.count("data/3"), 0u);
  EXPECT_EQ(records.find("data/3"), records.end());
  EXPECT_THROW_MSG(records.at("data/3"), std::out_of_range, "data/3");
}

/// Thread `tid`'s state letter ('R' running or runnable, 'S' asleep...) and the system call it is in.
std::string thread_state(pid_t tid) {
  const auto task = fs::path("/proc/self/task") / std::to_string(tid);
  const std::string stat = read_file((task / "stat").string());
  const auto state = stat.rfind(") ");  // the name, in parentheses, may hold spaces
  return stat.substr(state + 2, 1) + ", in system call " + read_file((task / "syscall").string());
}

TEST(ThreadsTest, AHelperWokenForACallThatNeverComesGoesBackToSleep) {
  std::atomic<int> ran{0};
  std::atomic<pid_t> helper{0};
  detail::run_pair([&] { ++ran; }, [&] { ++ran, helper = ::gettid(); });  // the kept helper, now asleep
  ASSERT_NE(helper.load(), ::gettid());
  detail::expect_run_pair();
  // It waits for the call spinning, for about a millisecond, then sleeps again.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  std::string state = thread_state(helper);
  for (; state[0] == 'R' && std::chrono::steady_clock::now() < deadline; state = thread_state(helper)) {
    std::this_thread::yield();
  }
  EXPECT_NE(state[0], 'R') << "a helper woken ahead of a call must not spin on: " << state;
  // Woken twice with no call between, it still serves the next call, on the same thread.
  detail::expect_run_pair();
  detail::expect_run_pair();
  pid_t second = 0;
  detail::run_pair([&] { ++ran; }, [&] { ++ran, second = ::gettid(); });
  EXPECT_EQ(ran, 4);
  EXPECT_EQ(second, helper.load());
}

TEST(ThreadsTest, AHelperRunIsWaitedForAndItsErrorRaisedOnlyByJoin) {
  std::atomic<bool> ran{false};
  std::function<void()> fails = [&] {
    ran = true;
    throw std::runtime_error("helper failed");
  };
  {
    detail::HelperRun helper(fails);  // never joined: the destructor waits and raises nothing
  }
  EXPECT_TRUE(ran);
  ran = false;
  detail::HelperRun helper(fails);
  EXPECT_THROW_MSG(helper.join(), std::runtime_error, "helper failed");
  EXPECT_TRUE(ran);
  int count = 0;  // the kept helper is free again
  detail::run_pair([&] { ++count; }, [&] { ++count; });
  EXPECT_EQ(count, 2);
}

TEST_F(SerializeTest, ABackgroundReadChecksumsWhatItReadsAndStopsWhenDropped) {
  std::string bytes(size_t(9) << 20, '\0');
  std::mt19937 random(5);
  for (auto& byte : bytes) byte = static_cast<char>(random());
  write_file(path("bytes.bin"), bytes);
  const auto expected = static_cast<uint32_t>(
      crc32(0, reinterpret_cast<const Bytef*>(bytes.data()), static_cast<uInt>(bytes.size() - 100)));
  detail::FileReader file(path("bytes.bin"));
  std::string into(bytes.size() - 100, '\0');
  for (int dropped = 0; dropped < 3; ++dropped) {  // begun and dropped unfinished, by the dozen
    detail::BackgroundRead read(file, into.data(), into.size());
  }
  detail::BackgroundRead read(file, into.data(), into.size());
  EXPECT_EQ(read.finish(), expected);
  EXPECT_EQ(into, bytes.substr(0, into.size()));
}

/// A weights file of `count` tensors of `numel` floats each, and one of 64 Ki floats.
torch::nn::ParameterDict many_small_tensors(int count, int64_t numel) {
  torch::nn::ParameterDict params;
  for (int i = 0; i < count; ++i) params->insert("p" + std::to_string(i), torch::randn({numel}));
  params->insert("large", torch::randn({int64_t(64) << 10}));
  return params;
}

TEST_F(SerializeTest, AFileOfManySmallRecordsIsReadWholeFromItsOpening) {
  // 3.5 MiB in 400 records of 8 KiB and one of 256 KiB: read into one block from the open, while
  // the directory and pickle are parsed.
  torch::manual_seed(3);
  auto saved = many_small_tensors(400, 2048);
  save_weights(*saved, path("many.pt"));
  const auto good = read_file(path("many.pt"));
  ASSERT_GT(good.size(), size_t(2) << 20);
  for (int round = 0; round < 3; ++round) {
    auto model = many_small_tensors(400, 2048);
    const auto blocks = detail::load_memory_stats();
    load_weights(*model, path("many.pt"));
    const auto after = detail::load_memory_stats();
    EXPECT_EQ(after.allocated + after.reused - blocks.allocated - blocks.reused, 1u) << "one block for the file";
    for (const auto& item : model->named_parameters()) {
      EXPECT_TRUE(item.value().equal(saved[item.key()])) << item.key();
      EXPECT_EQ(reinterpret_cast<uintptr_t>(item.value().data_ptr()) % 64, 0u) << item.key();
    }
    model["p7"].data().add_(1);  // writes nothing into its neighbours
    EXPECT_TRUE(model["p6"].equal(saved["p6"]));
    EXPECT_TRUE(model["p8"].equal(saved["p8"]));
  }
  auto read = read_weights(path("many.pt"));  // the general reader, from the same block
  ASSERT_EQ(read.size(), 401u);
  for (const auto& [name, tensor] : read) EXPECT_TRUE(tensor.equal(saved[name])) << name;

  // Damage anywhere is found by the checksum, and the model stays as it was.
  auto model = many_small_tensors(400, 2048);
  const auto before = state_dict(*model);
  for (size_t at : {size_t{10}, good.size() / 3, good.size() - 2000, good.size() - 60}) {
    auto flipped = good;
    flipped[at] ^= 0x10;
    write_file(path("flipped.pt"), flipped);
    EXPECT_THROW_MSG(load_weights(*model, path("flipped.pt")), CheckpointError, "checksum mismatch");
  }
  // A directory cut short: the read begun at the open is stopped, and the error says why.
  write_file(path("cut.pt"), good.substr(0, good.size() - 30000));
  EXPECT_THROW_MSG(load_weights(*model, path("cut.pt")), CheckpointError, path("cut.pt"));
  for (const auto& [name, tensor] : state_dict(*model)) EXPECT_TRUE(tensor.equal(before.at(name))) << name;
  EXPECT_TRUE(verify_checkpoint(path("many.pt")).ok);
}

TEST_F(SerializeTest, LoadedStoragesOfEverySizeAreAlignedAndIntact) {
  // Small records share one block, storages under 256 KiB come from the process
  // allocator and larger ones from the load memory (fresh pages, huge from 2 MiB, or
  // pages an earlier load left): each is aligned as
  // LibTorch's CPU allocator aligns (64 bytes) and holds its own bytes.
  // Small records after a large one: their stretch starts at a local header that is not
  // 64-byte aligned in the file.
  const std::vector<std::vector<int64_t>> orders = {
      {int64_t(1), int64_t(1000), int64_t(1024), int64_t(512) << 10, int64_t(5) << 20},
      {int64_t(5) << 20, int64_t(1), int64_t(1000), int64_t(512) << 10, int64_t(1024)}};
  for (const auto& order : orders) {
    torch::nn::ParameterDict params;
    for (int64_t numel : order) {  // records are written in name order
      params->insert("p" + std::to_string(params->size()), torch::randn({numel}));
    }
    save_weights(*params, path("sizes.pt"));
    for (int round = 0; round < 3; ++round) {  // later loads reuse what earlier ones freed
      auto loaded = read_weights(path("sizes.pt"));
      ASSERT_EQ(loaded.size(), 5u);
      for (const auto& [name, tensor] : loaded) {
        EXPECT_EQ(reinterpret_cast<uintptr_t>(tensor.data_ptr()) % 64, 0u) << name << " order " << order.front();
        EXPECT_TRUE(torch::equal(tensor, params[name])) << name;
      }
    }
  }
}

TEST_F(SerializeTest, LoadsIntoAModelReadIntoMemoryEarlierLoadsLeft) {
  torch::nn::ParameterDict saved, model;
  for (int64_t numel : {int64_t(100), int64_t(256) << 10, int64_t(3) << 20}) {
    saved->insert("p" + std::to_string(numel), torch::randn({numel}));
    model->insert("p" + std::to_string(numel), torch::zeros({numel}));
  }
  save_weights(*saved, path("a.pt"));
  torch::NoGradGuard no_grad;
  for (auto& p : saved->parameters()) p.add_(1);
  save_weights(*saved, path("b.pt"));
  release_load_memory();
  std::map<std::string, const void*> storages;
  for (const auto& item : model->named_parameters()) storages[item.key()] = item.value().storage().unsafeGetStorageImpl();
  const auto before = detail::load_memory_stats();
  load_weights(*model, path("b.pt"));
  EXPECT_EQ(detail::load_memory_stats().held_bytes, 0u);  // a single load keeps nothing
  load_weights(*model, path("a.pt"));
  const auto first = detail::load_memory_stats();
  EXPECT_EQ(first.reused, before.reused);         // nothing kept yet: fresh memory
  EXPECT_GT(first.held_bytes, size_t(12) << 20);  // from the second load: the model's old memory
  load_weights(*model, path("b.pt"));
  const auto second = detail::load_memory_stats();
  EXPECT_GE(second.reused - first.reused, 2u);  // both large tensors read into kept memory
  EXPECT_EQ(second.allocated, first.allocated);
  for (const auto& item : model->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), saved[item.key()])) << item.key();
    // The model keeps its storages (views and optimizers see the same ones); only their memory changed.
    EXPECT_EQ(item.value().storage().unsafeGetStorageImpl(), storages[item.key()]) << item.key();
  }
  // A damaged file changes nothing, in kept memory or not.
  auto bytes = read_file(path("b.pt"));
  bytes[bytes.size() / 2] ^= 0x40;
  write_file(path("bad.pt"), bytes);
  EXPECT_THROW_MSG(load_weights(*model, path("bad.pt")), CheckpointError, "bad.pt");
  for (const auto& item : model->named_parameters()) EXPECT_TRUE(torch::equal(item.value(), saved[item.key()])) << item.key();
  EXPECT_GT(detail::thread_spare_bytes(), 0u);  // the kept tail of the last file read
  release_load_memory();
  EXPECT_EQ(detail::load_memory_stats().held_bytes, 0u);
  EXPECT_EQ(detail::thread_spare_bytes(), 0u);
}

TEST_F(SerializeTest, FullCheckpointLoadsReadIntoMemoryEarlierLoadsLeft) {
  torch::nn::ParameterDict model;
  model->insert("p", torch::randn({int64_t(1) << 20}));
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-3);
  model["p"].mutable_grad() = torch::randn({int64_t(1) << 20});
  adam->step();
  Checkpoint items;
  items.add("model", model);
  items.add("optimizer", adam);
  save(items, path("full.pt"));
  const auto saved = items.state_dict().deepcopy();
  adam->step();  // the state now differs from the file's
  release_load_memory();
  load(items, path("full.pt"));
  load(items, path("full.pt"));  // keeps the first load's memory
  const auto before = detail::load_memory_stats();
  load(items, path("full.pt"));
  const auto after = detail::load_memory_stats();
  // The parameter and both of Adam's moments read into memory the earlier loads' tensors gave up.
  EXPECT_EQ(after.allocated, before.allocated);
  EXPECT_GE(after.reused - before.reused, 3u);
  EXPECT_TRUE(saved.toGenericDict().at("model").toGenericDict().at("p").toTensor().equal(model["p"]));
  const auto moments = items.state_dict().toGenericDict().at("optimizer").toGenericDict().at("state");
  const auto saved_moments = saved.toGenericDict().at("optimizer").toGenericDict().at("state");
  for (const char* name : {"exp_avg", "exp_avg_sq"}) {
    EXPECT_TRUE(moments.toGenericDict().at(0).toGenericDict().at(name).toTensor().equal(
        saved_moments.toGenericDict().at(0).toGenericDict().at(name).toTensor()))
        << name;
  }
  release_load_memory();
}

TEST_F(SerializeTest, LoadMemoryMakesRoomForTheSizesOfTheLastLoad) {
  // Two models of the same bytes in tensors of other sizes (3 MiB, and 1 MiB, which a 3 MiB
  // block is too large to serve): what the first left must not keep the second from keeping its own.
  auto make = [](int count, int64_t numel, float value) {
    torch::nn::ParameterDict dict;
    for (int i = 0; i < count; ++i) dict->insert("p" + std::to_string(i), torch::full({numel}, value + i));
    return dict;
  };
  auto a_saved = make(2, int64_t(768) << 10, 1), a_model = make(2, int64_t(768) << 10, 0);
  auto b_saved = make(6, int64_t(256) << 10, 10), b_model = make(6, int64_t(256) << 10, 0);
  save_weights(*a_saved, path("a.pt"));
  save_weights(*b_saved, path("b.pt"));
  release_load_memory();
  load_weights(*a_model, path("a.pt"));
  load_weights(*a_model, path("a.pt"));  // keeps the first load's memory: 3 MiB blocks
  load_weights(*b_model, path("b.pt"));
  const auto before = detail::load_memory_stats();
  load_weights(*b_model, path("b.pt"));
  const auto after = detail::load_memory_stats();
  EXPECT_EQ(after.allocated, before.allocated);  // every tensor read into memory kept from the last load
  EXPECT_EQ(after.reused - before.reused, 6u);
  for (const auto& item : b_model->named_parameters()) EXPECT_TRUE(torch::equal(item.value(), b_saved[item.key()])) << item.key();
  release_load_memory();
}

TEST_F(SerializeTest, MemoryAModelBorrowedIsNeverReadIntoByALaterLoad) {
  const int64_t numel = int64_t(1) << 20;
  std::vector<float> borrowed(numel, 7.0f);
  torch::nn::ParameterDict saved, model, other;
  saved->insert("p", torch::randn({numel}));
  model->insert("p", torch::from_blob(borrowed.data(), {numel}));  // the caller's memory
  other->insert("p", torch::zeros({numel}));
  save_weights(*saved, path("a.pt"));
  release_load_memory();
  load_weights(*other, path("a.pt"));  // loads from the second on keep memory
  load_weights(*model, path("a.pt"));
  EXPECT_TRUE(torch::equal(model["p"], saved["p"]));
  load_weights(*other, path("a.pt"));  // reads into kept memory, never into `borrowed`
  load_weights(*other, path("a.pt"));
  EXPECT_TRUE(std::all_of(borrowed.begin(), borrowed.end(), [](float v) { return v == 7.0f; }));
  release_load_memory();
}

TEST_F(SerializeTest, BuffersAreSaved) {
  auto model = torch::nn::Sequential(torch::nn::Linear(3, 4), torch::nn::BatchNorm1d(4));
  model->forward(torch::randn({8, 3}));  // updates the running stats
  save_weights(*model, path("bn.pt"));
  auto fresh = torch::nn::Sequential(torch::nn::Linear(3, 4), torch::nn::BatchNorm1d(4));
  load_weights(*fresh, path("bn.pt"));
  expect_same_weights(*model, *fresh);
  EXPECT_TRUE(state_dict(*fresh).count("1.running_mean"));
}

TEST_F(SerializeTest, PlainTorchSaveArchiveLoads) {
  Mlp model, fresh;
  torch::save(model, path("plain.pt"));
  load_weights(*fresh, path("plain.pt"));
  expect_same_weights(*model, *fresh);
}

TEST_F(SerializeTest, SaveReplacesAtomicallyAndLeavesNoTemporaries) {
  Mlp first, second;
  save_weights(*first, path("w.pt"));
  save_weights(*second, path("w.pt"));
  EXPECT_EQ(files(), (std::vector<std::string>{"w.pt"}));
  Mlp loaded;
  load_weights(*loaded, path("w.pt"));
  expect_same_weights(*second, *loaded);
}

TEST_F(SerializeTest, FailedSaveKeepsPreviousFile) {
  Mlp model;
  save_weights(*model, path("w.pt"));
  auto before = read_file(path("w.pt"));
  // A parent that is a regular file cannot be created as a directory.
  write_file(path("blocker"), "x");
  EXPECT_THROW_MSG(save_weights(*model, path("blocker/w.pt")), CheckpointError, path("blocker"));
  fs::create_directories(path("dir.pt"));
  EXPECT_THROW_MSG(save_weights(*model, path("dir.pt")), CheckpointError, "existing directory: " + path("dir.pt"));
  EXPECT_TRUE(read_file(path("w.pt")) == before) << "the previous checkpoint changed";
  EXPECT_EQ(files(), (std::vector<std::string>{"blocker", "dir.pt", "w.pt"}));
}

TEST_F(SerializeTest, MissingFileError) {
  Mlp model;
  EXPECT_THROW_MSG(load_weights(*model, path("nope.pt")), CheckpointError, path("nope.pt"), "does not exist");
  save_weights(*model, path("w.pt"));
  EXPECT_THROW_MSG(load_weights(*model, path("w.pt/inside.pt")), CheckpointError, path("w.pt/inside.pt"),
                   "does not exist");
}

TEST_F(SerializeTest, APathThatIsNoFileIsNamedAndNotWaitedOn) {
  Mlp model;
  fs::create_directories(path("dir.pt"));
  EXPECT_THROW_MSG(load_weights(*model, path("dir.pt")), CheckpointError, path("dir.pt"), "is a directory, not a file");
  // Opening a FIFO for reading blocks until a writer comes: the load must refuse it instead.
  ASSERT_EQ(::mkfifo(path("fifo.pt").c_str(), 0600), 0);
  EXPECT_THROW_MSG(load_weights(*model, path("fifo.pt")), CheckpointError, path("fifo.pt"), "is not a regular file");
  EXPECT_FALSE(verify_checkpoint(path("fifo.pt")).ok);
}

TEST_F(SerializeTest, VerifyAcceptsBothKinds) {
  auto s = make_setup();
  s.trainer->save_weights(path("w.pt"));
  s.trainer->save_checkpoint(path("full.pt"));
  for (const auto* name : {"w.pt", "full.pt"}) {
    auto result = verify_checkpoint(path(name));
    EXPECT_TRUE(result.ok) << name << ": " << result.reason;
    EXPECT_TRUE(static_cast<bool>(result));
  }
}

TEST_F(SerializeTest, VerifyReportsWhy) {
  Mlp model;
  save_weights(*model, path("good.pt"));
  auto good = read_file(path("good.pt"));
  auto reason = [&](const std::string& bytes) {
    write_file(path("bad.pt"), bytes);
    auto result = verify_checkpoint(path("bad.pt"));
    EXPECT_FALSE(result.ok);
    return result.reason;
  };
  EXPECT_NE(reason("").find("the file is empty"), std::string::npos);
  EXPECT_NE(reason("hello world").find("does not start with a zip record"), std::string::npos);
  for (size_t cut : {size_t{10}, good.size() / 3, good.size() - 30, good.size() - 1}) {
    EXPECT_NE(reason(good.substr(0, cut)).find("truncated"), std::string::npos) << cut;
  }
  auto flipped = good;
  flipped[100] ^= 0x01;  // inside the first tensor's data
  EXPECT_NE(reason(flipped).find("checksum mismatch"), std::string::npos);
  EXPECT_NE(verify_checkpoint(path("missing.pt")).reason.find("does not exist"), std::string::npos);
  torch::save(model, path("plain.pt"));
  EXPECT_NE(verify_checkpoint(path("plain.pt")).reason.find("no torchfit checksum"), std::string::npos);
}

TEST_F(SerializeTest, VerifyFindsAFlippedByteInEveryStretchOfALargeFile) {
  // From 2 MiB the checksum is computed in stretches on two threads and combined: a flip anywhere
  // must still show, and an intact file must still pass.
  torch::nn::ParameterDict params;
  for (int i = 0; i < 3; ++i) params->insert("p" + std::to_string(i), torch::randn({int64_t(1) << 20}));
  save_weights(*params, path("large.pt"));
  const auto good = read_file(path("large.pt"));
  ASSERT_GT(good.size(), size_t(12) << 20);
  EXPECT_TRUE(verify_checkpoint(path("large.pt")).ok) << verify_checkpoint(path("large.pt")).reason;
  for (size_t at : {size_t{100}, size_t(1) << 20, (size_t(1) << 20) - 1, good.size() / 2, good.size() - 200}) {
    auto flipped = good;
    flipped[at] ^= 0x10;
    write_file(path("flipped.pt"), flipped);
    const auto result = verify_checkpoint(path("flipped.pt"));
    EXPECT_FALSE(result.ok) << "byte " << at;
    EXPECT_NE(result.reason.find("checksum mismatch"), std::string::npos) << "byte " << at << ": " << result.reason;
  }
}

TEST_F(SerializeTest, CorruptFilesFailAndLeaveModelUnchanged) {
  auto s = make_setup();
  s.trainer->save_weights(path("good.pt"));
  s.trainer->save_checkpoint(path("good_full.pt"));
  std::vector<std::pair<std::string, std::string>> cases = {{"empty.pt", ""}, {"text.pt", "this is not a checkpoint"}};
  for (const auto* source : {"good.pt", "good_full.pt"}) {
    auto good = read_file(path(source));
    for (size_t cut : {size_t{1}, size_t{100}, good.size() / 2, good.size() - 23, good.size() - 1}) {
      cases.emplace_back(fmt::format("{}.cut{}", source, cut), good.substr(0, cut));
    }
    for (size_t at : {size_t{200}, good.size() / 2, good.size() - 40}) {
      auto flipped = good;
      flipped[at] = static_cast<char>(flipped[at] ^ 0x10);
      cases.emplace_back(fmt::format("{}.flip{}", source, at), flipped);
    }
  }
  auto target = make_setup();
  auto before = state_dict(*target.model);
  for (const auto& [name, bytes] : cases) {
    write_file(path(name), bytes);
    SCOPED_TRACE(name);
    EXPECT_THROW_MSG(target.trainer->load_weights(path(name)), CheckpointError, path(name));
    EXPECT_THROW_MSG(target.trainer->load_checkpoint(path(name)), CheckpointError, path(name));
  }
  for (const auto& [name, tensor] : state_dict(*target.model)) EXPECT_TRUE(torch::equal(tensor, before.at(name))) << name;
  EXPECT_EQ(target.trainer->state().epoch, 0);
}

TEST_F(SerializeTest, DamagedFileErrorSaysWhat) {
  Mlp model;
  save_weights(*model, path("w.pt"));
  auto bytes = read_file(path("w.pt"));
  bytes[70] ^= 0x40;
  write_file(path("w.pt"), bytes);
  EXPECT_THROW_MSG(load_weights(*model, path("w.pt")), CheckpointError,
                   "Checkpoint " + path("w.pt") + " is damaged: checksum mismatch");
  write_file(path("cut.pt"), bytes.substr(0, bytes.size() / 2));
  EXPECT_THROW_MSG(load_weights(*model, path("cut.pt")), CheckpointError, path("cut.pt") + " is damaged: truncated");
}

TEST_F(SerializeTest, MismatchedArchitectureNamesTheKey) {
  auto wide = torch::nn::Sequential(torch::nn::Linear(3, 7));
  auto narrow = torch::nn::Sequential(torch::nn::Linear(3, 5));
  save_weights(*wide, path("wide.pt"));
  auto before = state_dict(*narrow);
  EXPECT_THROW_MSG(load_weights(*narrow, path("wide.pt")), CheckpointError, path("wide.pt"), "'0.bias' has shape [7]",
                   "shape [5]", "'0.weight'");
  for (const auto& [name, tensor] : state_dict(*narrow)) EXPECT_TRUE(torch::equal(tensor, before.at(name)));

  auto deeper = torch::nn::Sequential(torch::nn::Linear(3, 7), torch::nn::Linear(7, 2));
  EXPECT_THROW_MSG(load_weights(*deeper, path("wide.pt")), CheckpointError, "missing key(s): '1.bias'");
  auto shallow = torch::nn::Sequential();
  shallow->push_back(torch::nn::Linear(3, 7));
  save_weights(*deeper, path("deeper.pt"));
  EXPECT_THROW_MSG(load_weights(*shallow, path("deeper.pt")), CheckpointError, "unexpected key(s): '1.bias'");

  auto doubles = torch::nn::Sequential(torch::nn::Linear(3, 7));
  doubles->to(torch::kDouble);
  EXPECT_THROW_MSG(load_weights(*doubles, path("wide.pt")), CheckpointError, "dtype Float", "dtype Double");
}

TEST_F(SerializeTest, ADamagedFileIsReportedBeforeAMismatchWithTheModel) {
  // The model is matched while the file is still read; the checksum speaks first.
  auto wide = torch::nn::Sequential(torch::nn::Linear(3, 7));
  save_weights(*wide, path("wide.pt"));
  uint64_t tensor_at = 0;
  {
    detail::FileReader file(path("wide.pt"));
    tensor_at = detail::read_directory(file, /*read_local_headers=*/true).records.at("data/0").offset;
  }
  auto bytes = read_file(path("wide.pt"));
  bytes[tensor_at] ^= 0x01;  // a tensor's byte: the pickle still parses
  write_file(path("wide.pt"), bytes);
  auto narrow = torch::nn::Sequential(torch::nn::Linear(3, 5));
  for (auto* model : {&wide, &narrow}) {
    auto before = state_dict(**model);
    try {
      load_weights(**model, path("wide.pt"));
      FAIL() << "expected CheckpointError";
    } catch (const CheckpointError& e) {
      EXPECT_NE(std::string(e.what()).find(path("wide.pt") + " is damaged: checksum mismatch"), std::string::npos)
          << e.what();
      EXPECT_EQ(std::string(e.what()).find("does not match"), std::string::npos) << e.what();
    }
    for (const auto& [name, tensor] : state_dict(**model)) EXPECT_TRUE(torch::equal(tensor, before.at(name))) << name;
  }
}

TEST_F(SerializeTest, LoadedParametersStayTrainableLeaves) {
  // A load swaps storages into the parameters: they must stay the same leaf
  // tensors, with their gradient flag, a new version, and train from the new values.
  torch::nn::Linear source(64, 32), target(64, 32);
  save_weights(*source, path("w.pt"));
  auto weight = target->weight;  // the same tensor object, before and after
  auto view_before = target->weight.detach()[0].clone();
  const auto version = target->weight._version();
  load_weights(*target, path("w.pt"));
  EXPECT_TRUE(target->weight.is_same(weight));
  EXPECT_TRUE(target->weight.equal(source->weight));
  EXPECT_TRUE(target->weight.requires_grad());
  EXPECT_TRUE(target->weight.is_leaf());
  EXPECT_GT(target->weight._version(), version);
  EXPECT_FALSE(target->weight[0].equal(view_before));

  torch::optim::SGD sgd(target->parameters(), 0.5);
  auto loss = target->forward(torch::ones({2, 64})).sum();
  loss.backward();
  ASSERT_TRUE(target->weight.grad().defined());
  EXPECT_EQ(target->weight.grad().sizes(), target->weight.sizes());
  sgd.step();
  EXPECT_TRUE(target->weight.equal(source->weight - 0.5 * target->weight.grad()));
}

TEST_F(SerializeTest, FullCheckpointRestoresOptimizerState) {
  auto data = make_data();
  auto model = Mlp();
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.01));
  Trainer trainer(model, adam, ce_loss);
  trainer.fit(data.x_train, data.y_train, FitOptions().epochs(2).batch_size(5).seed(3));
  trainer.save_checkpoint(path("full.pt"));

  auto model2 = Mlp();
  auto adam2 = std::make_shared<torch::optim::Adam>(model2->parameters(), torch::optim::AdamOptions(0.01));
  Trainer restored(model2, adam2, ce_loss);
  restored.load_checkpoint(path("full.pt"));
  EXPECT_EQ(restored.state().epoch, 2);
  EXPECT_EQ(restored.state().global_step, 12);
  // Both continue identically only if the Adam moments and step counts came back.
  trainer.fit(data.x_train, data.y_train, FitOptions().epochs(3).initial_epoch(2).batch_size(5).seed(3));
  restored.fit(data.x_train, data.y_train, FitOptions().epochs(3).batch_size(5).seed(3));
  expect_same_weights(*model, *model2);
}

TEST_F(SerializeTest, LoadWeightsReadsTheModelOfAFullCheckpoint) {
  auto s = make_setup();
  s.trainer->save_checkpoint(path("full.pt"));
  Mlp plain;
  load_weights(*plain, path("full.pt"));
  expect_same_weights(*s.model, *plain);
}

TEST_F(SerializeTest, LoadCheckpointRejectsWeightsOnlyFileAndKeepsState) {
  auto s = make_setup();
  s.trainer->save_weights(path("w.pt"));
  auto before = state_dict(*s.model);
  EXPECT_THROW_MSG(s.trainer->load_checkpoint(path("w.pt")), CheckpointError, path("w.pt"),
                   "not a full torchfit checkpoint");
  for (const auto& [name, tensor] : state_dict(*s.model)) EXPECT_TRUE(torch::equal(tensor, before.at(name)));
}

TEST_F(SerializeTest, LoadCheckpointOfOtherArchitectureKeepsModelAndOptimizer) {
  auto data = make_data();
  auto other = torch::nn::Sequential(torch::nn::Linear(3, 3));
  auto other_sgd = std::make_shared<torch::optim::SGD>(other->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  Trainer other_trainer(other, other_sgd, ce_loss);
  other_trainer.fit(data.x_train, data.y_train, FitOptions().batch_size(5));
  other_trainer.save_checkpoint(path("other.pt"));

  auto s = make_setup();
  auto before = state_dict(*s.model);
  EXPECT_THROW_MSG(s.trainer->load_checkpoint(path("other.pt")), CheckpointError, path("other.pt"),
                   "does not match the model");
  for (const auto& [name, tensor] : state_dict(*s.model)) EXPECT_TRUE(torch::equal(tensor, before.at(name)));
  EXPECT_EQ(s.trainer->state().epoch, 0);
}


/// fc1 -> BatchNorm -> fc2, as a Python nn.Sequential of the same names would be.
struct NormNetImpl : torch::nn::Module {
  NormNetImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(3, 5));
    bn = register_module("bn", torch::nn::BatchNorm1d(5));
    fc2 = register_module("fc2", torch::nn::Linear(5, 3));
  }
  torch::Tensor forward(torch::Tensor x) { return fc2(bn(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
};
TORCH_MODULE(NormNet);

/// Each tensor's name and raw bits, one line each, as the Python side prints them.
std::string bits_of(const TensorMap& tensors) {
  std::string out;
  for (const auto& [name, tensor] : tensors) {
    auto t = tensor.contiguous();
    auto bits = t.scalar_type() == torch::kFloat ? t.view(torch::kInt32).to(torch::kLong) : t.to(torch::kLong);
    out += fmt::format("{}:{}\n", name, fmt::join(bits.data_ptr<int64_t>(), bits.data_ptr<int64_t>() + bits.numel(), ","));
  }
  return out;
}

TEST_F(SerializeTest, PythonStateDictLoadsInCpp) {
  if (!have_python_torch()) GTEST_SKIP() << "Debian's python3 with python3-torch is not installed";
  auto script = fmt::format(
      "import collections, torch\n"
      "torch.manual_seed(3)\n"
      "m = torch.nn.Sequential(collections.OrderedDict(fc1=torch.nn.Linear(3, 5), bn=torch.nn.BatchNorm1d(5),"
      " fc2=torch.nn.Linear(5, 3)))\n"
      "m(torch.randn(8, 3))  # moves the running statistics\n"
      "sd = m.state_dict()\n"
      "torch.save(sd, '{}')\n"
      "with open('{}', 'w') as f:\n"
      "    for k in sorted(sd):\n"
      "        t = sd[k].contiguous()\n"
      "        v = t.view(torch.int32) if t.dtype == torch.float32 else t\n"
      "        f.write(k + ':' + ','.join(str(x) for x in v.flatten().tolist()) + '\\n')\n",
      path("python.pt"), path("expected.txt"));
  write_file(path("make.py"), script);
  ASSERT_EQ(std::system(fmt::format("/usr/bin/python3 {} 2>{}", path("make.py"), path("err.txt")).c_str()), 0)
      << read_file(path("err.txt"));
  EXPECT_NE(verify_checkpoint(path("python.pt")).reason.find("no torchfit checksum"), std::string::npos);
  NormNet model;
  load_weights(*model, path("python.pt"));
  EXPECT_EQ(bits_of(state_dict(*model)), read_file(path("expected.txt")));
  EXPECT_EQ(state_dict(*model).at("bn.num_batches_tracked").item<int64_t>(), 1);
}

TEST_F(SerializeTest, OneTensorUnderTwoNamesLoadsIntoIndependentParameters) {
  // A file may hold one tensor under two names; the two parameters it loads
  // into must not end up sharing memory.
  struct Pair : torch::nn::Module {
    at::Tensor first = register_parameter("first", torch::zeros({1024}));
    at::Tensor second = register_parameter("second", torch::zeros({1024}));
  };
  c10::impl::GenericDict weights(c10::StringType::get(), c10::TensorType::get());
  auto values = torch::arange(1024, torch::kFloat);
  weights.insert("first", values);
  weights.insert("second", values);
  FileCheckpointIO().save(weights, path("twice.pt"));  // two tensors sharing one storage
  std::vector<std::string> files = {path("twice.pt")};
  if (have_python_torch()) {  // Python's pickle memoizes: one tensor object under both names
    write_file(path("make.py"), fmt::format("import torch\nt = torch.arange(1024, dtype=torch.float32)\n"
                                             "torch.save({{'first': t, 'second': t}}, '{}')\n",
                                             path("python_twice.pt")));
    ASSERT_EQ(std::system(fmt::format("/usr/bin/python3 {}", path("make.py")).c_str()), 0);
    files.push_back(path("python_twice.pt"));
  }
  for (const auto& file : files) {
    SCOPED_TRACE(file);
    Pair model;
    load_weights(model, file);
    EXPECT_TRUE(model.first.equal(values));
    EXPECT_TRUE(model.second.equal(values));
    {
      torch::NoGradGuard no_grad;
      model.first.add_(1);
    }
    EXPECT_TRUE(model.second.equal(values)) << "writing one parameter changed the other";
  }
}

TEST_F(SerializeTest, WeightsOnlyFileLoadsInPython) {
  const char* python = "/usr/bin/python3";
  if (!have_python_torch()) GTEST_SKIP() << "Debian's python3 with python3-torch is not installed";
  Mlp model;
  save_weights(*model, path("w.pt"));
  auto script = fmt::format(
      "import torch\n"
      "d = torch.load('{}')\n"
      "assert isinstance(d, dict), type(d)\n"
      "m = torch.nn.Sequential()\n"
      "m.add_module('fc1', torch.nn.Linear(3, 5)); m.add_module('fc2', torch.nn.Linear(5, 3))\n"
      "m.load_state_dict(d)\n"
      "print(sorted(d), d['fc1.weight'].view(torch.int32).flatten().tolist())\n",
      path("w.pt"));
  write_file(path("check.py"), script);
  auto command = fmt::format("{} {} > {} 2>&1", python, path("check.py"), path("out.txt"));
  ASSERT_EQ(std::system(command.c_str()), 0) << read_file(path("out.txt"));
  auto bits = model->fc1->weight.detach().view(torch::kInt32).flatten();
  auto expected = fmt::format("['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight'] [{}]\n",
                              fmt::join(bits.data_ptr<int32_t>(), bits.data_ptr<int32_t>() + bits.numel(), ", "));
  EXPECT_EQ(read_file(path("out.txt")), expected);
}

TEST_F(SerializeTest, BackgroundSavesWriteLargeRecordsAsSyncSavesDo) {
  // Records of 16 MiB and more are written while a second thread computes their CRC.
  c10::impl::GenericDict state(c10::StringType::get(), c10::TensorType::get());
  state.insert("large", torch::randn({5 << 20}));  // 20 MiB
  state.insert("small", torch::randn({100}));
  FileCheckpointIO sync;
  sync.save(state, path("sync.pt"));
  AsyncCheckpointIO async(std::make_shared<FileCheckpointIO>());
  async.save(state, path("async.pt"));
  async.wait();
  // The pickles may differ in memo numbering (the async one pickles snapshot copies);
  // the large record, its header and its CRC descriptor must not.
  auto async_bytes = read_file(path("async.pt")), sync_bytes = read_file(path("sync.pt"));
  auto differ = std::mismatch(async_bytes.begin(), async_bytes.end(), sync_bytes.begin(), sync_bytes.end());
  EXPECT_GT(differ.first - async_bytes.begin(), (20 << 20) + 64 + 16);
  auto verified = verify_checkpoint(path("async.pt"));
  EXPECT_TRUE(verified.ok) << verified.reason;
  auto loaded = async.load(path("async.pt")).toGenericDict();
  EXPECT_TRUE(torch::equal(loaded.at("large").toTensor(), state.at("large").toTensor()));
}

TEST_F(SerializeTest, SmallTensorsOfOneLoadAreIndependentAndOutliveTheRest) {
  // Small records share one allocation; each tensor must still behave as its own.
  c10::impl::GenericDict state(c10::StringType::get(), c10::TensorType::get());
  for (int i = 0; i < 300; ++i) state.insert("t" + std::to_string(i), torch::full({i % 7 + 1}, static_cast<float>(i)));
  state.insert("empty", torch::empty({0}));
  state.insert("large", torch::arange(100000, torch::kFloat));  // its own allocation
  FileCheckpointIO io;
  io.save(state, path("many.pt"));
  at::Tensor kept;
  {
    auto loaded = io.load(path("many.pt")).toGenericDict();
    ASSERT_EQ(loaded.size(), 302u);
    loaded.at("t5").toTensor().add_(1000);  // writes nothing into its neighbours
    EXPECT_TRUE(torch::equal(loaded.at("t4").toTensor(), state.at("t4").toTensor()));
    EXPECT_TRUE(torch::equal(loaded.at("t6").toTensor(), state.at("t6").toTensor()));
    EXPECT_EQ(loaded.at("empty").toTensor().numel(), 0);
    kept = loaded.at("t299").toTensor();
  }
  std::vector<at::Tensor> churn;  // reuse freed memory, if any was freed too early
  for (int i = 0; i < 300; ++i) churn.push_back(torch::full({8}, -1.0f));
  EXPECT_TRUE(torch::equal(kept, state.at("t299").toTensor()));
}

/// Which pages of `file` are in the page cache (looking reads nothing).
std::vector<bool> resident_pages(const std::string& file) {
  std::vector<bool> out;
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  auto length = static_cast<size_t>(::lseek(fd, 0, SEEK_END));
  void* map = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return out;
  std::vector<unsigned char> pages((length + detail::kPageSize - 1) / detail::kPageSize);
  if (::mincore(map, length, pages.data()) == 0) {
    for (auto page : pages) out.push_back(page & 1);
  }
  ::munmap(map, length);
  return out;
}

TEST_F(SerializeTest, DurableSavesWriteRecordsPastThePageCache) {
  // Large records start on a page of the file. A durable background save sends
  // its page-aligned copies straight to the disk; a durable sync save writes the
  // model's own (unaligned) memory through the page cache and drops it once on
  // the disk. Neither leaves its file in the page cache.
  int probe = ::open(path("probe").c_str(), O_WRONLY | O_CREAT | O_DIRECT | O_CLOEXEC, 0644);
  if (probe < 0) GTEST_SKIP() << "this file system does not take O_DIRECT";
  ::close(probe);
  c10::impl::GenericDict state(c10::StringType::get(), c10::TensorType::get());
  state.insert("small", torch::randn({100}));
  state.insert("large", torch::randn({(2 << 20) / 4 + 7}));  // 2 MiB and a bit: a partial last page
  AsyncCheckpointIO durable(std::make_shared<FileCheckpointIO>());
  AsyncCheckpointIO cached(std::make_shared<FileCheckpointIO>(SaveOptions().fsync(false)));
  ASSERT_NE(reinterpret_cast<uintptr_t>(state.at("large").toTensor().data_ptr()) % detail::kPageSize, 0u)
      << "the sync case needs a source off its pages";
  durable.save(state, path("durable.pt"));
  cached.save(state, path("cached.pt"));
  FileCheckpointIO().save(state, path("sync.pt"));
  durable.wait();
  cached.wait();

  for (const char* file : {"durable.pt", "sync.pt", "cached.pt"}) {
    auto resident_before_reading = resident_pages(path(file));
    auto records = detail::read_directory(detail::FileReader(path(file)), /*read_local_headers=*/true).records;
    uint64_t large = 0;
    for (const auto& [name, span] : records) {
      EXPECT_EQ(span.offset % (span.size >= detail::kPageAlignedRecord ? detail::kPageSize : 64), 0u) << name;
      if (span.size >= detail::kPageAlignedRecord) large = span.offset;
    }
    ASSERT_GT(large, 0u) << file;
    size_t whole_pages = state.at("large").toTensor().nbytes() / detail::kPageSize;
    ASSERT_GE(resident_before_reading.size(), large / detail::kPageSize + whole_pages);
    auto first = resident_before_reading.begin() + static_cast<std::ptrdiff_t>(large / detail::kPageSize);
    auto resident = static_cast<size_t>(std::count(first, first + static_cast<std::ptrdiff_t>(whole_pages), true));
    if (std::string(file) != "cached.pt") {
      EXPECT_EQ(resident, 0u) << file << ": the durable save went through the page cache";
      auto all = static_cast<size_t>(std::count(resident_before_reading.begin(), resident_before_reading.end(), true));
      EXPECT_EQ(all, 0u) << file << ": pages of the durable file stayed in the page cache";
    } else {
      EXPECT_EQ(resident, whole_pages) << "the control: a buffered write stays in the page cache";
    }
    auto verified = verify_checkpoint(path(file));
    EXPECT_TRUE(verified.ok) << file << ": " << verified.reason;
    auto loaded = durable.load(path(file)).toGenericDict();
    EXPECT_TRUE(torch::equal(loaded.at("large").toTensor(), state.at("large").toTensor())) << file;
    EXPECT_TRUE(torch::equal(loaded.at("small").toTensor(), state.at("small").toTensor())) << file;
  }
}

TEST_F(SerializeTest, ZipWriterTrustsAndFillsKnownCrcsOfRegisteredBuffersOnly) {
  std::vector<float> tracked(3000, 1.5f), other(3000, 2.5f);
  const size_t bytes = tracked.size() * sizeof(float);
  detail::KnownCrcs crcs;
  crcs.track(tracked.data(), bytes);
  auto write = [&](const std::string& file) {
    detail::AtomicFile out(file, false);
    detail::ChecksumSink sink(out);
    detail::ZipWriter zip(sink, "archive", &crcs);
    zip.add("data/0", tracked.data(), bytes);
    zip.add("data/1", other.data(), bytes);
    zip.finish();
    out.commit();
  };
  write(path("first.zip"));
  auto records = detail::read_directory(detail::FileReader(path("first.zip")), /*read_local_headers=*/true).records;
  EXPECT_EQ(crcs.find(tracked.data(), bytes), records.at("data/0").crc);
  EXPECT_FALSE(crcs.find(other.data(), bytes)) << "an unregistered buffer's address may be reused";
  EXPECT_TRUE(detail::check_integrity(path("first.zip")).status == detail::Integrity::Status::Intact);

  // A known CRC is written without reading the bytes: the snapshot must forget it
  // whenever the buffer changes, or the file fails its checksum (never loads wrong).
  crcs.remember(tracked.data(), bytes, records.at("data/0").crc ^ 1);
  write(path("second.zip"));
  auto second = detail::read_directory(detail::FileReader(path("second.zip")), /*read_local_headers=*/true);
  EXPECT_EQ(second.records.at("data/0").crc, records.at("data/0").crc ^ 1);
  EXPECT_FALSE(verify_checkpoint(path("second.zip")).ok);
}

// ---- The reader of LibTorch's pickles (format/libtorch_pickle.h), against LibTorch's Unpickler

/// A pickle as LibTorch's Pickler writes it into every torchfit file, with the
/// tensors whose storages it names.
struct Pickled {
  std::string bytes;
  std::vector<at::Tensor> storages;

  /// `tagged`: with LibTorch's type tags (restore_type_tag); torchfit writes none.
  explicit Pickled(const c10::IValue& value, bool tagged = true) {
    torch::jit::Pickler pickler([this](const char* data, size_t size) { bytes.append(data, size); }, nullptr,
                                nullptr, nullptr, nullptr, tagged);
    pickler.protocol();
    pickler.pushIValue(value);
    pickler.stop();
    storages = pickler.tensorData();
  }
  /// A fresh copy of the bytes of storage `key`.
  at::DataPtr copy(const std::string& key) const {
    auto data = torch::jit::getWriteableTensorData(storages.at(std::stoul(key)));
    auto out = c10::GetCPUAllocator()->allocate(data.sizeInBytes());
    if (data.sizeInBytes() > 0) std::memcpy(out.get(), data.data(), data.sizeInBytes());
    return out;
  }
  c10::IValue with_libtorch() const {
    size_t position = 0;
    auto reader = [&](char* buffer, size_t n) {
      n = std::min(n, bytes.size() - position);
      std::memcpy(buffer, bytes.data() + position, n);
      position += n;
      return n;
    };
    torch::jit::Unpickler unpickler(reader, nullptr, nullptr, [this](const std::string& key) { return copy(key); },
                                    at::Device(at::kCPU));
    return unpickler.parse_ivalue();
  }
  c10::IValue fast() const {
    auto out = torchfit::detail::read_libtorch_pickle(bytes);
    for (auto& unbound : out.storages) {
      if (unbound.storage.nbytes() > 0) unbound.storage.set_data_ptr_noswap(copy(unbound.key));
    }
    return out.value;
  }
};

/// Expects `fast` to be what LibTorch made, down to types, tensor layouts and
/// which tensors and storages are shared.
class SameValue {
 public:
  void check(const c10::IValue& expected, const c10::IValue& fast, const std::string& where) {
    ASSERT_EQ(expected.tagKind(), fast.tagKind()) << where;
    EXPECT_EQ(expected.type()->str(), fast.type()->str()) << where;
    if (expected.isTensor()) return tensor(expected.toTensor(), fast.toTensor(), where);
    if (expected.isGenericDict()) {
      auto a = expected.toGenericDict(), b = fast.toGenericDict();
      ASSERT_EQ(a.size(), b.size()) << where;
      for (auto i = a.begin(), j = b.begin(); i != a.end(); ++i, ++j) {
        check(i->key(), j->key(), where + " key");
        check(i->value(), j->value(), where + "[" + (i->key().isString() ? i->key().toStringRef() : "?") + "]");
      }
    } else if (expected.isList()) {
      auto a = expected.toListRef(), b = fast.toListRef();
      ASSERT_EQ(a.size(), b.size()) << where;
      for (size_t i = 0; i < a.size(); ++i) check(a[i], b[i], where + "[" + std::to_string(i) + "]");
    } else if (expected.isTuple()) {
      auto a = expected.toTupleRef().elements().asArrayRef(), b = fast.toTupleRef().elements().asArrayRef();
      ASSERT_EQ(a.size(), b.size()) << where;
      for (size_t i = 0; i < a.size(); ++i) check(a[i], b[i], where + "(" + std::to_string(i) + ")");
    } else {
      EXPECT_TRUE(expected == fast) << where << ": " << expected << " vs " << fast;
    }
  }

 private:
  void tensor(const at::Tensor& a, const at::Tensor& b, const std::string& where) {
    EXPECT_EQ(a.scalar_type(), b.scalar_type()) << where;
    EXPECT_EQ(a.sizes(), b.sizes()) << where;
    EXPECT_EQ(a.strides(), b.strides()) << where;
    EXPECT_EQ(a.storage_offset(), b.storage_offset()) << where;
    EXPECT_EQ(a.requires_grad(), b.requires_grad()) << where;
    EXPECT_EQ(a.unsafeGetTensorImpl()->key_set(), b.unsafeGetTensorImpl()->key_set()) << where;
    EXPECT_EQ(a.storage().nbytes(), b.storage().nbytes()) << where;
    EXPECT_EQ(a.storage().resizable(), b.storage().resizable()) << where;
    if (a.numel() > 0) EXPECT_TRUE(a.equal(b)) << where;
    same_identity(tensors_, a.unsafeGetTensorImpl(), b.unsafeGetTensorImpl(), where + " (tensor)");
    same_identity(storages_, a.storage().unsafeGetStorageImpl(), b.storage().unsafeGetStorageImpl(),
                  where + " (storage)");
  }
  /// `a` and `b` pair up as every earlier pair did, in both directions.
  static void same_identity(std::map<const void*, const void*>& pairs, const void* a, const void* b,
                            const std::string& where) {
    auto [it, added] = pairs.emplace(a, b);
    EXPECT_EQ(it->second, b) << where << " is shared differently";
    if (added) {
      for (const auto& [x, y] : pairs) EXPECT_TRUE(x == a || y != b) << where << " is shared differently";
    }
  }
  std::map<const void*, const void*> tensors_, storages_;
};

void expect_fast_read_matches_libtorch(const c10::IValue& value) {
  Pickled pickled(value);
  SameValue().check(pickled.with_libtorch(), pickled.fast(), "value");
}

TEST(LibTorchPickleTest, ReadsStateDictsAsLibTorchDoes) {
  c10::impl::GenericDict weights(c10::StringType::get(), c10::TensorType::get());
  for (auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kLong, at::kInt, at::kShort, at::kChar,
                     at::kByte, at::kBool, at::kComplexFloat}) {
    weights.insert(std::string("dtype.") + c10::toString(dtype), at::randn({3, 2}).to(dtype));
  }
  auto base = at::arange(24, at::kFloat).reshape({4, 6});
  weights.insert("transposed", base.t());
  weights.insert("row", base[2]);                      // shares base's storage, with an offset
  weights.insert("column", base.select(1, 3));         // strided view of the same storage
  weights.insert("base", base);
  weights.insert("base.again", base);                  // the same tensor twice
  weights.insert("scalar", at::scalar_tensor(2.5));
  weights.insert("empty", at::empty({0, 3}));
  weights.insert("parameter", at::randn({5}).requires_grad_());
  weights.insert("big", at::full({2}, int64_t{1} << 40, at::kLong));
  expect_fast_read_matches_libtorch(weights);
}

TEST(LibTorchPickleTest, ReadsNestedStateAsLibTorchDoes) {
  c10::impl::GenericDict inner(c10::StringType::get(), c10::TensorType::get());
  inner.insert("exp_avg", at::randn({4}));
  c10::impl::GenericDict by_id(c10::IntType::get(), c10::StringType::get());
  by_id.insert(7, "seven");
  by_id.insert(-70000, "negative");
  c10::impl::GenericList mixed(c10::AnyType::get());
  mixed.push_back(1);
  mixed.push_back("two");
  mixed.push_back(3.25);
  mixed.push_back(c10::IValue());
  mixed.push_back(at::ones({2}));
  c10::impl::GenericDict state(c10::StringType::get(), c10::AnyType::get());
  state.insert("ints", c10::List<int64_t>({0, 255, 256, 65535, 65536, -1, INT32_MIN, int64_t{1} << 40}));
  state.insert("doubles", c10::List<double>({0.1, -2.5e300, 0.0}));
  state.insert("bools", c10::List<bool>({true, false}));
  state.insert("tensors", c10::List<at::Tensor>({at::zeros({1}), at::ones({2, 2})}));
  state.insert("mixed", mixed);
  state.insert("empty list", c10::impl::GenericList(c10::AnyType::get()));
  for (int n = 0; n <= 4; ++n) {
    std::vector<c10::IValue> items;
    for (int i = 0; i < n; ++i) items.emplace_back(i);
    state.insert("tuple" + std::to_string(n), c10::ivalue::Tuple::create(std::move(items)));
  }
  state.insert("text", "ünïcödé ✓");
  state.insert("flag", true);
  state.insert("nothing", c10::IValue());
  state.insert("optimizer", inner);
  state.insert("by id", by_id);
  expect_fast_read_matches_libtorch(state);
}

/// The bytes of a string literal, embedded NULs included.
template <size_t N>
std::string raw_pickle(const char (&bytes)[N]) {
  return std::string(bytes, N - 1);
}

/// The reason read_libtorch_pickle gives for refusing `pickle`, or "(read)".
std::string refusal(const std::string& pickle) {
  try {
    (void)torchfit::detail::read_libtorch_pickle(pickle);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "(read)";
}

/// `levels` lists, each inside the one before, as LibTorch's Pickler writes them.
c10::IValue nested_lists(int levels) {
  auto inner = c10::impl::GenericList(c10::AnyType::get());
  for (int i = 1; i < levels; ++i) {
    auto outer = c10::impl::GenericList(c10::AnyType::get());
    outer.push_back(inner);
    inner = outer;
  }
  return inner;
}

// Checksums are easy to forge: nothing may make the reader, or whatever walks its
// value, recurse without bound, and nothing outside what LibTorch's Pickler
// writes reaches LibTorch (whose Unpickler trusts what it reads).
TEST(LibTorchPickleTest, WhatLibTorchsPicklerDoesNotWriteIsRefusedSayingWhere) {
  Pickled pickled(c10::IValue(at::ones({4})));
  const std::string& bytes = pickled.bytes;
  std::string lists = "\x80\x02", dicts = "\x80\x02", by_memo = "\x80\x02]r" + std::string(4, '\0');
  for (int i = 0; i < 100000; ++i) lists += "](";
  lists += "]" + std::string(100000, 'e') + ".";
  for (int i = 0; i < 100000; ++i) dicts += "}(K\x01";
  dicts += "}" + std::string(100000, 'u') + ".";
  for (uint32_t i = 1; i <= 200; ++i) {  // each list holds the last, fetched from the memo
    auto id = [](uint32_t v) { return std::string{char(v), char(v >> 8), char(v >> 16), char(v >> 24)}; };
    by_memo += "](j" + id(i - 1) + "er" + id(i);
  }
  const std::string storage_of_type_1000 = raw_pickle("\x80\x02" "(X\x07\x00\x00\x00" "storageM\xe8\x03"
                                                      "X\x01\x00\x00\x00" "0X\x03\x00\x00\x00" "cpuK\x04tQ.");
  const std::pair<std::string, std::string> cases[] = {
      {bytes.substr(0, bytes.size() - 1), "ends without STOP"},
      {"", "not of protocol 2"},
      {std::string("\x80\x03") + bytes.substr(2), "not of protocol 2"},
      {raw_pickle("\x80\x02" "K\x01" "K\x02."), "stops with 2 values"},
      {raw_pickle("\x80\x02" "cbuiltins\nset\n)R."), "calls builtins.set, which torchfit does not read (data.pkl byte 2)"},
      {raw_pickle("\x80\x02" "h\x05."), "not as LibTorch's Pickler writes it: opcode 0x68 (data.pkl byte 2)"},
      {raw_pickle("\x80\x02" "u."), "opcode 0x75"},
      {raw_pickle("\x80\x02" "}(NK\x01u."), "opcode 0x75"},  // None as a key
      {raw_pickle("\x80\x02" "}(K\x01" "K\x02" "K\x03" "u."), "opcode 0x75"},
      {raw_pickle("\x80\x02" "K\x01q\x05."), "opcode 0x71"},
      {raw_pickle("\x80\x02" "K\x01r\xff\xff\xff\xff."), "opcode 0x72"},
      {raw_pickle("\x80\x02" "]K\x01" "a."), "opcode 0x61 (data.pkl byte 5)"},
      {storage_of_type_1000, "opcode 0x74"},  // LibTorch's Unpickler crashes on it
      {raw_pickle("\x80\x02" "]q\x00(h\x00" "e."), "changes a list or dict after sharing it (APPENDS)"},
      {raw_pickle("\x80\x02" "}q\x00(K\x01h\x00" "u."), "changes a list or dict after sharing it (SETITEMS)"},
      {lists, "containers nest deeper than 100 levels (data.pkl byte 200103)"},
      {dicts, "containers nest deeper than 100 levels"},
      {by_memo, "containers nest deeper than 100 levels"},
  };
  for (const auto& [pickle, reason] : cases) {
    EXPECT_NE(refusal(pickle).find(reason), std::string::npos) << reason << ": " << refusal(pickle);
  }
  // The same shapes done right are read.
  auto dict = torchfit::detail::read_libtorch_pickle(raw_pickle("\x80\x02" "}(X\x01\x00\x00\x00" "aK\x01u."));
  EXPECT_EQ(dict.value.toGenericDict().at("a").toInt(), 1);
  auto memo = torchfit::detail::read_libtorch_pickle(raw_pickle("\x80\x02" "K\x07q\x00h\x00\x86."));
  EXPECT_EQ(memo.value.toTupleRef().elements().at(1).toInt(), 7);
  // What LibTorch writes is read, up to the limit the reader of Python's files keeps too.
  EXPECT_EQ(refusal(Pickled(nested_lists(torchfit::detail::kMaxPickleDepth)).bytes), "(read)");
  EXPECT_NE(refusal(Pickled(nested_lists(torchfit::detail::kMaxPickleDepth + 1)).bytes).find("deeper than 100"),
            std::string::npos);
}

TEST(LibTorchPickleTest, ReadsDevicesComplexNumbersAndQuantizedTensorsAsLibTorchDoes) {
  c10::impl::GenericDict state(c10::StringType::get(), c10::AnyType::get());
  state.insert("device", c10::Device("cpu"));
  state.insert("complex", c10::complex<double>(1.5, -2.0));
  state.insert("per tensor", at::quantize_per_tensor(at::randn({3, 4}), 0.1, 3, at::kQInt8));
  state.insert("per tensor, strided", at::quantize_per_tensor(at::randn({4, 3}), 0.2, 0, at::kQUInt8).t());
  state.insert("per channel", at::quantize_per_channel(at::randn({2, 3}), at::rand({2}, at::kDouble) + 0.1,
                                                       at::zeros({2}, at::kLong), 0, at::kQUInt8));
  state.insert("per channel, axis 1", at::quantize_per_channel(at::randn({2, 3}), at::rand({3}, at::kDouble) + 0.1,
                                                               at::ones({3}, at::kLong), 1, at::kQInt8));
  expect_fast_read_matches_libtorch(state);
  auto fast = Pickled(state).fast().toGenericDict();
  for (const char* name : {"per tensor", "per tensor, strided", "per channel", "per channel, axis 1"}) {
    auto expected = state.at(name).toTensor(), read = fast.at(name).toTensor();
    EXPECT_EQ(read.qscheme(), expected.qscheme()) << name;
    EXPECT_TRUE(read.dequantize().equal(expected.dequantize())) << name;
  }
}

TEST_F(SerializeTest, QuantizedAndComplexBuffersRoundTrip) {
  struct Buffers : torch::nn::Module {
    explicit Buffers(double shift) {
      per_tensor = register_buffer("per_tensor", at::quantize_per_tensor(at::randn({4}) + shift, 0.1, 3, at::kQInt8));
      per_channel = register_buffer("per_channel", at::quantize_per_channel(at::randn({2, 3}) + shift,
                                                                            at::rand({2}, at::kDouble) + 0.1,
                                                                            at::zeros({2}, at::kLong), 0, at::kQUInt8));
      complex = register_buffer("complex", at::randn({3}, at::kComplexFloat) + shift);
      register_buffer("per_channel_again", per_channel);  // shares its storage: copied, not swapped
    }
    at::Tensor per_tensor, per_channel, complex;
  };
  auto saved = std::make_shared<Buffers>(0.0);
  save_weights(*saved, path("w.pt"));
  auto loaded = std::make_shared<Buffers>(1.0);
  load_weights(*loaded, path("w.pt"));
  EXPECT_TRUE(loaded->per_tensor.dequantize().equal(saved->per_tensor.dequantize()));
  EXPECT_TRUE(loaded->per_channel.dequantize().equal(saved->per_channel.dequantize()));
  EXPECT_TRUE(loaded->per_channel.q_per_channel_scales().equal(saved->per_channel.q_per_channel_scales()));
  EXPECT_TRUE(loaded->complex.equal(saved->complex));
  const auto& again = loaded->named_buffers()["per_channel_again"];
  EXPECT_TRUE(again.dequantize().equal(saved->per_channel.dequantize()));
}

TEST_F(SerializeTest, AStateTooDeepToReadBackIsNotWrittenAndTheFileBeforeItStays) {
  torch::nn::Linear model(3, 2);
  save_weights(*model, path("w.pt"));
  auto before = read_file(path("w.pt"));
  c10::impl::GenericDict state(c10::StringType::get(), c10::AnyType::get());
  state.insert("deep", nested_lists(torchfit::detail::kMaxPickleDepth + 1));
  EXPECT_THROW_MSG(FileCheckpointIO().save(state, path("w.pt")), CheckpointError,
                   "Failed writing checkpoint " + path("w.pt"), "would not load back", "deeper than 100");
  EXPECT_EQ(read_file(path("w.pt")), before);
  for (const auto& entry : fs::directory_iterator(dir())) EXPECT_EQ(entry.path().filename(), "w.pt");
}

// LibTorch's Pickler writes sparse tensors, which torchfit's reader does not read:
// the save says so, rather than leave a checkpoint no load can read.
TEST_F(SerializeTest, ASparseTensorIsRefusedWhenSavedNotWhenLoaded) {
  struct WithSparse : torch::nn::Module {
    WithSparse() { register_buffer("sparse", torch::eye(3).to_sparse()); }
  };
  torch::nn::Linear model(3, 2);
  save_weights(*model, path("w.pt"));
  auto before = read_file(path("w.pt"));
  WithSparse sparse;
  EXPECT_THROW_MSG(save_weights(sparse, path("w.pt")), CheckpointError, "Failed writing checkpoint " + path("w.pt"),
                   "would not load back", "torch._utils._rebuild_sparse_tensor, which torchfit does not read");
  EXPECT_EQ(read_file(path("w.pt")), before);
}

TEST(LibTorchPickleTest, RefusesATensorPastItsStorage) {
  Pickled pickled(c10::IValue(at::ones({4})));
  // The storage's element count is the BININT1 right before TUPLE and BINPERSID.
  auto at = pickled.bytes.find(std::string("K\x04tQ", 4));
  ASSERT_NE(at, std::string::npos);
  auto bytes = pickled.bytes;
  bytes[at + 1] = '\x03';
  EXPECT_THROW_MSG(torchfit::detail::read_libtorch_pickle(bytes), std::invalid_argument,
                   "reaches element 3 of a storage of 3");
}

// ---- Weights files bound straight to a model (index_tensor_dict, DirectLoad)

/// A flat state dict of whole tensors, as save_weights writes: every dtype, no dimensions,
/// no elements, dimensions of size 1, and more than 256 entries (memo ids past a byte).
c10::impl::GenericDict flat_state_dict() {
  c10::impl::GenericDict weights(c10::StringType::get(), c10::TensorType::get());
  for (auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kLong, at::kInt, at::kShort, at::kChar,
                     at::kByte, at::kBool, at::kComplexFloat}) {
    weights.insert(std::string("dtype.") + c10::toString(dtype), at::randn({3, 2}).to(dtype));
  }
  weights.insert("scalar", at::scalar_tensor(2.5));
  weights.insert("empty", at::empty({0, 3}));
  weights.insert("ones.of.size.one", at::randn({1, 4, 1}));
  weights.insert("a.much.longer.name.that.does.not.fit.a.short.string.weight", at::randn({7}));
  for (int i = 0; i < 300; ++i) weights.insert(fmt::format("layers.{}.bias", i), at::randn({i % 5 + 1}));
  return weights;
}

TEST(LibTorchPickleTest, IndexesAFlatStateDictAsTheReaderReadsIt) {
  auto weights = flat_state_dict();
  Pickled pickled(weights, /*tagged=*/false);
  auto index = torchfit::detail::index_tensor_dict(pickled.bytes);
  ASSERT_TRUE(index.has_value());
  auto read = torchfit::detail::read_libtorch_pickle(pickled.bytes);
  std::map<const void*, std::string> key_of;
  for (const auto& unbound : read.storages) key_of[unbound.storage.unsafeGetStorageImpl()] = unbound.key;
  const auto dict = read.value.toGenericDict();
  ASSERT_EQ(index->tensors.size(), dict.size());
  size_t i = 0;
  for (const auto& entry : dict) {  // in the pickle's order
    const auto& tensor = entry.value().toTensor();
    const auto& indexed = index->tensors[i++];
    SCOPED_TRACE(entry.key().toStringRef());
    EXPECT_EQ(indexed.name, entry.key().toStringRef());
    EXPECT_EQ(indexed.key, key_of.at(tensor.storage().unsafeGetStorageImpl()));
    EXPECT_EQ(indexed.dtype, tensor.scalar_type());
    EXPECT_EQ(indexed.numel, tensor.numel());
    EXPECT_EQ(index->sizes_of(indexed), tensor.sizes());
  }
}

TEST(LibTorchPickleTest, IndexDeclinesWhatItCannotBindStraight) {
  auto base = at::arange(24, at::kFloat).reshape({4, 6});
  auto dict_with = [](const std::string& name, const c10::IValue& value) {
    c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
    dict.insert("plain", at::ones({2}));
    dict.insert(name, value);
    return c10::IValue(dict);
  };
  c10::impl::GenericDict shared(c10::StringType::get(), c10::TensorType::get());
  shared.insert("base", base);
  shared.insert("again", base);
  const std::vector<std::pair<std::string, c10::IValue>> declined = {
      {"a row at an offset", dict_with("row", base[2])},
      {"a transposed view", dict_with("t", base.t())},
      {"a strided column", dict_with("column", base.select(1, 3))},
      {"one storage under two names", shared},
      {"a quantized tensor", dict_with("q", at::quantize_per_tensor(at::ones({4}), 0.5, 2, at::kQInt8))},
      {"a nested dict", dict_with("inner", c10::impl::GenericDict(c10::StringType::get(), c10::TensorType::get()))},
      {"a number", dict_with("epoch", int64_t{3})},
      {"a tensor alone", c10::IValue(at::ones({4}))},
      {"a list", c10::IValue(c10::List<at::Tensor>({at::ones({2})}))},
  };
  // And a dict with LibTorch's type tag, which torchfit does not write.
  EXPECT_FALSE(torchfit::detail::index_tensor_dict(Pickled(flat_state_dict()).bytes).has_value());
  for (const auto& [what, value] : declined) {
    EXPECT_FALSE(torchfit::detail::index_tensor_dict(Pickled(value, false).bytes).has_value()) << what;
  }
  // Every cut of a valid pickle, and a wrong memo id, are declined without reading past the end.
  const auto bytes = Pickled(flat_state_dict(), false).bytes;
  for (size_t size = 0; size < bytes.size(); size += std::max<size_t>(1, size / 64)) {
    auto cut = std::make_unique<char[]>(size);  // exactly `size` bytes: ASan sees a read past them
    std::memcpy(cut.get(), bytes.data(), size);
    EXPECT_FALSE(torchfit::detail::index_tensor_dict(std::string_view(cut.get(), size)).has_value()) << size;
  }
  auto renumbered = bytes;
  const auto put = renumbered.find("q\x01");
  ASSERT_NE(put, std::string::npos);
  renumbered[put + 1] = '\x02';
  EXPECT_FALSE(torchfit::detail::index_tensor_dict(renumbered).has_value());
}

/// A module of the state dict's names and shapes, its tensors zero.
struct ModelOf : torch::nn::Module {
  explicit ModelOf(const c10::impl::GenericDict& weights, bool as_buffers = false) {
    for (const auto& entry : weights) {
      auto zeros = torch::zeros_like(entry.value().toTensor());
      auto name = entry.key().toStringRef();
      std::replace(name.begin(), name.end(), '.', '_');  // a flat module: dots name submodules
      names[name] = entry.key().toStringRef();
      if (as_buffers) {
        register_buffer(name, zeros);
      } else {
        register_parameter(name, zeros, /*requires_grad=*/zeros.is_floating_point() || zeros.is_complex());
      }
    }
  }
  std::map<std::string, std::string> names;  // own name to the state dict's
};

/// A state dict whose names are a flat module's (no dots).
c10::impl::GenericDict flat_names(const c10::impl::GenericDict& weights) {
  c10::impl::GenericDict out(c10::StringType::get(), c10::TensorType::get());
  for (const auto& entry : weights) {
    auto name = entry.key().toStringRef();
    std::replace(name.begin(), name.end(), '.', '_');
    out.insert(name, entry.value());
  }
  return out;
}

TEST(DirectLoadTest, PlansOnlyForAModelOfExactlyTheFilesNamesShapesAndDtypes) {
  auto weights = flat_names(flat_state_dict());
  const auto bytes = Pickled(weights, false).bytes;
  ModelOf model(weights);
  EXPECT_TRUE(torchfit::detail::DirectLoad::plan(model, bytes).has_value());
  ModelOf buffers(weights, /*as_buffers=*/true);
  EXPECT_TRUE(torchfit::detail::DirectLoad::plan(buffers, bytes).has_value());

  auto changed = [&](const std::string& name, const at::Tensor& tensor) {
    auto copy = weights.copy();
    copy.insert_or_assign(name, tensor);
    return copy;
  };
  auto without = weights.copy();
  ASSERT_EQ(without.erase("scalar"), 1u);
  const std::vector<std::pair<std::string, c10::impl::GenericDict>> other_files = {
      {"a shape", changed("dtype_Float", at::randn({2, 3}))},
      {"a dtype", changed("dtype_Float", at::randn({3, 2}, at::kDouble))},
      {"a name more", changed("extra", at::randn({1}))},
      {"a name less", without},
  };
  for (const auto& [what, file] : other_files) {
    EXPECT_FALSE(torchfit::detail::DirectLoad::plan(model, Pickled(file, false).bytes).has_value()) << what;
  }
  // A buffer named as a parameter: check_weights takes the buffer; the plan leaves it to it.
  struct Twice : torch::nn::Module {
    Twice() {
      register_parameter("x", torch::zeros({2}));
      register_buffer("x", torch::zeros({2}));
    }
  } twice;
  c10::impl::GenericDict x(c10::StringType::get(), c10::TensorType::get());
  x.insert("x", at::ones({2}));
  EXPECT_FALSE(torchfit::detail::DirectLoad::plan(twice, Pickled(x, false).bytes).has_value());
  // An entry named as a torchfit checkpoint's description is select_weights' to refuse.
  struct Meta : torch::nn::Module {
    Meta() { register_parameter("torchfit", torch::zeros({2})); }
  } meta;
  c10::impl::GenericDict described(c10::StringType::get(), c10::TensorType::get());
  described.insert("torchfit", at::ones({2}));
  EXPECT_FALSE(torchfit::detail::DirectLoad::plan(meta, Pickled(described, false).bytes).has_value());
}

TEST(DirectLoadTest, BindsEveryTensorOrNoneAndCopiesIntoStoragesItDoesNotOwn) {
  auto weights = flat_names(flat_state_dict());
  Pickled pickled(weights, /*tagged=*/false);
  ModelOf model(weights);
  std::map<std::string, at::Tensor> own;
  for (const auto& item : model.named_parameters()) own[item.key()] = item.value();
  // A view held elsewhere shares a parameter's storage: that parameter is copied into, in place.
  auto view = own.at("dtype_Float").view({-1});
  const void* shared_memory = view.data_ptr();
  std::map<std::string, const void*> storages;
  for (const auto& [name, tensor] : own) storages[name] = tensor.storage().unsafeGetStorageImpl();

  // A record missing halfway: nothing changes.
  auto plan = torchfit::detail::DirectLoad::plan(model, pickled.bytes);
  ASSERT_TRUE(plan.has_value());
  size_t taken = 0;
  EXPECT_THROW_MSG(plan->bind([&](std::string_view key, size_t nbytes) {
    if (++taken == 100) throw CheckpointError("no record for storage " + std::string(key));
    auto data = pickled.copy(std::string(key));
    EXPECT_LE(nbytes, torch::jit::getWriteableTensorData(pickled.storages.at(std::stoul(std::string(key)))).sizeInBytes());
    return data;
  }),
                   CheckpointError, "no record for storage");
  for (const auto& [name, tensor] : own) {
    EXPECT_TRUE(tensor.equal(torch::zeros_like(tensor))) << name << " changed";
  }

  std::map<std::string, int64_t> versions;
  for (const auto& [name, tensor] : own) versions[name] = tensor._version();
  plan = torchfit::detail::DirectLoad::plan(model, pickled.bytes);
  ASSERT_TRUE(plan.has_value());
  plan->bind([&](std::string_view key, size_t) { return pickled.copy(std::string(key)); });
  for (const auto& [name, tensor] : own) {
    SCOPED_TRACE(name);
    const auto& expected = weights.at(name).toTensor();
    EXPECT_TRUE(tensor.equal(expected));
    EXPECT_EQ(tensor.storage().unsafeGetStorageImpl(), storages.at(name)) << "the model keeps its storages";
    EXPECT_GT(tensor._version(), versions.at(name));
    EXPECT_TRUE(tensor.is_leaf());
    EXPECT_EQ(tensor.requires_grad(), tensor.is_floating_point() || tensor.is_complex());
  }
  EXPECT_EQ(view.data_ptr(), shared_memory);
  EXPECT_TRUE(view.equal(weights.at("dtype_Float").toTensor().view({-1})));
}

TEST_F(SerializeTest, AWeightsFileLoadsAsTheGeneralReadLoadsIt) {
  // load_weights binds a plain weights file straight; read_weights reads it as any file.
  auto weights = flat_names(flat_state_dict());
  FileCheckpointIO().save(weights, path("flat.pt"));
  ModelOf model(weights);
  load_weights(model, path("flat.pt"));
  auto read = read_weights(path("flat.pt"));
  ASSERT_EQ(read.size(), weights.size());
  for (const auto& item : model.named_parameters()) {
    EXPECT_TRUE(item.value().equal(read.at(item.key()))) << item.key();
    EXPECT_TRUE(item.value().equal(weights.at(item.key()).toTensor())) << item.key();
  }
}

// ---- Checksummed files whose structure is broken under a valid checksum

/// Re-seals `bytes` (a torchfit file) with the checksum of its new content, as a
/// hostile writer could.
void reseal(std::string& bytes) {
  const size_t covered = bytes.size() - 8;
  const size_t before_comment = covered - std::strlen("torchfit-crc32:");
  uint32_t crc = 0xffffffffu;
  for (size_t i = 0; i < before_comment; ++i) {
    crc ^= static_cast<unsigned char>(bytes[i]);
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1)));
  }
  bytes.replace(covered, 8, fmt::format("{:08x}", ~crc));
}

/// Points the zip directory entry of `moved` at the local header of `target`.
void share_local_header(std::string& bytes, const std::string& moved, const std::string& target) {
  auto local_of = [&](const std::string& name) -> size_t {
    const std::string central("PK\x01\x02", 4);
    for (size_t at = bytes.find(central); at != std::string::npos; at = bytes.find(central, at + 1)) {
      uint16_t name_size = 0;
      std::memcpy(&name_size, &bytes[at + 28], 2);
      if (bytes.compare(at + 46, name_size, name) == 0) return at + 42;
    }
    ADD_FAILURE() << "no directory entry " << name;
    return 0;
  };
  std::memcpy(&bytes[local_of(moved)], &bytes[local_of(target)], 4);
  reseal(bytes);
}

TEST_F(SerializeTest, StorageRecordsAreFoundByAnyKeyAndAMissingOneIsNamed) {
  // Storage keys are numbers in the files torchfit writes, and found by number; any other key is
  // found by name.
  struct Two : torch::nn::Module {
    at::Tensor a = register_parameter("a", torch::arange(4.0));
    at::Tensor b = register_parameter("b", torch::arange(4.0) + 10);
  };
  Two saved;
  save_weights(saved, path("w.pt"));
  auto replace_all = [](std::string& bytes, const std::string& from, const std::string& to) {
    size_t count = 0;
    for (size_t at = bytes.find(from); at != std::string::npos; at = bytes.find(from, at + to.size()), ++count) {
      bytes.replace(at, from.size(), to);
    }
    return count;
  };
  auto renamed = read_file(path("w.pt"));
  ASSERT_EQ(replace_all(renamed, "archive/data/0", "archive/data/x"), 2u);  // local header and directory
  reseal(renamed);
  write_file(path("missing.pt"), renamed);
  Two model;
  {
    torch::NoGradGuard no_grad;
    model.a.zero_();
    model.b.zero_();
  }
  EXPECT_THROW_MSG(load_weights(model, path("missing.pt")), CheckpointError, "no record for storage 0",
                   path("missing.pt"));
  EXPECT_TRUE(model.a.equal(torch::zeros({4})));
  EXPECT_TRUE(model.b.equal(torch::zeros({4})));

  auto lettered = renamed;
  ASSERT_EQ(replace_all(lettered, std::string("X\x01\x00\x00\x00" "0", 6), std::string("X\x01\x00\x00\x00" "x", 6)), 1u);
  reseal(lettered);
  write_file(path("lettered.pt"), lettered);
  load_weights(model, path("lettered.pt"));
  EXPECT_TRUE(model.a.equal(saved.a));
  EXPECT_TRUE(model.b.equal(saved.b));
}

TEST_F(SerializeTest, AFileReadWholeFromItsOpeningThatFailsLaterStopsTheRead) {
  // Under a valid checksum, a file with no data.pkl fails after its open began the read: the
  // load must raise that, and the read stop, for the next load to go as usual.
  torch::manual_seed(4);
  auto saved = many_small_tensors(400, 2048);
  save_weights(*saved, path("many.pt"));
  auto bytes = read_file(path("many.pt"));
  for (size_t at = bytes.find("data.pkl"); at != std::string::npos; at = bytes.find("data.pkl", at + 1)) {
    bytes[at + 7] = 'X';
  }
  reseal(bytes);
  write_file(path("no_pickle.pt"), bytes);
  auto model = many_small_tensors(400, 2048);
  const auto before = state_dict(*model);
  for (int round = 0; round < 3; ++round) {
    EXPECT_THROW_MSG(load_weights(*model, path("no_pickle.pt")), CheckpointError, "it has no data.pkl record");
  }
  for (const auto& [name, tensor] : state_dict(*model)) EXPECT_TRUE(tensor.equal(before.at(name))) << name;
  load_weights(*model, path("many.pt"));
  for (const auto& item : model->named_parameters()) EXPECT_TRUE(item.value().equal(saved[item.key()])) << item.key();
}

TEST_F(SerializeTest, RecordsSharingALocalHeaderUnderAValidChecksumAreRefused) {
  // 4 KiB tensors are read in one stretch with their headers, 256 KiB ones one by one.
  for (int64_t numel : {1024, 65536}) {
    torch::nn::Linear model(numel, 1);
    save_weights(*model, path("shared.pt"));
    auto bytes = read_file(path("shared.pt"));
    share_local_header(bytes, "archive/data/1", "archive/data/0");
    write_file(path("shared.pt"), bytes);
    ASSERT_TRUE(verify_checkpoint(path("shared.pt")).ok) << "the checksum must still match";

    torch::nn::Linear target(numel, 1);
    auto before = target->weight.clone();
    EXPECT_THROW_MSG(load_weights(*target, path("shared.pt")), CheckpointError, path("shared.pt"), "is damaged",
                     "overlaps the next one");
    EXPECT_TRUE(target->weight.equal(before)) << numel;
  }
}

}  // namespace
}  // namespace torchfit::test
