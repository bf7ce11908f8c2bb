// A small strict JSON (RFC 8259) reader and string quoting, for safetensors headers.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mblm::runtime::json {

struct Value {
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  Type type = Type::kNull;
  bool boolean = false;
  std::string text;  // a string's value, or a number's literal
  std::vector<Value> items;
  std::vector<std::pair<std::string, Value>> members;  // in document order, duplicates kept

  bool is_object() const { return type == Type::kObject; }
  bool is_array() const { return type == Type::kArray; }
  bool is_string() const { return type == Type::kString; }
  // A number literal without fraction or exponent that fits int64_t.
  bool to_int64(int64_t& out) const;
  const char* type_name() const;  // "an object", "a string", ...
};

// Parses a whole document (surrounding whitespace allowed). Throws std::invalid_argument with the
// byte offset of the problem. Nesting is limited to `max_depth` levels.
Value parse(std::string_view text, int max_depth = 64);

// `s` as a JSON string literal (quotes, escapes of control characters, '"' and '\').
std::string quote(std::string_view s);

}  // namespace mblm::runtime::json
