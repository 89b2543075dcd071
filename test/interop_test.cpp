// Interchange with Python's torch: every kind of file torchfit writes loads in Python with
// weights_only=True (model, optimizers, RNG, values; see the note on torch 1.13 at the first test),
// and Python's torch.save files load in C++ bit for bit. Runs /usr/bin/python3, whose torch comes
// from the same Debian release as LibTorch.
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "compat/libtorch.h"
#include "support.h"

namespace torchfit::test {
namespace {




/// `text` as one shell word.
std::string shell_quoted(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

/// `text` as a Python string literal.
std::string py(const std::string& text) {
  std::string out = "'";
  for (char c : text) {
    if (c == '\\' || c == '\'') out += '\\';
    out += c;
  }
  return out + "'";
}

/// Pieces of `text` between separators, empty ones included.
std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> out(1);
  for (char c : text) {
    if (c == separator) {
      out.emplace_back();
    } else {
      out.back() += c;
    }
  }
  return out;
}

/// A tensor's elements as integers, comma-separated: float32 and float64 by their bits
/// (as the Python side's `bits` prints them).
std::string bits_of(const at::Tensor& tensor) {
  auto t = tensor.detach().contiguous().reshape({-1});
  if (t.scalar_type() == at::kFloat) {
    t = t.view(at::kInt);
  } else if (t.scalar_type() == at::kDouble) {
    t = t.view(at::kLong);
  }
  t = t.to(at::kLong).contiguous();
  return fmt::format("{}", fmt::join(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel(), ","));
}

/// The per-parameter state of `optimizer` as Python's `state_dict()["state"]` holds it:
/// "<parameter index>/<name>", parameters numbered across groups, steps as float32 scalars.
TensorMap optimizer_state(const torch::optim::Optimizer& optimizer) {
  using namespace torch::optim;
  TensorMap out;
  int64_t index = 0;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& param : group.params()) {
      auto found = optimizer.state().find(compat::optimizer_state_key(param));
      const std::string prefix = std::to_string(index++) + "/";
      if (found == optimizer.state().end()) continue;  // Python lists no state for it either
      auto put = [&](const char* name, const at::Tensor& t) {
        if (t.defined()) out[prefix + name] = t.detach();
      };
      auto step = [&](int64_t count) {
        out[prefix + "step"] = at::scalar_tensor(static_cast<double>(count), at::kFloat);
      };
      const OptimizerParamState* state = found->second.get();
      if (const auto* sgd = dynamic_cast<const SGDParamState*>(state)) {
        put("momentum_buffer", sgd->momentum_buffer());
      } else if (const auto* adam = dynamic_cast<const AdamParamState*>(state)) {
        step(adam->step());
        put("exp_avg", adam->exp_avg());
        put("exp_avg_sq", adam->exp_avg_sq());
        put("max_exp_avg_sq", adam->max_exp_avg_sq());
      } else if (const auto* adamw = dynamic_cast<const AdamWParamState*>(state)) {
        step(adamw->step());
        put("exp_avg", adamw->exp_avg());
        put("exp_avg_sq", adamw->exp_avg_sq());
        put("max_exp_avg_sq", adamw->max_exp_avg_sq());
      } else if (const auto* rmsprop = dynamic_cast<const RMSpropParamState*>(state)) {
        step(rmsprop->step());
        put("square_avg", rmsprop->square_avg());
        put("momentum_buffer", rmsprop->momentum_buffer());
        put("grad_avg", rmsprop->grad_avg());
      } else if (const auto* adagrad = dynamic_cast<const AdagradParamState*>(state)) {
        step(adagrad->step());
        put("sum", adagrad->sum());
      } else {
        ADD_FAILURE() << "no Python layout known for the state of parameter " << prefix;
      }
    }
  }
  return out;
}

