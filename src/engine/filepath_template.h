#pragma once
// Checkpoint filepath templates with Python str.format semantics, as Keras's
// ModelCheckpoint formats `filepath.format(epoch=..., **logs)`.

#include <set>
#include <string>
#include <vector>

#include "torchfit/logs.h"

namespace torchfit::detail {

/// A checkpoint filepath template ("ckpt/{epoch:02d}-{val_loss:.4f}.pt").
class FilepathTemplate {
 public:
  explicit FilepathTemplate(std::string pattern);
  const std::string& pattern() const { return pattern_; }
  /// Names of the replacement fields, in order, each once.
  const std::vector<std::string>& fields() const { return fields_; }
  /// The directory of the literal text before the first field ("" for "{epoch}.pt").
  std::string literal_directory() const;
  /// Formats with `values`; keys in `integers` format as Python ints, the rest as
  /// Python floats. Throws ValueError naming the pattern, the reason and the keys.
  std::string format(const Logs& values, const std::set<std::string>& integers = {}) const;
  /// Whether `path` could be a result of `format` (a field matches any text without '/').
  bool matches(const std::string& path) const;

 private:
  struct Piece {
    bool is_field = false;
    std::string text;  // literal text, or the field name
    std::string spec;  // after ':'
  };
  std::string pattern_;
  std::vector<Piece> pieces_;
  std::vector<std::string> fields_;
  std::string parse_error_;
};

}  // namespace torchfit::detail
