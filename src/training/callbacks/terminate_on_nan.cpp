#include "torchfit/callbacks/terminate_on_nan.h"

#include <cmath>

#include <spdlog/spdlog.h>

#include "torchfit/log.h"
#include "torchfit/training_context.h"

namespace torchfit {

void TerminateOnNaN::on_train_batch_end(int64_t batch, const Logs& logs) {
  auto it = logs.find("loss");
  if (it == logs.end() || std::isfinite(it->second)) return;
  logger()->warn("Batch {}: Invalid loss, terminating training", batch);
  context_->stop_training(true);
}

}  // namespace torchfit