/// The state of torch's default CPU generator, as `Checkpoint::add_rng` saves it.
at::Tensor cpu_rng_state() {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

/// A Python optimizer matching a C++ one: its item in the file, and its constructor over `p`.
struct PythonOptimizer {
  std::string item, make;
};

/// An optimizer of each type torchfit writes in Python's layout, with options off their defaults.
struct OptimizerCase {
  PythonOptimizer python;
  std::function<std::shared_ptr<torch::optim::Optimizer>(std::vector<at::Tensor>)> make;
};

std::vector<OptimizerCase> every_optimizer() {
  using namespace torch::optim;
  using Params = std::vector<at::Tensor>;
  return {
      {{"sgd", "torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.001, nesterov=True)"},
       [](Params p) {
         return std::make_shared<SGD>(p, SGDOptions(0.05).momentum(0.9).weight_decay(0.001).nesterov(true));
       }},
      {{"adam", "torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95), amsgrad=True)"},
       [](Params p) {
         return std::make_shared<Adam>(p, AdamOptions(0.01).betas(std::make_tuple(0.8, 0.95)).amsgrad(true));
       }},
      {{"adamw", "torch.optim.AdamW(p, lr=0.01, weight_decay=0.05, eps=1e-06)"},
       [](Params p) { return std::make_shared<AdamW>(p, AdamWOptions(0.01).weight_decay(0.05).eps(1e-6)); }},
      {{"rmsprop", "torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True)"},
       [](Params p) { return std::make_shared<RMSprop>(p, RMSpropOptions(0.01).momentum(0.5).centered(true)); }},
      {{"adagrad", "torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01)"},
       [](Params p) { return std::make_shared<Adagrad>(p, AdagradOptions(0.1).lr_decay(0.01)); }},
  };
}

/// What Python must find in the files: lines "<file label> <key> <value>".
struct Expected {
  void add(const std::string& label, const std::string& key, const std::string& value) {
    text += label + " " + key + " " + value + "\n";
  }
  void add_model(const std::string& label, const torch::nn::Module& module) {
    for (const auto& [name, tensor] : torchfit::state_dict(module)) add(label, "model/" + name, bits_of(tensor));
  }
  void add_optimizer(const std::string& label, const std::string& item, const torch::optim::Optimizer& optimizer) {
    for (const auto& [key, tensor] : optimizer_state(optimizer)) add(label, item + "/" + key, bits_of(tensor));
  }
  std::string text;
};

/// torchfit::test::Mlp in Python: the same names, shapes and parameter order.
const char* const kPythonMlp = R"py(
import io, pickle, sys, torch

class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 5)
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
)py";

/// Checks files against the expected values in argv[1]; `check_file` calls follow.
const char* const kCheckFiles = R"py(
def bits(t):
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.float32:
        t = t.view(torch.int32)
    elif t.dtype == torch.float64:
        t = t.view(torch.int64)
    return ','.join(str(int(x)) for x in t.tolist())

expected = {}
with open(sys.argv[1]) as f:
    for line in f:
        label, key, value = line.rstrip('\n').split(' ', 2)
        expected[label, key] = value

def check(label, key, value):
    want = expected.pop((label, key), None)
    assert want is not None, f'{label}: {key} was not expected'
    assert value == want, f'{label}: {key} is {value[:100]}..., C++ has {want[:100]}...'

# torch 1.13's weights-only unpickler has no BINFLOAT: it refuses every float, in Python's own
# optimizer state dicts too. Only there, and only for that error, a file loads unrestricted.
def reads_floats_weights_only():
    buffer = io.BytesIO()
    torch.save({'lr': 0.5}, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
        return True
    except pickle.UnpicklingError:
        return False

FLOATS = reads_floats_weights_only()

def load(path):
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        if FLOATS or 'Unsupported operand 71' not in str(e):
            raise
    print(f'{path}: torch {torch.__version__} loads no float weights-only; loaded unrestricted', file=sys.stderr)
    return torch.load(path, weights_only=False)

def check_file(label, path, model_key, optimizers):
    d = load(path)
    assert isinstance(d, dict), f'{label}: {type(d)}'
    model = Mlp()
    model.load_state_dict(d if model_key is None else d[model_key])  # strict
    for name, t in model.state_dict().items():
        check(label, 'model/' + name, bits(t))
    for item, make in optimizers:
        opt = make(model.parameters())
        saved = d[item]
        assert len(saved['param_groups']) == len(opt.param_groups), f'{label}: {item} param groups'
        for group, mine in zip(saved['param_groups'], opt.param_groups):
            for key, value in group.items():
                assert key == 'params' or (key in mine and mine[key] == value), \
                    f'{label}: {item} has {key}={value!r}; torch.optim has {mine.get(key)!r}'
        opt.load_state_dict(saved)
        for index, state in opt.state_dict()['state'].items():
            for key, value in state.items():
                if value is None:
                    continue
                if key == 'step':  # compared as a float32 scalar, whatever form it takes
                    value = torch.tensor(float(value), dtype=torch.float32)
                check(label, f'{item}/{index}/{key}', bits(value))
        before = [p.detach().clone() for p in model.parameters()]
        model.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), \
            f'{label}: {item} stepped nothing'
    return d
)py";

