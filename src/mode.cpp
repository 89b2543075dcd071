#include "torchfit/mode.h"

namespace torchfit {

std::string_view to_string(Mode mode) {
  switch (mode) {
    case Mode::Min: return "min";
    case Mode::Max: return "max";
    case Mode::Auto: break;
  }
  return "auto";
}

}  // namespace torchfit
