// Hostile files, faults and concurrency: readers never crash and never half-load;
// writers never lose a live temporary; loads never trip over retention.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <sstream>
#include <thread>

#include "compat/libtorch.h"
#include "format/byte_sink.h"
#include "format/zip.h"
#include "io/atomic_file.h"
#include "read_everything.h"
#include "support.h"

namespace torchfit::test {
namespace {

class HostileTest : public TorchfitTest {};

// ---- building foreign (unchecksummed) files by hand

/// A stored zip of `records` under "archive/", as torch.save lays it out, sealed
/// with torchfit's checksum as a hostile writer can seal anything.
std::string sealed_zip(const std::vector<std::pair<std::string, std::string>>& records) {
  detail::StringSink out;
  detail::ChecksumSink sink(out);
  detail::ZipWriter zip(sink, "archive");
  for (const auto& [name, bytes] : records) zip.add(name, bytes.data(), bytes.size());
  zip.finish();
  return std::move(out.bytes);
}

/// The same without torchfit's checksum.
std::string foreign_zip(const std::vector<std::pair<std::string, std::string>>& records) {
  // Drop the checksum comment: a plain end record, as other writers leave it.
  auto sealed = sealed_zip(records);
  std::string bytes = sealed.substr(0, sealed.size() - 23);
  bytes[bytes.size() - 2] = 0;
  bytes[bytes.size() - 1] = 0;
  return bytes;
}


/// Pickle opcodes, protocol 2.
namespace pk {
std::string u32(uint32_t v) { return std::string{char(v), char(v >> 8), char(v >> 16), char(v >> 24)}; }
std::string str(const std::string& s) { return "X" + u32(static_cast<uint32_t>(s.size())) + s; }
std::string i64(int64_t v) {
  std::string out = "\x8a\x08";
  for (int i = 0; i < 8; ++i) out.push_back(char(static_cast<uint64_t>(v) >> (8 * i)));
  return out;
}
std::string global(const std::string& module, const std::string& name) { return "c" + module + "\n" + name + "\n"; }
std::string tuple(const std::vector<std::string>& items) {
  std::string out = "(";
  for (const auto& item : items) out += item;
  return out + "t";
}
/// A float tensor over storage "0" of `numel` elements.
std::string tensor(int64_t numel, const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides,
                   int64_t offset = 0) {
  std::vector<std::string> s, t;
  for (auto v : sizes) s.push_back(i64(v));
  for (auto v : strides) t.push_back(i64(v));
  std::string storage = tuple({str("storage"), global("torch", "FloatStorage"), str("0"), str("cpu"), i64(numel)}) + "Q";
  return global("torch._utils", "_rebuild_tensor_v2") +
         tuple({storage, i64(offset), tuple(s), tuple(t), "\x89", global("collections", "OrderedDict") + ")R"}) + "R";
}
/// {"w": value}
std::string state_dict(const std::string& value) { return "\x80\x02}" + str("w") + value + "s."; }
}  // namespace pk

/// A foreign file whose pickle is `pickle`, with a float storage "0" of `floats` elements.
std::string python_file(const std::string& pickle, size_t floats = 4) {
  return foreign_zip({{"data.pkl", pickle}, {"data/0", std::string(floats * 4, '\0')}, {"version", "3\n"}});
}

std::string refusal(const std::string& file) {
  try {
    (void)read_weights(file);
  } catch (const CheckpointError& e) {
    return e.what();
  }
  return "(loaded)";
}

/// Writes torchfit's seed files for the fuzz corpus (fuzz/corpus/torchfit):
///     TORCHFIT_SEED_DIR=fuzz/corpus/torchfit build/test/torchfit_tests --gtest_filter=HostileChild.WriteSeeds
TEST(HostileChild, WriteSeeds) {
  const char* out = std::getenv("TORCHFIT_SEED_DIR");
  if (out == nullptr) GTEST_SKIP() << "writes the fuzz seeds when TORCHFIT_SEED_DIR is set";
  auto at = [&](const std::string& name) { return (fs::path(out) / name).string(); };
  fs::create_directories(out);
  torch::manual_seed(0);
  torch::nn::Linear model(fuzz::kInFeatures, fuzz::kOutFeatures);
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(1e-3));
  model->forward(torch::ones({1, fuzz::kInFeatures})).sum().backward();
  adam->step();
  save_weights(*model, at("weights.pt"));
  Checkpoint checkpoint;
  checkpoint.add("model", model);
  checkpoint.add("optimizer", adam);
  checkpoint.set("epoch", int64_t(3));
  save(checkpoint, at("full.pt"));
  Trainer trainer(model.ptr(), adam, [](const torch::Tensor& out, const torch::Tensor& y) {
    return torch::mse_loss(out, y);
  });
  trainer.save_checkpoint(at("trainer.pt"));
  torch::save(model, at("module_archive.pt"));
  auto other = torch::nn::Linear(fuzz::kInFeatures, 5);
  save_weights(*other, at("mismatch.pt"));
  // Every item kind the entry points read into, and a manager's record.
  auto step = [&](torch::optim::Optimizer& optimizer) {
    optimizer.step([&] {
      optimizer.zero_grad();
      auto loss = model->forward(torch::ones({1, fuzz::kInFeatures})).sum();
      loss.backward();
      return loss;
    });
  };
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  step(*sgd);
  Checkpoint with_sgd;
  with_sgd.add("model", model);
  with_sgd.add("optimizer", sgd);
  save(with_sgd, at("sgd.pt"));
  auto lbfgs = std::make_shared<torch::optim::LBFGS>(model->parameters(), torch::optim::LBFGSOptions(0.5).max_iter(3));
  step(*lbfgs);
  Checkpoint with_lbfgs;
  with_lbfgs.add("model", model);
  with_lbfgs.add("optimizer", lbfgs);
  save(with_lbfgs, at("lbfgs.pt"));
  Checkpoint with_rng;
  with_rng.add("model", model);
  with_rng.add("optimizer", adam);
  with_rng.add_rng();
  with_rng.set("epoch", int64_t(3));
  CheckpointManager manager(CheckpointOptions(at("managed{epoch}.pt")).max_to_keep(2).fsync(false));
  manager.save(with_rng, {{"epoch", 1.0}});
  manager.wait();
  // The manager's record, keyed as the fuzz target's manager keys it.
  auto managed = FileCheckpointIO().load(manager.last_saved_path()).toGenericDict();
  fs::remove(manager.last_saved_path());
  c10::impl::GenericDict rekeyed(c10::StringType::get(), c10::AnyType::get());
  for (const auto& entry : managed) {
    const auto& key = entry.key().toStringRef();
    rekeyed.insert(key.rfind("torchfit_manager:", 0) == 0
                       ? fmt::format("torchfit_manager:{}|monitor=val_loss", fuzz::kManagedTemplate)
                       : key,
                   entry.value());
  }
  FileCheckpointIO(SaveOptions().fsync(false)).save(rekeyed, at("managed.pt"));
  // torchfit 0.2's LBFGS: LibTorch's own archive inside the optimizer's item (from test/data/v0_2,
  // whose model has 4 parameters: the archive is read through, then refused for this model).
  {
    auto v0_2 = FileCheckpointIO().load(std::string(TORCHFIT_TEST_DATA) + "/v0_2/checkpoint.pt").toGenericDict();
    auto items = FileCheckpointIO().load(at("sgd.pt")).toGenericDict();
    c10::impl::GenericDict file(c10::StringType::get(), c10::AnyType::get());
    file.insert("model", items.at("model"));
    file.insert("optimizer", v0_2.at("lbfgs"));
    FileCheckpointIO(SaveOptions().fsync(false)).save(file, at("v0_2_lbfgs.pt"));
  }
  // torchfit 0.1's full checkpoint: a LibTorch module archive, Adam's archive inside, sealed.
  {
    torch::serialize::OutputArchive archive;
    model->save(archive);
    archive.write("torchfit_format", c10::IValue(std::string("torchfit.checkpoint.v1")));
    archive.write("torchfit_epoch", c10::IValue(int64_t{2}));
    archive.write("torchfit_global_step", c10::IValue(int64_t{8}));
    archive.write("torchfit_batch_in_epoch", c10::IValue(int64_t{0}));
    c10::Dict<std::string, c10::Dict<std::string, std::string>> callbacks;
    c10::Dict<std::string, std::string> early_stopping;
    early_stopping.insert("best", "1.5");
    callbacks.insert("EarlyStopping", early_stopping);
    archive.write("torchfit_callbacks", c10::IValue(callbacks));
    archive.write("torchfit_rng_state", at::detail::getDefaultCPUGenerator().get_state(), /*is_buffer=*/true);
    torch::serialize::OutputArchive optimizer(archive.compilation_unit());
    adam->save(optimizer);
    archive.write("torchfit_optimizer", optimizer);
    std::ostringstream bytes;
    archive.save_to(bytes);
    const auto text = bytes.str();
    detail::StringSink out;
    detail::ChecksumSink sink(out);
    sink(text.data(), text.size());
    sink.finish();
    write_file(at("v0_1_adam.pt"), out.bytes);
  }
}

TEST_F(HostileTest, CorpusFilesOnlyEverThrowCheckpointErrorAndChangeNothing) {
  size_t files = 0;
  for (const char* sub : {"corpus", "crashes"}) {
    fs::path root = fs::path(TORCHFIT_FUZZ_DIR) / sub;
    if (!fs::exists(root)) continue;
    for (const auto& entry : fs::recursive_directory_iterator(root)) {
      if (!entry.is_regular_file()) continue;
      ++files;
      EXPECT_EQ(fuzz::read_everything(entry.path().string()), "") << entry.path();
    }
  }
  EXPECT_GT(files, 10u);
}

std::string torch_dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(type);
  }
}

