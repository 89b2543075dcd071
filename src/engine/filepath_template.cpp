#include "engine/filepath_template.h"

#include <algorithm>
#include <cctype>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include <fmt/format.h>

#include "sys/paths.h"

#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

/// Why a field cannot be formatted; becomes the "Reason:" of the ValueError.
class FieldError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Whether `c` is one of `chars` (never for '\0', which strchr would find).
bool one_of(char c, const char* chars) { return c != '\0' && std::strchr(chars, c) != nullptr; }

/// Bytes in the UTF-8 character that starts with `lead` (Python's fill is any character).
size_t utf8_length(char lead) {
  const auto byte = static_cast<unsigned char>(lead);
  return byte < 0xC0 ? 1 : byte < 0xE0 ? 2 : byte < 0xF0 ? 3 : 4;
}

/// Reads the decimal number at `pos`; false when it has more digits than Python accepts.
bool read_number(const std::string& text, size_t& pos, size_t& number) {
  number = 0;
  for (; pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos])); ++pos) {
    number = number * 10 + (text[pos] - '0');
    if (number > INT_MAX) return false;
  }
  return true;
}

/// Parses a Python format spec into `spec`; returns why it is invalid, or "" (Python's wording).
std::string parse_spec(const std::string& text, FormatSpec& spec) {
  size_t pos = 0;
  bool fill_given = false, align_given = false;
  const size_t fill_size = text.empty() ? 0 : std::min(utf8_length(text[0]), text.size());
  if (fill_size < text.size() && one_of(text[fill_size], "<>^=")) {
    spec.fill = text.substr(0, fill_size);
    spec.align = text[fill_size];
    pos = fill_size + 1;
    fill_given = align_given = true;
  } else if (!text.empty() && one_of(text[0], "<>^=")) {
    spec.align = text[pos++];
    align_given = true;
  }
  if (pos < text.size() && one_of(text[pos], "+- ")) spec.sign = text[pos++];
  if (pos < text.size() && text[pos] == 'z') return "the 'z' option is not supported";
  if (pos < text.size() && text[pos] == '#') {
    spec.alternate = true;
    ++pos;
  }
  // A '0' before the width pads with zeros after the sign, unless a fill or alignment says otherwise.
  if (!fill_given && pos < text.size() && text[pos] == '0') {
    spec.fill = "0";
    if (!align_given) spec.align = '=';
    ++pos;
  }
  if (!read_number(text, pos, spec.width)) return "Too many decimal digits in format string";
  if (pos < text.size() && (text[pos] == ',' || text[pos] == '_')) {
    return fmt::format("grouping with '{}' is not supported", text[pos]);
  }
  if (pos < text.size() && text[pos] == '.') {
    size_t precision = 0, digits_start = ++pos;
    if (!read_number(text, pos, precision)) return "Too many decimal digits in format string";
    if (pos == digits_start) return "Format specifier missing precision";
    spec.precision = static_cast<int>(precision);
  }
  if (text.size() - pos > 1) return fmt::format("Invalid format specifier '{}'", text);
  if (pos == text.size()) return "";
  spec.type = text[pos];
  if (spec.type == 'c') return "format code 'c' is not supported";
  if (!one_of(spec.type, "bdeEfFgGnoxX%")) return fmt::format("Unknown format code '{}'", spec.type);
  return "";
}

/// Why Python's `"{" + body + "}"` cannot name a log key, or "" when it can.
std::string unsupported_field(const std::string& body, const std::string& name) {
  if (name.size() < body.size() && body[name.size()] == '!') return "conversions are not supported";
  if (name.empty()) return "positional fields are not supported; name a log key";
  if (name.find_first_of(".[") != std::string::npos) return "attribute and index lookups are not supported";
  return "";
}

/// Pads `sign + body` to the spec's width; '=' puts the padding between them.
std::string pad(const std::string& sign, const std::string& body, const FormatSpec& spec) {
  const size_t length = sign.size() + body.size();  // both ASCII
  if (spec.width <= length) return sign + body;
  const auto fill = [&](size_t count) {
    std::string out;
    for (size_t i = 0; i < count; ++i) out += spec.fill;
    return out;
  };
  const size_t padding = spec.width - length;
  switch (spec.align) {
    case '<': return sign + body + fill(padding);
    case '^': return fill(padding / 2) + sign + body + fill(padding - padding / 2);
    case '=': return sign + fill(padding) + body;
    default: return fill(padding) + sign + body;
  }
}

std::string sign_text(bool negative, const FormatSpec& spec) {
  if (negative) return "-";
  return spec.sign == '-' ? "" : std::string(1, spec.sign);
}

