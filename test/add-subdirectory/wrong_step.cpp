// Custom steps with wrong signatures: run.cmake expects this file NOT to compile, and
// the compiler's output to carry torchfit's static_assert messages.
#include <torch/torch.h>
#include <torchfit/torchfit.h>

struct Net : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x) { return x; }
};

void wrong_steps(torchfit::Trainer& trainer) {
  using Example = torch::data::Example<>;
  // The batch by value and no StepContext.
  trainer.train_step<Example>([](Example batch) { return batch.data.sum(); });
  // Right parameters, but a return value the Trainer cannot log.
  trainer.test_step<Example>([](torchfit::StepContext&, const Example& batch) { return batch.data; });
  // A predict step that returns nothing.
  trainer.predict_step<Example>([](const Example&) {});
}