/// "name dtype shape hex", as fuzz/make_python_corpus.py writes its .expected files.
std::string describe_for_python(const std::string& name, const at::Tensor& tensor) {
  std::vector<std::string> sizes;
  for (auto s : tensor.sizes()) sizes.push_back(std::to_string(s));
  auto bytes = tensor.contiguous();
  std::string hex;
  auto* p = static_cast<const unsigned char*>(bytes.data_ptr());
  for (int64_t i = 0; i < bytes.numel() * static_cast<int64_t>(bytes.element_size()); ++i) hex += fmt::format("{:02x}", p[i]);
  return fmt::format("{} {} {} {}", name, torch_dtype_name(tensor.scalar_type()),
                     sizes.empty() ? "-" : fmt::format("{}", fmt::join(sizes, ",")), hex.empty() ? "-" : hex);
}

TEST_F(HostileTest, EveryPythonCaseLoadsBitwiseOrIsRefusedSayingWhy) {
  const fs::path corpus = fs::path(TORCHFIT_FUZZ_DIR) / "corpus" / "python";
  std::ifstream manifest(corpus / "manifest.tsv");
  ASSERT_TRUE(manifest) << "fuzz/corpus/python is made by fuzz/make_python_corpus.py";
  int loads = 0, refusals = 0;
  for (std::string line; std::getline(manifest, line);) {
    std::istringstream fields(line);
    std::string file, expect, key, note;
    std::getline(fields, file, '\t');
    std::getline(fields, expect, '\t');
    std::getline(fields, key, '\t');
    std::getline(fields, note);
    if (key == "-") key.clear();
    const auto where = (corpus / file).string();
    if (expect == "load") {
      TensorMap tensors;
      ASSERT_NO_THROW(tensors = read_weights(where, key)) << file << " [" << key << "]";
      std::string got;
      for (const auto& [name, tensor] : tensors) got += describe_for_python(name, tensor) + "\n";
      EXPECT_EQ(got, read_file(where + ".expected")) << file;
      ++loads;
    } else {
      try {
        (void)read_weights(where, key);
        ADD_FAILURE() << file << " [" << key << "] loaded; expected a refusal about " << note;
      } catch (const CheckpointError& e) {
        std::string what = e.what();
        std::transform(what.begin(), what.end(), what.begin(), [](unsigned char c) { return std::tolower(c); });
        EXPECT_NE(what.find(note), std::string::npos) << file << ": " << e.what();
        EXPECT_NE(std::string(e.what()).find(where), std::string::npos) << file << ": " << e.what();
      }
      ++refusals;
    }
  }
  EXPECT_GE(loads, 25);
  EXPECT_GE(refusals, 5);
}

