#pragma once
/// \file
/// Checkpoint filepath templates with Python str.format semantics, as Keras's
/// ModelCheckpoint formats `filepath.format(epoch=epoch + 1, **logs)`.

#include <cstddef>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "torchfit/logs.h"

namespace torchfit::detail {

/// A Python format spec, `[[fill]align][sign][#][0][width][.precision][type]`, with the
/// '0' flag already resolved into `fill` and `align` the way Python resolves it.
struct FormatSpec {
  std::string fill = " ";  ///< one UTF-8 character
  char align = '>';        ///< '<', '>', '^', or '=' (padding between the sign and the digits)
  char sign = '-';         ///< '-', '+' or ' '
  bool alternate = false;  ///< '#'
  size_t width = 0;
  std::optional<int> precision;
  char type = '\0';  ///< the presentation type; '\0' when there is none
};

/// A checkpoint filepath template with Python str.format semantics.
///
///     FilepathTemplate path("ckpt/{epoch:02d}-{val_loss:.4f}.pt");
///     path.format({{"epoch", 3}, {"val_loss", 0.25}}, {"epoch"});  // "ckpt/03-0.2500.pt"
class FilepathTemplate {
 public:
  /// Parses `pattern` once. A malformed pattern does not throw here: like Python, `format`
  /// raises the error when it reaches it.
  explicit FilepathTemplate(std::string pattern);
  const std::string& pattern() const { return pattern_; }
  /// Names of the replacement fields, in order, each once.
  const std::vector<std::string>& fields() const { return fields_; }
  /// The directory of the literal text before the first field ("ckpt/run" for
  /// "ckpt/run/{epoch}.pt", "" for "{epoch}.pt"): where this template's files can appear.
  std::string literal_directory() const;
  /// Formats with `values`. Keys in `integers` hold integral values (epoch, batch, step) and
  /// format as Python ints; every other value formats as a Python float, except that an
  /// integral one may also take the integer codes b, d, o, x, X. Throws ValueError:
  /// `Failed to format this callback filepath: "<pattern>". Reason: <reason>; available keys: <keys>`.
  std::string format(const Logs& values, const std::set<std::string>& integers = {}) const;
  /// Whether `path` could be a result of `format` (a field matches any non-empty text without
  /// '/'), for finding this template's files in a directory listing. False for a pattern
  /// that `format` always rejects.
  bool matches(const std::string& path) const;

 private:
  /// Literal text (with {{ and }} unescaped), or a replacement field.
  struct Piece {
    bool is_field = false;
    std::string text;  ///< the literal, or the field's name
    FormatSpec spec;
    std::string spec_error;  ///< why the spec is invalid; raised once the key is found, as Python does
  };

  bool matches_from(size_t piece, const std::string& path, size_t pos) const;

  std::string pattern_;
  std::vector<Piece> pieces_;
  std::vector<std::string> fields_;
  std::string syntax_error_;  ///< why parsing stopped after the last piece; empty when it did not
};

}  // namespace torchfit::detail