const char* const kCheckEnd = R"py(
assert not expected, 'not in the files: ' + ', '.join(f'{label} {key}' for label, key in expected)
print('OK')
)py";

/// A `check_file` call: the model under `model_key` ("" for a weights file), then each optimizer.
std::string check_file_call(const std::string& label, const std::string& file, const std::string& model_key,
                            const std::vector<PythonOptimizer>& optimizers) {
  std::vector<std::string> entries;
  for (const auto& o : optimizers) entries.push_back(fmt::format("({}, lambda p: {})", py(o.item), o.make));
  return fmt::format("check_file({}, {}, {}, [{}])\n", py(label), py(file),
                     model_key.empty() ? std::string("None") : py(model_key), fmt::join(entries, ", "));
}

/// Writes files with torch.save into argv[1]: "<name>.pt" and "<name>.txt", the latter listing each
/// tensor as "name|dtype|shape|bytes in hex", dtype by the name c10::toString gives it.
const char* const kMakeFiles = R"py(
out = sys.argv[1]
torch.manual_seed(5)

COMMON = {'float32': 'Float', 'float64': 'Double', 'float16': 'Half', 'bfloat16': 'BFloat16',
          'int8': 'Char', 'int16': 'Short', 'int32': 'Int', 'int64': 'Long', 'uint8': 'Byte',
          'bool': 'Bool', 'complex64': 'ComplexFloat', 'complex128': 'ComplexDouble'}
# Only torch 2.x has these; it pickles them with _rebuild_tensor_v3 over an untyped storage.
NEWER = {name: cpp for name, cpp in {'float8_e4m3fn': 'Float8_e4m3fn', 'float8_e5m2': 'Float8_e5m2',
                                     'uint16': 'UInt16', 'uint32': 'UInt32', 'uint64': 'UInt64'}.items()
         if hasattr(torch, name)}
CPP = {**COMMON, **NEWER}

def sample(name):
    dtype = getattr(torch, name)
    if name in NEWER:  # few operators take them: random bytes, viewed as the dtype
        size = torch.empty(0, dtype=dtype).element_size()
        return torch.randint(0, 256, (3, 4 * size), dtype=torch.uint8).view(dtype)
    if dtype == torch.bool:
        return torch.randn(3, 4) > 0
    if dtype.is_complex:
        return torch.randn(3, 4, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(3, 4, dtype=torch.float64) * 100).to(dtype)
    t = torch.randint(0, 256, (3, 4)) if name == 'uint8' else torch.randint(-128, 128, (3, 4))
    if name == 'int64':
        t[0, 0] = -(1 << 40)  # bytes past the low four
    return t.to(dtype)

def raw(t):
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return bytes(t.view(torch.uint8).tolist()).hex()

def describe(tensors, name):
    with open(f'{out}/{name}.txt', 'w') as f:
        for key, t in tensors.items():
            dtype = CPP[str(t.dtype).replace('torch.', '')]
            shape = ','.join(str(n) for n in t.shape)
            f.write(f'{key}|{dtype}|{shape}|{raw(t)}\n')

def save(tensors, name):
    torch.save(tensors, f'{out}/{name}.pt')
    describe(tensors, name)

tensors = {'dtype.' + name: sample(name) for name in COMMON}
base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
tensors['transposed'] = base.t()                  # not contiguous
big = torch.arange(100, dtype=torch.int64) * 3
tensors['narrowed'] = big[10:20]                  # at an offset into its storage
tensors['block'] = big.view(10, 10)[2:5, 3:7]     # at an offset, strided
shared = torch.randn(8, dtype=torch.float64)
tensors['shared.head'] = shared[:5]               # two views of one storage
tensors['shared.tail'] = shared[3:]
tensors['scalar'] = torch.tensor(2.5, dtype=torch.float64)
assert not tensors['transposed'].is_contiguous() and tensors['block'].storage_offset() == 23
save(tensors, 'tensors')
save({'dtype.' + name: sample(name) for name in NEWER}, 'newer')  # empty where torch has none

model = Mlp()
adam = torch.optim.Adam(model.parameters(), lr=0.01)
x = torch.randn(8, 3)
for _ in range(2):
    adam.zero_grad()
    model(x).square().mean().backward()
    adam.step()