TEST_F(HostileTest, CraftedPicklesAreRefusedWithAReason) {
  struct Case {
    const char* name;
    std::string bytes;
    const char* reason;
  };
  std::string deep = "\x80\x02}" + pk::str("w");
  for (int i = 0; i < 200000; ++i) deep += "]";
  for (int i = 0; i < 200000 - 1; ++i) deep += "a";
  deep += "s.";
  const int64_t huge = int64_t(1) << 62;
  std::vector<Case> cases = {
      {"short strides", python_file(pk::state_dict(pk::tensor(4, {2, 2}, {1}))), "2 sizes but 1 strides"},
      {"past the storage", python_file(pk::state_dict(pk::tensor(4, {2, 3}, {3, 1}))), "reaches element 5"},
      {"extent overflow", python_file(pk::state_dict(pk::tensor(4, {huge, 4}, {huge, 1}))), "overflows"},
      {"huge storage", python_file(pk::state_dict(pk::tensor(huge, {1}, {1}))), "claims"},
      {"negative offset", python_file(pk::state_dict(pk::tensor(4, {1}, {1}, -1))), "starts at element -1"},
      {"deep nesting", python_file(deep), "deeper than 100"},
      {"a list in itself", python_file(pk::state_dict("]q\x01h\x01" "a")), "contains itself"},
      {"a huge string", python_file("\x80\x02X\xff\xff\xff\xd0" "abc"), "bytes claimed"},
      {"an unknown opcode", python_file("\x80\x02\xff."), "opcode 0xff"},
      {"an unknown object", python_file(pk::state_dict(pk::global("os", "system") + pk::tuple({pk::str("true")}) + "R")),
       "unsupported Python object os.system"},
      {"a type tag that lies",
       python_file(pk::state_dict(pk::global("torch.jit._pickle", "restore_type_tag") + "(]" + pk::str("x") + "a" +
                                  pk::str("List[Tensor]") + "tR")),
       "a container tagged List[Tensor] is not one"},
      {"legacy format", std::string("\x80\x02\x8a\x0al\xfc\x9c") + "F\xf9 j\xa8P\x19.", "legacy format"},
      {"empty", "", "empty"},
      {"not a zip", "hello, world", "does not start with a zip record"},
  };
  // TORCHFIT_CRASH_DIR=fuzz/crashes keeps them for the fuzzer to replay.
  const char* keep = std::getenv("TORCHFIT_CRASH_DIR");
  for (const auto& c : cases) {
    if (keep != nullptr) {
      std::string file = c.name;
      std::replace(file.begin(), file.end(), ' ', '_');
      write_file((fs::path(keep) / (file + ".pt")).string(), c.bytes);
    }
    write_file(path("case.pt"), c.bytes);
    EXPECT_EQ(fuzz::read_everything(path("case.pt")), "") << c.name;
    EXPECT_NE(refusal(path("case.pt")).find(c.reason), std::string::npos) << c.name << ": " << refusal(path("case.pt"));
    EXPECT_NE(refusal(path("case.pt")).find(path("case.pt")), std::string::npos) << c.name;
  }
}

