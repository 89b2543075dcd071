#pragma once
/// \file
/// TerminateOnNaN: stop training when the loss becomes NaN or infinite (Keras semantics).
///
///     trainer.fit(x, y, torchfit::FitOptions().callbacks({std::make_shared<torchfit::TerminateOnNaN>()}));

#include "torchfit/callback.h"

namespace torchfit {

class TerminateOnNaN : public Callback {
 public:
  void on_train_batch_end(int64_t batch, const Logs& logs) override;
};

}  // namespace torchfit
