#pragma once
// Where encoders write their bytes: a file being committed, or memory.

#include <cstddef>
#include <string>

#include "sys/posix_file.h"  // errno_message

namespace torchfit::detail {

class ByteSink {
 public:
  virtual ~ByteSink() = default;
  /// Appends all of `data`; throws CheckpointError naming the destination.
  virtual void write(const void* data, size_t size) = 0;
  /// The destination, for messages.
  virtual const std::string& target() const = 0;
};

/// Collects what it receives: in-memory files.
class StringSink : public ByteSink {
 public:
  void write(const void* data, size_t size) override { bytes.append(static_cast<const char*>(data), size); }
  const std::string& target() const override { return name_; }
  std::string bytes;

 private:
  std::string name_ = "(memory)";
};

}  // namespace torchfit::detail