// A forged checksum lets no pickle make the reader, or what walks its value,
// recurse without bound, and none reaches LibTorch's Unpickler, which trusts
// what it reads.
TEST_F(HostileTest, SealedPicklesLibTorchsPicklerDoesNotWriteAreRefusedWithAReason) {
  std::string lists = "\x80\x02}(" + pk::str("w");
  for (int i = 0; i < 200000; ++i) lists += "](";
  lists += "]" + std::string(200000, 'e') + "u.";
  std::string dicts = "\x80\x02}(" + pk::str("w");
  for (int i = 0; i < 200000; ++i) dicts += "}(K\x01";
  dicts += "}" + std::string(200000, 'u') + "u.";
  const std::string in_itself = "\x80\x02}(" + pk::str("w") + "]r" + pk::u32(0) + "(j" + pk::u32(0) + "eu.";
  // A storage of dtype 1000, which crashes LibTorch's Unpickler.
  const std::string bad_dtype = "\x80\x02}(" + pk::str("w") + pk::global("torch._utils", "_rebuild_tensor_v2") + "(" +
                                pk::tuple({pk::str("storage"), "M\xe8\x03", pk::str("0"), pk::str("cpu"), pk::i64(4)}) +
                                "Q" + pk::i64(0) + pk::tuple({pk::i64(4)}) + pk::tuple({pk::i64(1)}) + "\x89" +
                                pk::global("collections", "OrderedDict") + ")RtRu.";
  struct Case {
    const char* name;
    std::string pickle;
    const char* reason;
  };
  const Case cases[] = {
      {"deep lists", lists, "containers nest deeper than 100 levels"},
      {"deep dicts", dicts, "containers nest deeper than 100 levels"},
      {"a list in itself", in_itself, "changes a list or dict after sharing it"},
      {"a far memo entry", "\x80\x02K\x01r" + pk::u32(0xffffffff) + ".", "opcode 0x72"},
      {"APPEND", "\x80\x02]K\x01" "a.", "is not as LibTorch's Pickler writes it: opcode 0x61"},
      {"a bad dtype", bad_dtype, "is not as LibTorch's Pickler writes it"},
      {"a Python set", "\x80\x02" + pk::global("builtins", "set") + ")R.", "calls builtins.set, which torchfit does not read"},
      // Type tags are read by torchfit's own annotation parser, which knows no classes.
      {"a class in a type tag",
       "\x80\x02" + pk::global("torch.jit._pickle", "restore_type_tag") + "(}" + pk::str("Dict[str, __torch__.Evil]") + "tR.",
       "is not as LibTorch's Pickler writes it: opcode 0x74"},
      {"a TorchScript object", "\x80\x02" + pk::global("__torch__", "Module") + ")\x81}b.",
       "calls __torch__.Module, which torchfit does not read"},
  };
  // TORCHFIT_CRASH_DIR=fuzz/crashes keeps those under 512 KiB for the fuzzer to replay.
  const char* keep = std::getenv("TORCHFIT_CRASH_DIR");
  for (const auto& [name, pickle, reason] : cases) {
    auto bytes = sealed_zip({{"data.pkl", pickle}, {"version", "3\n"}});
    if (keep != nullptr && bytes.size() < (512 << 10)) {
      std::string file = std::string("sealed ") + name;
      std::replace(file.begin(), file.end(), ' ', '_');
      write_file((fs::path(keep) / (file + ".pt")).string(), bytes);
    }
    write_file(path("sealed.pt"), bytes);
    ASSERT_TRUE(verify_checkpoint(path("sealed.pt")).ok) << reason;
    EXPECT_EQ(fuzz::read_everything(path("sealed.pt")), "") << reason;
    auto what = refusal(path("sealed.pt"));
    EXPECT_NE(what.find(reason), std::string::npos) << what;
    EXPECT_NE(what.find(path("sealed.pt")), std::string::npos) << what;
  }
}

TEST_F(HostileTest, ZipDamageIsRefused) {
  auto good = python_file(pk::state_dict(pk::tensor(4, {4}, {1})));
  write_file(path("good.pt"), good);
  EXPECT_EQ(read_weights(path("good.pt")).at("w").numel(), 4);

  auto storage_at = good.find(std::string(16, '\0'), good.find("data/0"));  // the storage's bytes
  auto flipped = good;
  flipped[storage_at + 3] ^= 0x40;
  write_file(path("flipped.pt"), flipped);
  EXPECT_NE(refusal(path("flipped.pt")).find("fails its zip CRC32"), std::string::npos) << refusal(path("flipped.pt"));

  auto compressed = good;
  auto central = compressed.find(std::string("PK\x01\x02", 4));  // data.pkl's directory entry
  compressed[central + 10] = 8;  // deflate
  write_file(path("compressed.pt"), compressed);
  EXPECT_NE(refusal(path("compressed.pt")).find("compressed"), std::string::npos);

  write_file(path("cut.pt"), good.substr(0, good.size() / 2));
  EXPECT_EQ(fuzz::read_everything(path("cut.pt")), "");
  EXPECT_NE(refusal(path("cut.pt")).find("cut.pt"), std::string::npos);
}