torch.save({'model': model.state_dict(), 'optimizer': adam.state_dict(), 'epoch': 3}, f'{out}/checkpoint.pt')
entries = {'model/' + k: t for k, t in model.state_dict().items()}
for index, state in adam.state_dict()['state'].items():
    for key, t in state.items():
        entries[f'optimizer/{index}/{key}'] = t
describe(entries, 'checkpoint')
print('OK')
)py";

/// One tensor as the Python side describes it.
struct TensorRecord {
  std::string dtype, shape, hex;
};

TensorRecord record_of(const at::Tensor& tensor) {
  static const char digits[] = "0123456789abcdef";
  auto t = tensor.detach().contiguous();
  const auto* bytes = static_cast<const unsigned char*>(t.data_ptr());
  std::string hex;
  for (size_t i = 0; i < t.nbytes(); ++i) {
    hex += digits[bytes[i] >> 4];
    hex += digits[bytes[i] & 15];
  }
  return {c10::toString(t.scalar_type()), fmt::format("{}", fmt::join(t.sizes(), ",")), hex};
}

std::map<std::string, TensorRecord> read_records(const std::string& file) {
  std::map<std::string, TensorRecord> out;
  for (const auto& line : split(read_file(file), '\n')) {
    if (line.empty()) continue;
    auto fields = split(line, '|');
    if (fields.size() != 4) {
      ADD_FAILURE() << file << ": a line not of four fields: " << line;
      continue;
    }
    out[fields[0]] = {fields[1], fields[2], fields[3]};
  }
  return out;
}

/// Exactly the tensors Python described: names, dtypes, shapes and bytes.
void expect_records(const TensorMap& tensors, const std::map<std::string, TensorRecord>& expected,
                    const std::string& file) {
  for (const auto& [name, want] : expected) {
    auto found = tensors.find(name);
    if (found == tensors.end()) {
      ADD_FAILURE() << file << " read without " << name;
      continue;
    }
    auto got = record_of(found->second);
    EXPECT_EQ(got.dtype, want.dtype) << file << " " << name;
    EXPECT_EQ(got.shape, want.shape) << file << " " << name;
    EXPECT_EQ(got.hex, want.hex) << file << " " << name;
  }
  for (const auto& entry : tensors) {
    EXPECT_EQ(expected.count(entry.first), 1u) << file << " read an extra " << entry.first;
  }
}

struct PythonRun {
  int status;
  std::string out, err;
};

class InteropTest : public TorchfitTest {
 protected:
  /// Writes `script` to `name` in the test directory and runs it with `argument`.
  PythonRun run_python(const std::string& name, const std::string& script, const std::string& argument) {
    write_file(path(name), script);
    auto command = fmt::format("/usr/bin/python3 {} {} >{} 2>{}", shell_quoted(path(name)), shell_quoted(argument),
                               shell_quoted(path(name + ".out")), shell_quoted(path(name + ".err")));
    int status = std::system(command.c_str());
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, read_file(path(name + ".out")),
            read_file(path(name + ".err"))};
  }
};

