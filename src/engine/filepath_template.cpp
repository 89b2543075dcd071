#include "engine/filepath_template.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <regex>

#include <fmt/format.h>

#include "torchfit/error.h"

namespace torchfit::detail {
namespace {

/// The presentation type of a Python format spec ('\0' when there is none).
char presentation_type(const std::string& spec) {
  if (spec.empty()) return '\0';
  char last = spec.back();
  return std::isalpha(static_cast<unsigned char>(last)) || last == '%' ? last : '\0';
}

/// Python's float formatting without a presentation type: like 'g', but fixed
/// notation keeps at least one digit after the point; no precision means repr.
std::string python_float(double value, const std::string& spec) {
  auto dot = spec.find('.');
  std::string head = dot == std::string::npos ? spec : spec.substr(0, dot);
  std::string text;
  if (!std::isfinite(value)) {
    text = std::isnan(value) ? "nan" : (value > 0 ? "inf" : "-inf");
  } else if (dot == std::string::npos) {
    text = fmt::format("{}", value);  // shortest round trip, as repr
    double magnitude = std::abs(value);
    bool exponent = magnitude != 0 && (magnitude >= 1e16 || magnitude < 1e-4);
    if (exponent) {
      text = fmt::format("{:e}", value);
      // Python's repr: shortest digits with an exponent of at least two digits.
      auto shortest = fmt::format("{}", value);
      if (shortest.find('e') != std::string::npos) {
        auto e = shortest.find('e');
        std::string mantissa = shortest.substr(0, e), exp = shortest.substr(e + 1);
        char sign = exp[0] == '-' ? '-' : '+';
        if (exp[0] == '-' || exp[0] == '+') exp = exp.substr(1);
        if (exp.size() < 2) exp = "0" + exp;
        text = mantissa + "e" + sign + exp;
      }
    } else if (text.find_first_of(".e") == std::string::npos) {
      text += ".0";
    } else if (text.find('e') != std::string::npos) {
      text = fmt::format("{:f}", value);  // fmt chose an exponent where Python does not
      text.erase(text.find_last_not_of('0') + 1);
      if (text.back() == '.') text += '0';
    }
  } else {
    int precision = std::max(1, std::stoi(spec.substr(dot + 1)));
    text = fmt::format(fmt::runtime("{:." + std::to_string(precision) + "g}"), value);
    if (text.find_first_of(".einf") == std::string::npos) text += ".0";
  }
  if (head.empty()) return text;
  // Width, fill, align and sign apply to the text as Python applies them to numbers.
  bool sign = head.find('+') != std::string::npos && !text.empty() && text[0] != '-';
  if (sign) text = "+" + text;
  std::string align = head;
  align.erase(std::remove(align.begin(), align.end(), '+'), align.end());
  if (align.empty()) return text;
  if (std::isdigit(static_cast<unsigned char>(align[0])) && align.find_first_not_of("0123456789") == std::string::npos) {
    align = ">" + align;  // numbers align right by default
  }
  return fmt::format(fmt::runtime("{:" + align + "}"), text);
}

}  // namespace

FilepathTemplate::FilepathTemplate(std::string pattern) : pattern_(std::move(pattern)) {
  std::string literal;
  for (size_t i = 0; i < pattern_.size(); ++i) {
    char c = pattern_[i];
    if ((c == '{' || c == '}') && i + 1 < pattern_.size() && pattern_[i + 1] == c) {
      literal += c;
      ++i;
      continue;
    }
    if (c == '}') {
      parse_error_ = "Single '}' encountered in format string";
      break;
    }
    if (c != '{') {
      literal += c;
      continue;
    }
    size_t end = pattern_.find('}', i + 1);
    if (end == std::string::npos) {
      parse_error_ = "Single '{' encountered in format string";
      break;
    }
    if (!literal.empty()) pieces_.push_back({false, literal, ""});
    literal.clear();
    std::string field = pattern_.substr(i + 1, end - i - 1);
    auto colon = field.find(':');
    std::string name = field.substr(0, colon);
    if (name.find('!') != std::string::npos) parse_error_ = fmt::format("conversions are not supported: '{}'", field);
    pieces_.push_back({true, name, colon == std::string::npos ? "" : field.substr(colon + 1)});
    if (std::find(fields_.begin(), fields_.end(), name) == fields_.end()) fields_.push_back(name);
    i = end;
  }
  if (!literal.empty()) pieces_.push_back({false, literal, ""});
}

std::string FilepathTemplate::literal_directory() const {
  std::string literal = !pieces_.empty() && !pieces_.front().is_field ? pieces_.front().text : "";
  if (pieces_.size() == 1 && !pieces_.front().is_field) literal = pieces_.front().text;
  return std::filesystem::path(literal).parent_path().string();
}

std::string FilepathTemplate::format(const Logs& values, const std::set<std::string>& integers) const {
  std::string reason = parse_error_;
  std::string out;
  for (const auto& piece : pieces_) {
    if (!reason.empty()) break;
    if (!piece.is_field) {
      out += piece.text;
      continue;
    }
    auto it = values.find(piece.text);
    if (it == values.end()) {
      reason = fmt::format("missing key '{}'", piece.text);
      break;
    }
    const double value = it->second;
    const char type = presentation_type(piece.spec);
    const bool integral = std::isfinite(value) && value == std::floor(value) && std::abs(value) < 9.2e18;
    try {
      if (type == '%') {
        auto spec = piece.spec.substr(0, piece.spec.size() - 1);
        if (spec.find('.') == std::string::npos) spec += ".6";
        out += fmt::format(fmt::runtime("{:" + spec + "f}"), value * 100) + "%";
      } else if (std::string("dxXobnc").find(type) != std::string::npos && type != '\0') {
        if (!integral) {
          reason = fmt::format("field '{}' has format '{}' for integers, but its value {} is not an integer",
                               piece.text, piece.spec, value);
          break;
        }
        auto spec = type == 'n' ? piece.spec.substr(0, piece.spec.size() - 1) + "d" : piece.spec;
        out += fmt::format(fmt::runtime("{:" + spec + "}"), static_cast<int64_t>(value));
      } else if (type == '\0' && integers.count(piece.text) && integral) {
        out += fmt::format(fmt::runtime("{:" + piece.spec + "}"), static_cast<int64_t>(value));
      } else if (type == '\0') {
        out += python_float(value, piece.spec);
      } else {
        out += fmt::format(fmt::runtime("{:" + piece.spec + "}"), value);
      }
    } catch (const std::exception& e) {
      reason = e.what();
    }
  }
  if (reason.empty()) return out;
  throw ValueError(fmt::format("Failed to format this callback filepath: \"{}\". Reason: {}; available keys: {}",
                               pattern_, reason, join_keys(values)));
}

bool FilepathTemplate::matches(const std::string& path) const {
  std::string expression;
  for (const auto& piece : pieces_) {
    if (piece.is_field) {
      expression += "[^/]*";
      continue;
    }
    for (char c : piece.text) {
      if (std::string(".^$|()[]{}*+?\\").find(c) != std::string::npos) expression += '\\';
      expression += c;
    }
  }
  return std::regex_match(path, std::regex(expression));
}

}  // namespace torchfit::detail