/// The CRC32 of zip and of torchfit's checksum.
uint32_t crc32(std::string_view bytes) {
  uint32_t crc = 0xffffffffu;
  for (unsigned char byte : bytes) {
    crc ^= byte;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

/// `bytes` with torchfit's checksum computed again, as a hostile writer can.
std::string resealed(std::string bytes) {
  const size_t covered = bytes.size() - 23;  // "torchfit-crc32:" and 8 hex digits end the file
  bytes.replace(covered + 15, 8, fmt::format("{:08x}", crc32(std::string_view(bytes).substr(0, covered))));
  return bytes;
}

/// `zip` with the stored record `name` holding `bytes` (as long as before), its zip CRC32s in
/// the local header and the directory made to match, and resealed, as a forger can.
std::string with_record(std::string zip, const std::string& name, const std::string& bytes) {
  auto u16 = [&](size_t at) { return static_cast<size_t>(static_cast<unsigned char>(zip[at]) | static_cast<unsigned char>(zip[at + 1]) << 8); };
  const size_t local = zip.find(name) - 30;
  const size_t data = local + 30 + u16(local + 26) + u16(local + 28);
  zip.replace(data, bytes.size(), bytes);
  const auto crc = pk::u32(crc32(bytes));
  zip.replace(local + 14, 4, crc);
  zip.replace(zip.rfind(name) - 46 + 16, 4, crc);
  return resealed(zip);
}

TEST_F(HostileTest, AModuleArchivesCodeIsNeverParsed) {
  // torchfit 0.1 full checkpoints are LibTorch module archives. LibTorch's importer compiles their
  // code/ and trusts it (a forged constant crashed it); torchfit reads data.pkl and the tensors
  // only. Code that no parser would take, with every CRC and the checksum forged to match, loads
  // exactly as the original.
  const std::string original = std::string(TORCHFIT_TEST_DATA) + "/v0_1/full.pt";
  const std::string code = "archive/code/__torch__/___torch_mangle_0.py";
  auto bytes = read_file(original);
  const size_t entry = bytes.rfind(code) - 46;  // the directory's sizes (a local header may leave them 0)
  const uint32_t stored = static_cast<unsigned char>(bytes[entry + 20]) | static_cast<unsigned char>(bytes[entry + 21]) << 8;
  ASSERT_GT(stored, 0u);
  write_file(path("forged.pt"), with_record(bytes, code, std::string(stored, '(')));
  ASSERT_TRUE(verify_checkpoint(path("forged.pt")).ok);

  auto load = [&](const std::string& file) {
    auto s = make_setup(0.5);
    auto sgd = std::make_shared<torch::optim::SGD>(s.model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    Trainer trainer(s.model, sgd, ce_loss);
    trainer.load_checkpoint(file);
    std::vector<at::Tensor> buffers;
    for (const auto& p : sgd->param_groups()[0].params()) {
      buffers.push_back(static_cast<torch::optim::SGDParamState&>(*sgd->state().at(compat::optimizer_state_key(p)))
                            .momentum_buffer());
    }
    return std::make_tuple(state_dict(*s.model), buffers, trainer.state().global_step);
  };
  const auto [weights, momentum, step] = load(original);
  const auto [forged_weights, forged_momentum, forged_step] = load(path("forged.pt"));
  EXPECT_EQ(forged_step, step);
  for (const auto& [name, tensor] : weights) EXPECT_TRUE(torch::equal(forged_weights.at(name), tensor)) << name;
  ASSERT_EQ(forged_momentum.size(), momentum.size());
  for (size_t i = 0; i < momentum.size(); ++i) EXPECT_TRUE(torch::equal(forged_momentum[i], momentum[i])) << i;
  Mlp weights_only;
  load_weights(*weights_only, path("forged.pt"));
  for (const auto& [name, tensor] : state_dict(*weights_only)) EXPECT_TRUE(torch::equal(tensor, weights.at(name))) << name;
}

TEST_F(HostileTest, ALocalHeaderInsideTheDirectoryIsRefused) {
  // Readers size their buffers from the gap between a record's local header and the directory:
  // a header placed inside the directory made that gap run backwards (a heap over-read, or a
  // 2^64-byte allocation for a record alone in its block).
  c10::impl::GenericDict weights(c10::StringType::get(), c10::TensorType::get());
  weights.insert("w", torch::arange(4, torch::kFloat));
  FileCheckpointIO().save(weights, path("saved.pt"));
  const auto good = read_file(path("saved.pt"));
  write_file(path("good.pt"), good);
  ASSERT_TRUE(verify_checkpoint(path("good.pt")).ok);
  EXPECT_EQ(read_weights(path("good.pt")).at("w").numel(), 4);
  const size_t directory = good.find(std::string("PK\x01\x02", 4));
  for (const std::string record : {"data/0", "version", "data.pkl"}) {
    for (uint32_t into : {0u, 4u, 46u}) {
      SCOPED_TRACE(record + " at directory + " + std::to_string(into));
      auto bad = good;
      const size_t entry = bad.rfind(std::string("PK\x01\x02", 4), bad.find("archive/" + record, directory));
      bad.replace(entry + 42, 4, pk::u32(static_cast<uint32_t>(directory + into)));
      write_file(path("bad.pt"), resealed(bad));
      EXPECT_EQ(fuzz::read_everything(path("bad.pt")), "");
      EXPECT_NE(refusal(path("bad.pt")).find("not before the zip directory"), std::string::npos)
          << refusal(path("bad.pt"));
    }
  }
}

TEST_F(HostileTest, ACallbackStateUnderANonStringKeyIsRefusedBeforeAnythingChanges) {
  auto saved = make_setup();
  saved.trainer->save_checkpoint(path("good.pt"));
  auto state = FileCheckpointIO().load(path("good.pt")).toGenericDict();
  c10::impl::GenericDict callbacks(c10::AnyType::get(), c10::AnyType::get());
  callbacks.insert(int64_t{7}, std::string("no callback's state"));
  state.insert_or_assign("callbacks", callbacks);
  FileCheckpointIO().save(state, path("bad.pt"));
  auto other = make_setup();
  auto before = state_dict(*other.model);
  for (auto& [name, tensor] : before) tensor = tensor.clone();
  EXPECT_THROW_MSG(other.trainer->load_checkpoint(path("bad.pt")), CheckpointError,
                   "a callback state is keyed by a Int, not a string", path("bad.pt"));
  for (const auto& [name, tensor] : state_dict(*other.model)) EXPECT_TRUE(torch::equal(tensor, before.at(name))) << name;
}

TEST_F(HostileTest, ZipsReadersDisagreeOnAreRefused) {
  // A name twice (torchfit read the last copy, Python's torch.load reads the first).
  const auto pickle = pk::state_dict(pk::tensor(4, {4}, {1}));
  write_file(path("twice.pt"),
             foreign_zip({{"data.pkl", pickle}, {"data/0", std::string(16, '\0')}, {"data.pkl", "\x80\x02}."}}));
  EXPECT_NE(refusal(path("twice.pt")).find("record data.pkl appears twice"), std::string::npos)
      << refusal(path("twice.pt"));
  EXPECT_EQ(fuzz::read_everything(path("twice.pt")), "");

  // An end record planted in the real one's comment, also ending the file (torchfit saw an
  // empty archive).
  auto planted = python_file(pickle);
  ASSERT_EQ(planted.substr(planted.size() - 22, 4), std::string("PK\x05\x06", 4));
  planted.replace(planted.size() - 2, 2, std::string("\x16\x00", 2));  // a comment of 22 bytes...
  planted += std::string("PK\x05\x06", 4) + std::string(18, '\0');    // ...that is an empty archive's end
  write_file(path("planted.pt"), planted);
  EXPECT_NE(refusal(path("planted.pt")).find("2 zip end-of-directory records end the file"), std::string::npos)
      << refusal(path("planted.pt"));
  EXPECT_EQ(fuzz::read_everything(path("planted.pt")), "");
}

TEST_F(HostileTest, VerifyCheckpointNeverThrows) {
  EXPECT_FALSE(verify_checkpoint(path(std::string(300, 'x'))).ok);  // name over NAME_MAX
  fs::create_symlink(path("loop"), path("loop"));
  EXPECT_FALSE(verify_checkpoint(path("loop")).ok);
  EXPECT_THROW(read_weights(path("loop")), CheckpointError);
  EXPECT_FALSE(verify_checkpoint(dir().string()).ok);
  EXPECT_FALSE(verify_checkpoint("").ok);
}

TEST_F(HostileTest, ZeroElementTensorsRoundTrip) {
  struct WithEmpty : torch::nn::Module {
    WithEmpty() {
      weight = register_parameter("weight", torch::randn({2, 3}));
      empty = register_buffer("empty", torch::empty({0}));
      none = register_buffer("none", torch::empty({0, 3}));
    }
    torch::Tensor weight, empty, none;
  };
  auto a = std::make_shared<WithEmpty>();
  save_weights(*a, path("w.pt"));
  ASSERT_TRUE(verify_checkpoint(path("w.pt")).ok);
  auto b = std::make_shared<WithEmpty>();
  load_weights(*b, path("w.pt"));
  expect_same_weights(*a, *b);
  EXPECT_EQ(b->none.sizes(), (std::vector<int64_t>{0, 3}));
  auto read = read_weights(path("w.pt"));
  EXPECT_EQ(read.at("empty").numel(), 0);
}

TEST_F(HostileTest, AMismatchListsEveryMismatchingKey) {
  Mlp model;
  save_weights(*model, path("mlp.pt"));
  struct Other : torch::nn::Module {
    Other() {
      fc1 = register_module("fc1", torch::nn::Linear(4, 5));
      fc2 = register_module("fc2", torch::nn::Linear(5, 2));
    }
    torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  };
  auto other = std::make_shared<Other>();
  auto before = state_dict(*other);
  EXPECT_THROW_MSG(load_weights(*other, path("mlp.pt")), CheckpointError, "3 mismatching key(s)", "'fc1.weight'",
                   "'fc2.weight'", "'fc2.bias'");
  for (const auto& [name, tensor] : state_dict(*other)) EXPECT_TRUE(tensor.equal(before.at(name))) << name;
}

TEST_F(HostileTest, NestedCheckpointsPickTheirKey) {
  auto weights = pk::tensor(4, {4}, {1});
  auto nested = "\x80\x02}(" + pk::str("epoch") + "K\x03" + pk::str("model") + "}" + pk::str("w") + weights + "s" +
                pk::str("note") + pk::str("hi") + "u.";
  write_file(path("nested.pt"), python_file(nested));
  auto what = refusal(path("nested.pt"));
  EXPECT_NE(what.find("keys epoch, model, note"), std::string::npos) << what;
  EXPECT_NE(what.find("\"model\")"), std::string::npos) << what;
  EXPECT_EQ(read_weights(path("nested.pt"), "model").at("w").numel(), 4);
  EXPECT_THROW_MSG((void)read_weights(path("nested.pt"), "optimizer"), CheckpointError,
                   "no key 'optimizer'; its keys are epoch, model, note");
}

TEST_F(HostileTest, NamesUpToNameMaxSaveAndLoad) {
  Mlp model, loaded;
  std::string utf8;
  while (utf8.size() + 3 <= 252) utf8 += "\xc3\xa9";  // é, two bytes each
  utf8 += ".pt";
  for (const auto& name : {std::string(200, 'a') + ".pt", std::string(228, 'b') + ".pt", std::string(252, 'c') + ".pt",
                           utf8}) {
    ASSERT_LE(name.size(), 255u);
    save_weights(*model, path(name));
    EXPECT_TRUE(verify_checkpoint(path(name)).ok) << name.size();
    load_weights(*loaded, path(name));
    expect_same_weights(*model, *loaded);
  }
  for (const auto& file : files()) EXPECT_EQ(file.find(".torchfit-tmp."), std::string::npos) << file;
}

// ---- cleanup of temporaries

TEST_F(HostileTest, TwoWritersInOneProcessNeverLoseATemporary) {
  Mlp a, b;
  std::atomic<bool> done{false};
  std::atomic<int> failures{0};
  std::string first_error;
  auto writer = [&](Mlp model, const std::string& name) {
    for (int i = 0; i < 40; ++i) {
      try {
        save_weights(*model, path(fmt::format("{}-{}.pt", name, i % 3)));
      } catch (const std::exception& e) {
        if (failures++ == 0) first_error = e.what();
      }
    }
  };
  // A cleaner sweeping the directory all the while, as a third trainer starting up would.
  std::thread cleaner([&] {
    while (!done) detail::remove_stale_temporaries(dir().string());
  });
  std::thread ta(writer, a, "a"), tb(writer, b, "b");
  ta.join();
  tb.join();
  done = true;
  cleaner.join();
  EXPECT_EQ(failures.load(), 0) << first_error;
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(verify_checkpoint(path(fmt::format("a-{}.pt", i))).ok);
    EXPECT_TRUE(verify_checkpoint(path(fmt::format("b-{}.pt", i))).ok);
  }
}

/// Saves into TORCHFIT_SAVE_LOOP_DIR until TORCHFIT_SAVE_LOOP_COUNT saves were
/// made; writes the number of failures to "<dir>/failures.txt".
TEST(HostileChild, SaveLoop) {
  const char* dir = std::getenv("TORCHFIT_SAVE_LOOP_DIR");
  if (dir == nullptr) GTEST_SKIP() << "run by TwoWritersInTwoPidNamespaces";
  Mlp model;
  int failures = 0, count = std::atoi(std::getenv("TORCHFIT_SAVE_LOOP_COUNT"));
  for (int i = 0; i < count; ++i) {
    try {
      save_weights(*model, (fs::path(dir) / fmt::format("child-{}.pt", i % 3)).string());
    } catch (const std::exception&) {
      ++failures;
    }
  }
  std::ofstream(fs::path(dir) / "failures.txt") << failures;
}

TEST_F(HostileTest, WritersInAnotherPidNamespaceNeverLoseATemporary) {
  if (::geteuid() != 0 || std::system("/usr/bin/unshare --pid --fork true 2>/dev/null") != 0) {
    GTEST_SKIP() << "needs root and unshare --pid";
  }
  pid_t child = spawn_self("HostileChild.SaveLoop",
                           {"TORCHFIT_SAVE_LOOP_DIR=" + dir().string(), "TORCHFIT_SAVE_LOOP_COUNT=60"},
                           {"/usr/bin/unshare", "--pid", "--fork"});
  // Our own saves and sweeps run until the child is done; its pids mean nothing here.
  Mlp model;
  int failures = 0, status = 0;
  for (int i = 0; ::waitpid(child, &status, WNOHANG) == 0; ++i) {
    detail::remove_stale_temporaries(dir().string());
    try {
      save_weights(*model, path(fmt::format("parent-{}.pt", i % 3)));
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
      ++failures;
    }
  }
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_EQ(read_file(path("failures.txt")), "0");
  EXPECT_EQ(failures, 0);
}

// ---- faults and races while reading

using ArmFn = void (*)(long);

/// Files of this model are larger than what a FileReader keeps from its read at open
/// (kKeptTail), so a load of one takes several reads, each of which may fail.
struct ReadInPartsImpl : torch::nn::Module {
  ReadInPartsImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(3, 256));
    fc2 = register_module("fc2", torch::nn::Linear(256, 256));
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(ReadInParts);

/// Files of this model (2.4 MiB in 300 records of 8 KiB) are read whole from their opening, on
/// a helper, while their directory and pickle are parsed.
struct ManySmallImpl : torch::nn::Module {
  ManySmallImpl() {
    for (int i = 0; i < 300; ++i) register_parameter("p" + std::to_string(i), torch::randn({2048}));
  }
};
TORCH_MODULE(ManySmall);

/// Loads `file` with every read from the 1st to the last failing in turn (EIO,
/// from the LD_PRELOAD shim); after each failure the model must be unchanged.
/// Writes "<cases> <problems>" to TORCHFIT_EIO_OUT.
TEST(HostileChild, LoadUnderEio) {
  const char* out = std::getenv("TORCHFIT_EIO_OUT");
  if (out == nullptr) GTEST_SKIP() << "run by EveryFailingReadLeavesTheModelUnchanged";
  auto arm = reinterpret_cast<ArmFn>(::dlsym(RTLD_DEFAULT, "torchfit_fail_read_after"));
  ASSERT_NE(arm, nullptr) << "the fault shim is not preloaded";
  const std::string file = std::getenv("TORCHFIT_EIO_FILE");
  const std::string kind = std::getenv("TORCHFIT_EIO_KIND");
  const bool full = kind == "full";
  int cases = 0, problems = 0;
  for (long n = 1; n < 500; ++n) {
    torch::manual_seed(7);
    ReadInParts model;
    ManySmall many;
    torch::nn::Module& target = kind == "many" ? static_cast<torch::nn::Module&>(*many) : *model;
    auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.1));
    auto before = state_dict(target);
    for (auto& [name, t] : before) t = t.clone();
    arm(n);
    bool failed = false;
    try {
      if (full) {
        Checkpoint checkpoint;
        checkpoint.add("model", model);
        checkpoint.add("optimizer", optimizer);
        load(checkpoint, file);
      } else {
        load_weights(target, file);
      }
    } catch (const CheckpointError& e) {
      failed = true;
      if (std::string(e.what()).find("Input/output error") == std::string::npos) ++problems;
    } catch (...) {
      failed = true;
      ++problems;
    }
    arm(0);
    if (!failed) break;  // the n-th read never came: every read has failed once
    ++cases;
    for (const auto& [name, t] : state_dict(target)) {
      if (!t.equal(before.at(name))) ++problems;
    }
  }
  std::ofstream(out) << cases << " " << problems;
}

