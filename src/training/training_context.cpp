#include "torchfit/training_context.h"

#include "torchfit/trainer.h"

namespace torchfit {

TrainingContext::~TrainingContext() = default;

std::string TrainingContext::broadcast_from_main(const std::string& message, const char*) const { return message; }

TrainingContext* context_of(Trainer* trainer) { return trainer; }
const TrainingContext* context_of(const Trainer* trainer) { return trainer; }

}  // namespace torchfit
