#include "yaml_value.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <regex>
#include <stdexcept>

namespace mblm::runtime::yaml_value {
namespace {

// What yaml.safe_load makes of a scalar: PyYAML resolves plain (unquoted) scalars by the YAML 1.1
// patterns below; quoted scalars are always strings.
enum class Kind { kNull, kBool, kInt, kFloat, kStr };

struct Scalar {
  Kind kind = Kind::kStr;
  std::string text;
  bool boolean = false;
  int64_t integer = 0;
  bool int_overflow = false;  // a Python int beyond 64 bits
  double real = 0.0;
};

const std::regex& bool_pattern() {
  static const std::regex re(
      "yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF");
  return re;
}

const std::regex& int_pattern() {
  static const std::regex re(
      "[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+"
      "|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+");
  return re;
}

const std::regex& float_pattern() {
  static const std::regex re(
      "[-+]?(?:[0-9][0-9_]*)\\.[0-9_]*(?:[eE][-+][0-9]+)?|\\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
      "|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\\.[0-9_]*|[-+]?\\.(?:inf|Inf|INF)|\\.(?:nan|NaN|NAN)");
  return re;
}

std::string without_underscores(const std::string& s) {
  std::string out;
  std::copy_if(s.begin(), s.end(), std::back_inserter(out), [](char c) { return c != '_'; });
  return out;
}

// Splits a leading sign off `s`; returns -1 or +1.
int take_sign(std::string& s) {
  if (!s.empty() && (s[0] == '-' || s[0] == '+')) {
    const int sign = s[0] == '-' ? -1 : 1;
    s.erase(0, 1);
    return sign;
  }
  return 1;
}

// Accumulates digits in `base`; false on overflow of int64.
bool accumulate(const std::string& digits, int base, int sign, int64_t& out) {
  __int128 value = 0;
  for (char c : digits) {
    const int d = std::isdigit(static_cast<unsigned char>(c))
                      ? c - '0'
                      : std::tolower(static_cast<unsigned char>(c)) - 'a' + 10;
    value = value * base + d;
    if (value > static_cast<__int128>(std::numeric_limits<int64_t>::max()) + 1) return false;
  }
  value *= sign;
  if (value > std::numeric_limits<int64_t>::max()) return false;
  out = static_cast<int64_t>(value);
  return true;
}

// Base-60 "a:b:c" (YAML 1.1 sexagesimal) of non-negative parts.
double sexagesimal(const std::string& s) {
  double value = 0;
  size_t start = 0;
  while (true) {
    const size_t colon = s.find(':', start);
    value = value * 60 + std::strtod(s.substr(start, colon - start).c_str(), nullptr);
    if (colon == std::string::npos) return value;
    start = colon + 1;
  }
}

Scalar resolve_int(const std::string& text) {
  Scalar s{Kind::kInt, text};
  std::string digits = without_underscores(text);
  const int sign = take_sign(digits);
  bool ok = true;
  if (digits.find(':') != std::string::npos) {
    const double v = sexagesimal(digits) * sign;
    ok = std::abs(v) < 9.0e18;
    s.integer = static_cast<int64_t>(v);
  } else if (digits.rfind("0b", 0) == 0) {
    ok = accumulate(digits.substr(2), 2, sign, s.integer);
  } else if (digits.rfind("0x", 0) == 0) {
    ok = accumulate(digits.substr(2), 16, sign, s.integer);
  } else if (digits.size() > 1 && digits[0] == '0') {
    ok = accumulate(digits.substr(1), 8, sign, s.integer);
  } else {
    ok = accumulate(digits, 10, sign, s.integer);
  }
  s.int_overflow = !ok;
  return s;
}

Scalar resolve_float(const std::string& text) {
  Scalar s{Kind::kFloat, text};
  std::string body = without_underscores(text);
  std::transform(body.begin(), body.end(), body.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  const int sign = take_sign(body);
  if (body == ".inf") {
    s.real = sign * std::numeric_limits<double>::infinity();
  } else if (body == ".nan") {
    s.real = std::numeric_limits<double>::quiet_NaN();
  } else if (body.find(':') != std::string::npos) {
    s.real = sign * sexagesimal(body);
  } else {
    s.real = sign * std::strtod(body.c_str(), nullptr);
  }
  return s;
}

Scalar resolve(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return {Kind::kNull, "null"};
  const std::string& text = node.Scalar();
  const std::string& tag = node.Tag();
  const bool quoted = tag == "!" || tag == "tag:yaml.org,2002:str";
  if (quoted) return {Kind::kStr, text};
  if (text.empty()) return {Kind::kNull, "null"};
  if (std::regex_match(text, bool_pattern())) {
    Scalar s{Kind::kBool, text};
    const char c = text[0];
    s.boolean = c == 'y' || c == 'Y' || c == 't' || c == 'T' || text == "on" || text == "On" ||
                text == "ON";
    return s;
  }
  if (std::regex_match(text, int_pattern())) return resolve_int(text);
  if (std::regex_match(text, float_pattern())) return resolve_float(text);
  return {Kind::kStr, text};
}

std::string strip(const std::string& s) {
  const char* space = " \t\n\r\f\v";
  const size_t first = s.find_first_not_of(space);
  if (first == std::string::npos) return "";
  return s.substr(first, s.find_last_not_of(space) - first + 1);
}

// pydantic's integer strings: digits with single underscores between them, optionally ".000".
bool parse_int_string(const std::string& raw, int64_t& out, bool& overflow) {
  static const std::regex re("[-+]?[0-9]+(?:_[0-9]+)*(?:\\.0+)?");
  const std::string s = strip(raw);
  if (!std::regex_match(s, re)) return false;
  std::string digits = without_underscores(s.substr(0, s.find('.')));
  const int sign = take_sign(digits);
  overflow = !accumulate(digits, 10, sign, out);
  return true;
}

// Python's float() syntax (underscores only between digits), as pydantic accepts it.
bool parse_float_string(const std::string& raw, double& out) {
  static const std::regex re(
      "[-+]?(?:(?:[0-9]+(?:_[0-9]+)*)?(?:\\.(?:[0-9]+(?:_[0-9]+)*)?)?(?:[eE][-+]?[0-9]+(?:_[0-9]+)*"
      ")?"
      "|inf|infinity|nan)",
      std::regex::icase);
  const std::string s = strip(raw);
  if (s.empty() || !std::regex_match(s, re)) return false;
  const std::string body = without_underscores(s);
  if (body.find_first_of("0123456789") == std::string::npos &&
      body.find_first_of("iInN") == std::string::npos) {
    return false;  // "+", ".", "e5"
  }
  char* end = nullptr;
  out = std::strtod(body.c_str(), &end);
  return end == body.c_str() + body.size();
}

[[noreturn]] void fail(const std::string& field, const std::string& expected,
                       const YAML::Node& node) {
  throw std::invalid_argument(field + ": expected " + expected + ", got " + describe(node));
}

}  // namespace

std::string join(const std::string& where, const std::string& field) {
  if (where.empty()) return field;
  if (!field.empty() && field[0] == '[') return where + field;
  return where + "." + field;
}

std::string describe(const YAML::Node& node) {
  if (!node.IsDefined()) return "nothing";
  switch (node.Type()) {
    case YAML::NodeType::Null:
      return "null";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a mapping";
    case YAML::NodeType::Scalar:
      return "'" + node.Scalar() + "'";
    default:
      return "nothing";
  }
}

bool is_null(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return true;
  return node.IsScalar() && resolve(node).kind == Kind::kNull;
}

int64_t to_int(const YAML::Node& node, const std::string& field) {
  const std::string expected = "an integer";
  if (node.IsDefined() && !node.IsScalar() && !node.IsNull()) fail(field, expected, node);
  const Scalar s = resolve(node);
  const auto out_of_range = [&] {
    throw std::invalid_argument(field + ": " + describe(node) +
                                " is out of the range of a 64-bit integer");
  };
  switch (s.kind) {
    case Kind::kBool:
      return s.boolean ? 1 : 0;
    case Kind::kInt:
      if (s.int_overflow) out_of_range();
      return s.integer;
    case Kind::kFloat:
      if (!std::isfinite(s.real) || s.real != std::floor(s.real)) {
        fail(field, "an integer (no fractional part, finite)", node);
      }
      if (std::abs(s.real) >= 9.2e18) out_of_range();
      return static_cast<int64_t>(s.real);
    case Kind::kStr: {
      int64_t value = 0;
      bool overflow = false;
      if (!parse_int_string(s.text, value, overflow)) fail(field, expected, node);
      if (overflow) out_of_range();
      return value;
    }
    case Kind::kNull:
      break;
  }
  fail(field, expected, node);
}

double to_float(const YAML::Node& node, const std::string& field) {
  const std::string expected = "a number";
  if (node.IsDefined() && !node.IsScalar() && !node.IsNull()) fail(field, expected, node);
  const Scalar s = resolve(node);
  switch (s.kind) {
    case Kind::kBool:
      return s.boolean ? 1.0 : 0.0;
    case Kind::kInt:
      if (s.int_overflow) return std::strtod(without_underscores(s.text).c_str(), nullptr);
      return static_cast<double>(s.integer);
    case Kind::kFloat:
      return s.real;
    case Kind::kStr: {
      double value = 0;
      if (!parse_float_string(s.text, value)) fail(field, expected, node);
      return value;
    }
    case Kind::kNull:
      break;
  }
  fail(field, expected, node);
}

bool to_bool(const YAML::Node& node, const std::string& field) {
  const std::string expected = "a boolean (true/false)";
  if (node.IsDefined() && !node.IsScalar() && !node.IsNull()) fail(field, expected, node);
  const Scalar s = resolve(node);
  switch (s.kind) {
    case Kind::kBool:
      return s.boolean;
    case Kind::kInt:
      if (!s.int_overflow && (s.integer == 0 || s.integer == 1)) return s.integer == 1;
      break;
    case Kind::kFloat:
      if (s.real == 0.0 || s.real == 1.0) return s.real == 1.0;
      break;
    case Kind::kStr: {
      std::string lower = s.text;
      std::transform(lower.begin(), lower.end(), lower.begin(),
                     [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      for (const char* t : {"1", "on", "t", "true", "y", "yes"}) {
        if (lower == t) return true;
      }
      for (const char* f : {"0", "off", "f", "false", "n", "no"}) {
        if (lower == f) return false;
      }
      break;
    }
    case Kind::kNull:
      break;
  }
  fail(field, expected, node);
}

std::string to_str(const YAML::Node& node, const std::string& field) {
  if (node.IsDefined() && node.IsScalar()) {
    const Scalar s = resolve(node);
    if (s.kind == Kind::kStr) return s.text;
  }
  fail(field, "a string", node);
}

std::vector<int64_t> to_int_list(const YAML::Node& node, const std::string& field) {
  if (!node.IsDefined() || !node.IsSequence()) fail(field, "a list of integers", node);
  std::vector<int64_t> values;
  values.reserve(node.size());
  for (size_t i = 0; i < node.size(); ++i) {
    values.push_back(to_int(node[i], field + "[" + std::to_string(i) + "]"));
  }
  return values;
}

}  // namespace mblm::runtime::yaml_value