TEST_F(HostileTest, EveryFailingReadLeavesTheModelUnchanged) {
  torch::manual_seed(1);
  ReadInParts model;
  auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.1));
  save_weights(*model, path("w.pt"));
  Checkpoint checkpoint;
  checkpoint.add("model", model);
  checkpoint.add("optimizer", optimizer);
  save(checkpoint, path("full.pt"));
  ManySmall many;
  save_weights(*many, path("many.pt"));
  ASSERT_GT(fs::file_size(path("many.pt")), size_t(2) << 20);
  for (const std::string kind : {"weights", "full", "many"}) {
    auto file = path(kind == "weights" ? "w.pt" : kind + ".pt");
    pid_t child = spawn_self("HostileChild.LoadUnderEio",
                             {std::string("LD_PRELOAD=") + TORCHFIT_FAIL_READ_LIB, "TORCHFIT_EIO_FILE=" + file,
                              "TORCHFIT_EIO_KIND=" + kind, "TORCHFIT_EIO_OUT=" + path("eio.txt")});
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << kind;
    std::istringstream result(read_file(path("eio.txt")));
    int cases = -1, problems = -1;
    result >> cases >> problems;
    ASSERT_GT(fs::file_size(file), detail::kKeptTail);
    EXPECT_GE(cases, 3) << kind;  // the tail at open, the first header, the records...
    EXPECT_EQ(problems, 0) << kind;
  }
}