// On torch 1.13 the files holding floats (all but the weights file) load with weights_only=False,
// as that version's weights-only unpickler reads no floats at all (see kCheckFiles).
TEST_F(InteropTest, EveryFileTorchfitWritesLoadsInPythonWeightsOnly) {
  if (!have_python_torch()) GTEST_SKIP() << "Debian's python3 with python3-torch is not installed";
  Expected expected;
  std::string calls;

  // (a) A weights file.
  Mlp weights;
  torchfit::save_weights(*weights, path("weights.pt"));
  expected.add_model("weights", *weights);
  calls += check_file_call("weights", path("weights.pt"), "", {});

  // (b) A Trainer's full checkpoint, and the files a CheckpointCallback and a BackupAndRestore
  // write during the fit.
  const PythonOptimizer fit_adam{"optimizer", "torch.optim.Adam(p, lr=0.01)"};
  auto data = make_data();
  Mlp model;
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.01));
  Trainer trainer(model, adam, ce_loss);
  auto checkpoints = std::make_shared<CheckpointCallback>(
      CheckpointOptions(path("callback-{epoch}.pt")).monitor("loss").save_weights_only(false).fsync(false));
  auto backup = std::make_shared<BackupAndRestore>(BackupOptions(path("backup")).delete_checkpoint(false).fsync(false));
  Expected at_backup;  // backups are taken at epoch begins: what the last one holds
  auto after_backup = std::make_shared<LambdaCallback>();
  after_backup->epoch_begin = [&](int64_t, const Logs&) {
    at_backup = Expected();
    at_backup.add_model("backup", *model);
    at_backup.add_optimizer("backup", "optimizer", *adam);
  };
  trainer.fit(data.x_train, data.y_train,
              FitOptions().epochs(2).batch_size(10).seed(1).callbacks({checkpoints, backup, after_backup}));
  trainer.save_checkpoint(path("trainer.pt"));
  ASSERT_FALSE(checkpoints->last_saved_path().empty());
  ASSERT_TRUE(fs::exists(backup->backup_path()));
  for (const char* label : {"trainer", "callback"}) {  // both hold the state the fit ended with
    expected.add_model(label, *model);
    expected.add_optimizer(label, "optimizer", *adam);
  }
  expected.text += at_backup.text;
  calls += check_file_call("trainer", path("trainer.pt"), "model", {fit_adam});
  calls += check_file_call("callback", checkpoints->last_saved_path(), "model", {fit_adam});
  calls += check_file_call("backup", backup->backup_path(), "model", {fit_adam});

  // (c) A Checkpoint of a module, one stepped optimizer of each type, the RNG and plain values.
  Mlp stepped;
  Checkpoint items;
  items.add("model", stepped);
  std::vector<PythonOptimizer> in_python;
  std::vector<std::shared_ptr<torch::optim::Optimizer>> optimizers;
  for (const auto& c : every_optimizer()) {
    optimizers.push_back(c.make(stepped->parameters()));
    items.add(c.python.item, optimizers.back());
    in_python.push_back(c.python);
  }
  for (int round = 0; round < 2; ++round) {
    for (auto& optimizer : optimizers) {
      optimizer->zero_grad();
      ce_loss(stepped->forward(data.x_train), data.y_train).backward();
      optimizer->step();
    }
  }
  const int64_t count = 7;
  const double ratio = 0.25;
  const std::string name = "interop";
  const auto tensor = torch::arange(6, torch::kDouble).reshape({2, 3}) / 7;
  items.set("count", count);
  items.set("ratio", ratio);
  items.set("flag", true);
  items.set("name", name);
  items.set("tensor", tensor);
  items.add_rng();
  const auto rng = cpu_rng_state();
  torchfit::save(items, path("items.pt"), SaveOptions().fsync(false));
  expected.add_model("items", *stepped);
  for (size_t i = 0; i < optimizers.size(); ++i) expected.add_optimizer("items", in_python[i].item, *optimizers[i]);
  expected.add("items", "rng/cpu", bits_of(rng));
  expected.add("items", "tensor", bits_of(tensor));
  calls += "d = " + check_file_call("items", path("items.pt"), "model", in_python);
  calls += fmt::format(
      "check('items', 'rng/cpu', bits(d['rng']['cpu']))\n"
      "torch.set_rng_state(d['rng']['cpu'])  # a state Python's generator takes\n"
      "assert type(d['count']) is int and d['count'] == {}, repr(d['count'])\n"
      "assert type(d['ratio']) is float and d['ratio'] == {}, repr(d['ratio'])\n"
      "assert d['flag'] is True, repr(d['flag'])\n"
      "assert d['name'] == {}, repr(d['name'])\n"
      "check('items', 'tensor', bits(d['tensor']))\n",
      count, ratio, py(name));

  // (d) LBFGS, stepped once with its history not yet full: one state, of the first parameter,
  // whose tensors span all parameters.
  Mlp searched;
  auto lbfgs = std::make_shared<torch::optim::LBFGS>(searched->parameters(),
                                                     torch::optim::LBFGSOptions(0.5).max_iter(4).history_size(10));
  lbfgs->step([&] {
    lbfgs->zero_grad();
    auto loss = ce_loss(searched->forward(data.x_train), data.y_train);
    loss.backward();
    return loss;
  });
  Checkpoint line_search;
  line_search.add("model", searched);
  line_search.add("lbfgs", lbfgs);
  torchfit::save(line_search, path("lbfgs.pt"), SaveOptions().fsync(false));
  expected.add_model("lbfgs", *searched);
  const auto& search = static_cast<const torch::optim::LBFGSParamState&>(*lbfgs->state().begin()->second);
  expected.add("lbfgs", "d", bits_of(search.d()));
  expected.add("lbfgs", "prev_flat_grad", bits_of(search.prev_flat_grad()));
  for (size_t i = 0; i < search.old_dirs().size(); ++i) {
    expected.add("lbfgs", fmt::format("old_dirs/{}", i), bits_of(search.old_dirs()[i]));
    expected.add("lbfgs", fmt::format("ro/{}", i), bits_of(search.ro()[i]));
  }
  calls += fmt::format(R"py(
d = load({})
model = Mlp()
model.load_state_dict(d['model'])
for name, t in model.state_dict().items():
    check('lbfgs', 'model/' + name, bits(t))
opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=10)
opt.load_state_dict(d['lbfgs'])
s = opt.state_dict()['state'][0]
assert (s['func_evals'], s['n_iter']) == ({}, {}), (s['func_evals'], s['n_iter'])
check('lbfgs', 'd', bits(s['d']))
check('lbfgs', 'prev_flat_grad', bits(s['prev_flat_grad']))
for i, (direction, r) in enumerate(zip(s['old_dirs'], s['ro'])):
    check('lbfgs', f'old_dirs/{{i}}', bits(direction))
    check('lbfgs', f'ro/{{i}}', bits(r))
