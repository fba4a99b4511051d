// Internal: a small, strict JSON parser (RFC 8259) for safetensors headers and adapter configs.
// Parses a whole document into a JsonValue tree; errors are InvalidArgument naming the byte
// offset where parsing failed and what was expected. Nesting is bounded (128 levels), so a
// hostile document (a header nested 200,000 levels deep) is an InvalidArgument, not a stack
// overflow.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace moelora::json {

enum class JsonType : uint8_t { kNull, kBool, kNumber, kString, kArray, kObject };

const char* json_type_name(JsonType type);

class JsonValue {
 public:
  JsonValue() = default;

  JsonType type() const { return type_; }
  bool is_null() const { return type_ == JsonType::kNull; }
  bool is_bool() const { return type_ == JsonType::kBool; }
  bool is_number() const { return type_ == JsonType::kNumber; }
  bool is_string() const { return type_ == JsonType::kString; }
  bool is_array() const { return type_ == JsonType::kArray; }
  bool is_object() const { return type_ == JsonType::kObject; }

  // Typed accessors throw InvalidArgument naming `what` when the value has another type.
  bool as_bool(const std::string& what = "value") const;
  double as_double(const std::string& what = "value") const;
  // Exact for integers written without fraction or exponent (safetensors offsets can exceed
  // 2^53); throws if the number is not an integer or does not fit in int64.
  int64_t as_int64(const std::string& what = "value") const;
  const std::string& as_string(const std::string& what = "value") const;
  const std::vector<JsonValue>& as_array(const std::string& what = "value") const;
  // Keys in document order are kept in `keys()`; lookups go through the map.
  const std::map<std::string, JsonValue>& as_object(const std::string& what = "value") const;
  const std::vector<std::string>& keys() const { return keys_; }

  bool contains(const std::string& key) const;
  // Member of an object; throws NotFound naming the key when absent.
  const JsonValue& at(const std::string& key) const;

  static JsonValue make_null() { return JsonValue(); }
  static JsonValue make_bool(bool b);
  static JsonValue make_number(double d, bool is_integer, int64_t integer);
  static JsonValue make_string(std::string s);
  static JsonValue make_array(std::vector<JsonValue> items);
  static JsonValue make_object(std::map<std::string, JsonValue> members,
                               std::vector<std::string> keys);

 private:
  JsonType type_ = JsonType::kNull;
  bool bool_ = false;
  double number_ = 0.0;
  bool is_integer_ = false;
  int64_t integer_ = 0;
  std::string string_;
  std::vector<JsonValue> array_;
  std::map<std::string, JsonValue> object_;
  std::vector<std::string> keys_;
};

// Parses one JSON document (surrounding whitespace allowed, nothing else after it). Duplicate
// object keys are refused. `source` names the document in error messages.
JsonValue parse_json(const std::string& text, const std::string& source = "json");

}  // namespace moelora::json