/// restore_latest with the n-th read failing (EIO, from the LD_PRELOAD shim), for every n: it
/// must restore the newest file or raise StorageError naming it, never fall back to the older.
/// Writes "<cases> <problems> <first problem>" to TORCHFIT_EIO_OUT.
TEST(HostileChild, RestoreUnderEio) {
  const char* out = std::getenv("TORCHFIT_EIO_OUT");
  if (out == nullptr) GTEST_SKIP() << "run by AnIoErrorOnTheNewestFileIsRaisedNotSkipped";
  auto arm = reinterpret_cast<ArmFn>(::dlsym(RTLD_DEFAULT, "torchfit_fail_read_after"));
  ASSERT_NE(arm, nullptr) << "the fault shim is not preloaded";
  const std::string dir = std::getenv("TORCHFIT_EIO_DIR");
  int cases = 0, problems = 0;
  std::string first_problem = "-";
  for (long n = 1; n < 200; ++n) {
    ReadInParts model;
    Checkpoint state;
    state.add("model", model);
    CheckpointManager manager(CheckpointOptions(dir + "/s{step}.pt").save_last(true));
    arm(n);
    std::string problem;
    try {
      auto restored = manager.restore_latest(state);
      if (!restored || *restored != dir + "/s2.pt") problem = "restored " + restored.value_or("nothing");
    } catch (const StorageError& e) {
      ++cases;
      if (std::string(e.what()).find(dir + "/s2.pt") == std::string::npos) problem = e.what();
    } catch (const std::exception& e) {
      problem = e.what();
    }
    arm(0);
    if (!problem.empty() && problems++ == 0) first_problem = problem;
  }
  std::ofstream(out) << cases << " " << problems << " " << first_problem;
}