/// printf-style formatting of `magnitude` with type e, E, f or F.
std::string printf_style(double magnitude, char type, int precision, bool alternate) {
  return fmt::format(fmt::runtime(fmt::format("{{:{}.{}{}}}", alternate ? "#" : "", precision, type)), magnitude);
}

/// Drops the zeros that end the fraction, as 'g' does; `keep_one` keeps "12.0" rather than "12".
std::string trim_fraction(std::string number, bool keep_one) {
  if (number.find('.') == std::string::npos) return number;
  number.erase(number.find_last_not_of('0') + 1);
  if (number.back() == '.') keep_one ? number.push_back('0') : number.pop_back();
  return number;
}

/// Python's repr, which a spec with neither type nor precision uses ('#' keeps the point).
std::string repr(double magnitude, bool alternate) {
  // fmt's shortest round trip has repr's digits and layout, but prints 1.0 as "1". The point is
  // added here, not with fmt's '#', which prints "1." from fmt 10 on.
  std::string text = fmt::format("{}", magnitude);
  if (!std::isfinite(magnitude) || text.find('.') != std::string::npos) return text;
  const size_t exponent = text.find('e');
  if (exponent == std::string::npos) return text + ".0";
  if (alternate) text.insert(exponent, ".");  // Python: format(1e16, "#") is "1.e+16"
  return text;
}

/// Python's 'g' with `precision` significant digits. `add_dot_0` is Python's rule for a spec with
/// a precision but no type: switch to exponent notation one digit earlier and keep a digit after
/// the point. (fmt's '#g' differs from Python's, so fmt only supplies 'e' and 'f'.)
std::string general(double magnitude, int precision, bool alternate, bool add_dot_0, bool upper) {
  const int digits = std::max(precision, 1);
  const std::string scientific = printf_style(magnitude, upper ? 'E' : 'e', digits - 1, alternate);
  if (!std::isfinite(magnitude)) return scientific;  // inf, nan, INF, NAN
  const size_t e = scientific.find(upper ? 'E' : 'e');
  const int exponent = std::stoi(scientific.substr(e + 1));  // after rounding to `digits`
  if (exponent < -4 || exponent >= digits - (add_dot_0 ? 1 : 0)) {
    return alternate ? scientific : trim_fraction(scientific.substr(0, e), false) + scientific.substr(e);
  }
  const std::string fixed = printf_style(magnitude, 'f', digits - 1 - exponent, alternate);
  return alternate ? fixed : trim_fraction(fixed, add_dot_0);
}

/// Python's `format(float(value), spec)`.
std::string format_float(double value, const FormatSpec& spec) {
  const double magnitude = std::fabs(value);  // also drops a NaN's sign, which Python never prints
  const std::string sign = sign_text(std::signbit(value) && !std::isnan(value), spec);
  const int precision = spec.precision.value_or(6);
  std::string body;
  switch (spec.type) {
    case '\0':
      body = spec.precision ? general(magnitude, precision, spec.alternate, true, false)
                            : repr(magnitude, spec.alternate);
      break;
    case 'g':
    case 'G':
    case 'n':
      body = general(magnitude, precision, spec.alternate, false, spec.type == 'G');
      break;
    case '%':
      body = printf_style(magnitude * 100, 'f', precision, spec.alternate) + "%";
      break;
    default:
      body = printf_style(magnitude, spec.type, precision, spec.alternate);
  }
  return pad(sign, body, spec);
}

/// Python's `format(int(value), spec)` for a whole `value` whose magnitude fits in 64 bits.
std::string format_integer(double value, const FormatSpec& spec) {
  if (spec.precision) throw FieldError("Precision not allowed in integer format specifier");
  const char type = spec.type == '\0' || spec.type == 'n' ? 'd' : spec.type;
  std::string prefix = sign_text(value < 0, spec);
  if (spec.alternate && type != 'd') prefix += {'0', type};  // 0b, 0o, 0x, 0X
  const auto magnitude = static_cast<uint64_t>(std::fabs(value));
  return pad(prefix, fmt::format(fmt::runtime(std::string("{:") + type + "}"), magnitude), spec);
}