before = [p.detach().clone() for p in model.parameters()]
def closure():
    opt.zero_grad()
    loss = model(torch.randn(4, 3)).square().sum()
    loss.backward()
    return loss
opt.step(closure)  # on from the loaded history
assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), 'LBFGS stepped nothing'
)py",
                       py(path("lbfgs.pt")), search.func_evals(), search.n_iter());

  write_file(path("expected.txt"), expected.text);
  auto python = run_python("check.py", std::string(kPythonMlp) + kCheckFiles + calls + kCheckEnd, path("expected.txt"));
  ASSERT_EQ(python.status, 0) << python.err << python.out;
  EXPECT_EQ(python.out, "OK\n") << python.err;
}

TEST_F(InteropTest, PythonFilesLoadBitwiseInCpp) {
  if (!have_python_torch()) GTEST_SKIP() << "Debian's python3 with python3-torch is not installed";
  auto python = run_python("make.py", std::string(kPythonMlp) + kMakeFiles, dir().string());
  ASSERT_EQ(python.status, 0) << python.err << python.out;
  ASSERT_EQ(python.out, "OK\n") << python.err;

  // A tensor of each dtype, views and shared storages, through the public reader.
  auto tensors = read_weights(path("tensors.pt"));
  expect_records(tensors, read_records(path("tensors.txt")), "tensors.pt");
  ASSERT_TRUE(tensors.count("shared.head") && tensors.count("shared.tail"));
  EXPECT_EQ(tensors.at("shared.head").storage().unsafeGetStorageImpl(),
            tensors.at("shared.tail").storage().unsafeGetStorageImpl())
      << "views of one storage in Python must stay views of one storage, as torch.load keeps them";

  // Python's usual training checkpoint: the model by key, the Adam state through a Checkpoint.
  Mlp plain;
  load_weights(*plain, path("checkpoint.pt"), "model");
  Mlp restored;
  auto adam = std::make_shared<torch::optim::Adam>(restored->parameters(), torch::optim::AdamOptions(0.5));
  Checkpoint state;
  state.add("model", restored);
  state.add("optimizer", adam);
  state.set("epoch", int64_t{0});
  torchfit::load(state, path("checkpoint.pt"));
  EXPECT_EQ(state.get<int64_t>("epoch"), 3);
  const auto& options = static_cast<const torch::optim::AdamOptions&>(adam->param_groups()[0].options());
  EXPECT_EQ(options.lr(), 0.01);
  EXPECT_EQ(std::get<0>(options.betas()), 0.9);
  EXPECT_EQ(std::get<1>(options.betas()), 0.999);
  expect_same_weights(*plain, *restored);
  TensorMap read;
  for (const auto& [key, t] : torchfit::state_dict(*plain)) read["model/" + key] = t;
  for (const auto& [key, t] : optimizer_state(*adam)) read["optimizer/" + key] = t;
  expect_records(read, read_records(path("checkpoint.txt")), "checkpoint.pt");

  // float8 and uint16/32/64, which Python 2.x rebuilds with _rebuild_tensor_v3 (torch 2.x only).
  auto newer = read_records(path("newer.txt"));
  if (!newer.empty()) expect_records(read_weights(path("newer.pt")), newer, "newer.pt");
}

}  // namespace
}  // namespace torchfit::test
