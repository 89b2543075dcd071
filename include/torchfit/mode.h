#pragma once
/// \file
/// The direction in which a monitored quantity improves.
///
///     torchfit::CheckpointOptions("best.pt").monitor("val_f1").mode(torchfit::Mode::Max)

#include <string_view>

namespace torchfit {

/// `Min`: lower is better (losses). `Max`: higher is better (accuracy).
/// `Auto`: take the direction from the metric registered under the monitored name.
enum class Mode { Auto, Min, Max };

/// "auto", "min" or "max", as Keras spells them.
std::string_view to_string(Mode mode);

}  // namespace torchfit