/// Formats one log value; the reason it cannot does not name the field. Logs are doubles, so
/// an integral value may use the integer codes even where Python would need an int.
std::string format_value(double value, bool integer_key, const FormatSpec& spec, const std::string& spec_error) {
  if (!spec_error.empty()) throw FieldError(spec_error);
  const bool whole = std::isfinite(value) && value == std::trunc(value) && std::fabs(value) < 0x1p64;
  const bool integer_code = one_of(spec.type, "bdoxX");
  if (integer_code && !whole) {
    throw FieldError(fmt::format("format code '{}' is for integers, but its value {} is not an integer", spec.type,
                                 format_float(value, FormatSpec{})));
  }
  const bool python_int = integer_key && whole && (spec.type == '\0' || spec.type == 'n');
  return integer_code || python_int ? format_integer(value, spec) : format_float(value, spec);
}

}  // namespace

FilepathTemplate::FilepathTemplate(std::string pattern) : pattern_(std::move(pattern)) {
  std::string literal;
  const auto flush_literal = [&] {
    if (!literal.empty()) pieces_.push_back({false, literal, {}, ""});
    literal.clear();
  };
  for (size_t i = 0; i < pattern_.size();) {
    const char c = pattern_[i];
    if ((c == '{' || c == '}') && i + 1 < pattern_.size() && pattern_[i + 1] == c) {
      literal += c;
      i += 2;
    } else if (c == '}') {
      syntax_error_ = "Single '}' encountered in format string";
      break;
    } else if (c != '{') {
      literal += c;
      ++i;
    } else {
      const size_t close = pattern_.find_first_of("{}", i + 1);
      const std::string body = pattern_.substr(i + 1, close - i - 1);  // to the end when unclosed
      if (close == std::string::npos) {
        syntax_error_ = i + 1 == pattern_.size()                  ? "Single '{' encountered in format string"
                        : body.find(':') == std::string::npos ? "expected '}' before end of string"
                                                              : "unmatched '{' in format spec";
        break;
      }
      if (pattern_[close] == '{') {
        syntax_error_ = fmt::format("nested replacement fields are not supported: '{}'", pattern_.substr(i));
        break;
      }
      const std::string name = body.substr(0, body.find_first_of("!:"));
      if (auto why = unsupported_field(body, name); !why.empty()) {
        syntax_error_ = fmt::format("{}: '{{{}}}'", why, body);
        break;
      }
      flush_literal();
      Piece field{true, name, {}, ""};
      if (name.size() < body.size()) field.spec_error = parse_spec(body.substr(name.size() + 1), field.spec);
      pieces_.push_back(std::move(field));
      if (std::find(fields_.begin(), fields_.end(), name) == fields_.end()) fields_.push_back(name);
      i = close + 1;
    }
  }
  flush_literal();
}

std::string FilepathTemplate::literal_directory() const {
  const bool starts_literal = !pieces_.empty() && !pieces_.front().is_field;
  return parent_directory(starts_literal ? pieces_.front().text : "");
}

std::string FilepathTemplate::format(const Logs& values, const std::set<std::string>& integers) const {
  std::string out;
  try {
    for (const Piece& piece : pieces_) {
      if (!piece.is_field) {
        out += piece.text;
        continue;
      }
      // Python looks the key up before it reads the spec.
      const auto value = values.find(piece.text);
      if (value == values.end()) throw FieldError(fmt::format("missing key '{}'", piece.text));
      try {
        out += format_value(value->second, integers.count(piece.text) > 0, piece.spec, piece.spec_error);
      } catch (const FieldError& e) {
        throw FieldError(fmt::format("field '{}': {}", piece.text, e.what()));
      }
    }
    if (!syntax_error_.empty()) throw FieldError(syntax_error_);
  } catch (const std::runtime_error& e) {  // our reasons, and fmt's should it reject a spec
    throw ValueError(fmt::format("Failed to format this callback filepath: \"{}\". Reason: {}; available keys: {}",
                                 pattern_, e.what(), join_keys(values)));
  }
  return out;
}

bool FilepathTemplate::matches(const std::string& path) const {
  const bool always_fails = !syntax_error_.empty() || std::any_of(pieces_.begin(), pieces_.end(), [](const Piece& p) {
                              return !p.spec_error.empty();
                            });
  return !always_fails && matches_from(0, path, 0);
}

bool FilepathTemplate::matches_from(size_t piece, const std::string& path, size_t pos) const {
  if (piece == pieces_.size()) return pos == path.size();
  const Piece& current = pieces_[piece];
  if (!current.is_field) {
    return path.compare(pos, current.text.size(), current.text) == 0 &&
           matches_from(piece + 1, path, pos + current.text.size());
  }
  // A formatted number is never empty; a field never spans directories.
  for (size_t end = pos + 1; end <= path.size() && path[end - 1] != '/'; ++end) {
    if (matches_from(piece + 1, path, end)) return true;
  }
  return false;
}

}  // namespace torchfit::detail
