#pragma once
// Shared by the examples: Debian's dataset-fashion-mnist files, unpacked for
// torch::data::datasets::MNIST, and the small classifier they train.

#include <unistd.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>

#include <fmt/format.h>
#include <torch/torch.h>

namespace examples {
namespace fs = std::filesystem;

inline const char* kDefaultFashionDir = "/usr/share/datasets/fashion-mnist";

inline const char* kFiles[] = {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"};

/// Gunzips `source` to `target` through a temporary file, so a killed run leaves no half file.
inline void gunzip(const fs::path& source, const fs::path& target) {
  gzFile in = gzopen(source.c_str(), "rb");
  if (in == nullptr) throw std::runtime_error(fmt::format("Failed opening {}", source.string()));
  auto temp = target.string() + ".partial." + std::to_string(::getpid());  // ranks may unpack at once
  std::ofstream out(temp, std::ios::binary);
  char buffer[1 << 16];
  int n;
  while ((n = gzread(in, buffer, sizeof buffer)) > 0) out.write(buffer, n);
  bool ok = n == 0 && out.good();
  gzclose(in);
  out.close();
  if (!ok) throw std::runtime_error(fmt::format("Failed unpacking {} to {}", source.string(), temp));
  fs::rename(temp, target);
}

/// Unpacks Debian's gzipped Fashion-MNIST IDX files once into `cache_dir`, where
/// torch::data::datasets::MNIST reads them.
inline fs::path unpack_fashion_mnist(const fs::path& data_dir, const fs::path& cache_dir) {
  fs::create_directories(cache_dir);
  for (const char* name : kFiles) {
    auto target = cache_dir / name;
    if (fs::exists(target)) continue;
    auto source = data_dir / (std::string(name) + ".gz");
    if (!fs::exists(source)) {
      throw std::runtime_error(fmt::format(
          "{} not found; install Debian's dataset-fashion-mnist (third_party/install.sh)", source.string()));
    }
    gunzip(source, target);
  }
  return cache_dir;
}

/// `--name value` pairs from the command line.
inline std::map<std::string, std::string> parse_args(int argc, char** argv) {
  std::map<std::string, std::string> args;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i];
    if (key.rfind("--", 0) != 0 || i + 1 >= argc) {
      throw std::runtime_error(fmt::format("Bad argument '{}'; expected --name value pairs", key));
    }
    args[key.substr(2)] = argv[++i];
  }
  return args;
}

inline std::string arg(const std::map<std::string, std::string>& args, const std::string& key, std::string fallback) {
  auto it = args.find(key);
  return it == args.end() ? fallback : it->second;
}

/// 784 -> 256 -> 10, the same as Python's
/// nn.Sequential(OrderedDict(fc1=nn.Linear(784, 256), relu=nn.ReLU(), fc2=nn.Linear(256, 10))) on flattened images.
struct NetImpl : torch::nn::Module {
  NetImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(784, 256));
    fc2 = register_module("fc2", torch::nn::Linear(256, 10));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = x.view({x.size(0), -1});
    return fc2(torch::relu(fc1(x)));
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Net);

}  // namespace examples
