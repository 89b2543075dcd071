#include "sys/threads.h"

#include <exception>
#include <thread>

namespace torchfit::detail {

void run_pair(const std::function<void()>& first, const std::function<void()>& second) {
  std::exception_ptr error;
  std::thread helper([&] {
    try {
      second();
    } catch (...) {
      error = std::current_exception();
    }
  });
  try {
    first();
  } catch (...) {
    helper.join();
    throw;
  }
  helper.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace torchfit::detail