TEST_F(HostileTest, AnIoErrorOnTheNewestFileIsRaisedNotSkipped) {
  // Skipping an unreadable newest file would resume an older run, whose retention could then
  // delete the newest, intact file.
  ReadInParts model;
  Checkpoint state;
  state.add("model", model);
  CheckpointManager manager(CheckpointOptions(path("s{step}.pt")).save_last(true));
  manager.save(state, {{"step", 1.0}});
  manager.save(state, {{"step", 2.0}});
  ASSERT_GT(fs::file_size(path("s2.pt")), detail::kKeptTail);
  pid_t child = spawn_self("HostileChild.RestoreUnderEio",
                           {std::string("LD_PRELOAD=") + TORCHFIT_FAIL_READ_LIB, "TORCHFIT_EIO_DIR=" + dir().string(),
                            "TORCHFIT_EIO_OUT=" + path("eio.txt")});
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  std::istringstream result(read_file(path("eio.txt")));
  int cases = -1, problems = -1;
  result >> cases >> problems;
  std::string first_problem;
  std::getline(result, first_problem);
  EXPECT_GE(cases, 3);  // the tail at open, the first header, the records...
  EXPECT_EQ(problems, 0) << first_problem;
}

TEST_F(HostileTest, LoadsRacingMaxToKeepRotationNeverFailSpuriously) {
  Mlp model;
  Checkpoint state;
  state.add("model", model);
  CheckpointManager manager(CheckpointOptions(path("step{step}.pt")).max_to_keep(1).save_last(true)
                                .save_weights_only(true));
  manager.save(state, {{"step", 0.0}});
  std::atomic<bool> done{false};
  std::atomic<int> loads{0}, vanished{0}, spurious{0}, no_latest{0};
  std::string first_error;
  auto reader = [&] {
    Mlp target;
    while (!done) {
      auto latest = latest_checkpoint(dir().string());
      if (!latest) {
        ++no_latest;
        continue;
      }
      try {
        load_weights(*target, *latest);
        ++loads;
      } catch (const CheckpointError& e) {
        if (!fs::exists(*latest) && std::string(e.what()).find("does not exist") != std::string::npos) {
          ++vanished;  // rotated away before we opened it: not a failure of the load
        } else if (spurious++ == 0) {
          first_error = e.what();
        }
      }
    }
  };
  std::thread r1(reader), r2(reader);
  for (int step = 1; step <= 150; ++step) manager.save(state, {{"step", double(step)}});
  done = true;
  r1.join();
  r2.join();
  EXPECT_EQ(spurious.load(), 0) << first_error;
  EXPECT_EQ(no_latest.load(), 0);
  EXPECT_GT(loads.load(), 0);
}

TEST_F(HostileTest, ALatestPointerThatCannotBeWrittenIsAWarningAndTheNextSaveRetriesIt) {
  Mlp model;
  Checkpoint state;
  state.add("model", model);
  CheckpointManager manager(CheckpointOptions(path("s{step}.pt")).save_last(true).save_weights_only(true));
  fs::create_directory(path(kLatestPointer));  // the pointer's rename fails onto a directory
  {
    LogCapture log;
    EXPECT_TRUE(manager.save(state, {{"step", 1.0}}));
    EXPECT_NE(log.text().find("recording it as the latest failed"), std::string::npos) << log.text();
    EXPECT_NE(log.text().find(path("s1.pt")), std::string::npos) << log.text();
  }
  EXPECT_TRUE(verify_checkpoint(path("s1.pt")).ok);
  fs::remove(path(kLatestPointer));
  EXPECT_TRUE(manager.save(state, {{"step", 2.0}}));
  EXPECT_EQ(read_file(path(kLatestPointer)), "s2.pt\n");
}

TEST_F(HostileTest, ABadGeneratorStateFailsBeforeTheModelChanges) {
  auto s = make_setup();
  s.trainer->save_checkpoint(path("full.pt"));
  // Rewrite the file with garbage generator bytes of the right length.
  auto data = FileCheckpointIO().load(path("full.pt"));
  auto dict = data.toGenericDict();
  auto rng = dict.at("rng").toGenericDict();
  auto cpu = rng.at("cpu").toTensor().clone();
  cpu.fill_(0xff);
  rng.insert_or_assign("cpu", cpu);
  FileCheckpointIO().save(data, path("bad_rng.pt"));
  auto other = make_setup();
  auto before = state_dict(*other.model);
  for (auto& [name, t] : before) t = t.clone();
  EXPECT_THROW_MSG(other.trainer->load_checkpoint(path("bad_rng.pt")), CheckpointError, "generator state");
  for (const auto& [name, t] : state_dict(*other.model)) EXPECT_TRUE(t.equal(before.at(name))) << name;
}

}  // namespace
}  // namespace torchfit::test
