// A recursive-descent JSON parser. Strict: no comments, no trailing commas, no NaN, no leading
// zeros, control characters must be escaped; depth is bounded so hostile headers cannot blow
// the stack.
#include "json.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "moelora/error.h"

namespace moelora::json {

const char* json_type_name(JsonType type) {
  switch (type) {
    case JsonType::kNull: return "null";
    case JsonType::kBool: return "bool";
    case JsonType::kNumber: return "number";
    case JsonType::kString: return "string";
    case JsonType::kArray: return "array";
    case JsonType::kObject: return "object";
  }
  return "?";
}

namespace {

[[noreturn]] void type_error(const std::string& what, const char* expected, JsonType got) {
  throw InvalidArgument(what + ": expected a JSON " + expected + ", got " + json_type_name(got));
}

constexpr int kMaxDepth = 128;

class Parser {
 public:
  Parser(const std::string& text, const std::string& source) : text_(text), source_(source) {}

  JsonValue parse_document() {
    skip_whitespace();
    JsonValue value = parse_value(0);
    skip_whitespace();
    if (pos_ != text_.size()) fail("unexpected characters after the JSON value");
    return value;
  }

 private:
  [[noreturn]] void fail(const std::string& problem) const {
    throw InvalidArgument(source_ + ": invalid JSON at byte " + std::to_string(pos_) + ": " +
                          problem);
  }

  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return at_end() ? '\0' : text_[pos_]; }

  void skip_whitespace() {
    while (!at_end()) {
      char c = text_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  void expect_literal(const char* literal) {
    for (const char* p = literal; *p; ++p, ++pos_) {
      if (peek() != *p) fail(std::string("expected '") + literal + "'");
    }
  }

  JsonValue parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth) + " levels");
    if (at_end()) fail("unexpected end of input, expected a value");
    char c = peek();
    switch (c) {
      case '{': return parse_object(depth);
      case '[': return parse_array(depth);
      case '"': return JsonValue::make_string(parse_string());
      case 't': expect_literal("true"); return JsonValue::make_bool(true);
      case 'f': expect_literal("false"); return JsonValue::make_bool(false);
      case 'n': expect_literal("null"); return JsonValue::make_null();
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
        fail(std::string("unexpected character '") + c + "', expected a value");
    }
  }

  JsonValue parse_object(int depth) {
    ++pos_;  // '{'
    std::map<std::string, JsonValue> members;
    std::vector<std::string> keys;
    skip_whitespace();
    if (peek() == '}') {
      ++pos_;
      return JsonValue::make_object(std::move(members), std::move(keys));
    }
    while (true) {
      skip_whitespace();
      if (peek() != '"') fail("expected a string key");
      size_t key_pos = pos_;
      std::string key = parse_string();
      skip_whitespace();
      if (peek() != ':') fail("expected ':' after key");
      ++pos_;
      skip_whitespace();
      JsonValue value = parse_value(depth + 1);
      if (!members.try_emplace(key, std::move(value)).second) {
        pos_ = key_pos;
        fail("duplicate key \"" + key + "\"");
      }
      keys.push_back(std::move(key));
      skip_whitespace();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return JsonValue::make_object(std::move(members), std::move(keys));
      }
      fail("expected ',' or '}' in object");
    }
  }

  JsonValue parse_array(int depth) {
    ++pos_;  // '['
    std::vector<JsonValue> items;
    skip_whitespace();
    if (peek() == ']') {
      ++pos_;
      return JsonValue::make_array(std::move(items));
    }
    while (true) {
      skip_whitespace();
      items.push_back(parse_value(depth + 1));
      skip_whitespace();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return JsonValue::make_array(std::move(items));
      }
      fail("expected ',' or ']' in array");
    }
  }

  uint32_t parse_hex4() {
    uint32_t code = 0;
    for (int i = 0; i < 4; ++i, ++pos_) {
      char c = peek();
      code <<= 4;
      if (c >= '0' && c <= '9') code |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') code |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') code |= static_cast<uint32_t>(c - 'A' + 10);
      else fail("expected 4 hex digits after \\u");
    }
    return code;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (at_end()) fail("unterminated string");
      char c = text_[pos_];
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("unescaped control character in string");
      if (c != '\\') {
        // The run of plain characters up to the next quote, escape or control character goes
        // in at once: tensor names in a safetensors header are tens of bytes each.
        size_t end = pos_ + 1;
        while (end < text_.size()) {
          const auto next = static_cast<unsigned char>(text_[end]);
          if (next == '"' || next == '\\' || next < 0x20) break;
          ++end;
        }
        out.append(text_, pos_, end - pos_);
        pos_ = end;
        continue;
      }
      ++pos_;
      if (at_end()) fail("unterminated escape");
      char e = text_[pos_++];
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': {
          uint32_t cp = parse_hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (peek() != '\\' || pos_ + 1 >= text_.size() || text_[pos_ + 1] != 'u') {
              fail("high surrogate not followed by a low surrogate");
            }
            pos_ += 2;
            uint32_t low = parse_hex4();
            if (low < 0xDC00 || low > 0xDFFF) fail("invalid low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("lone low surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default: --pos_; fail(std::string("invalid escape '\\") + e + "'");
      }
    }
  }

  JsonValue parse_number() {
    size_t start = pos_;
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
      if (peek() >= '0' && peek() <= '9') fail("leading zeros are not allowed");
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++pos_;
    } else {
      fail("expected digits");
    }
    bool is_integer = true;
    if (peek() == '.') {
      is_integer = false;
      ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) fail("expected digits after '.'");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    if (peek() == 'e' || peek() == 'E') {
      is_integer = false;
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (!(peek() >= '0' && peek() <= '9')) fail("expected digits in exponent");
      while (peek() >= '0' && peek() <= '9') ++pos_;
    }
    std::string literal = text_.substr(start, pos_ - start);
    double d = std::strtod(literal.c_str(), nullptr);
    int64_t integer = 0;
    if (is_integer) {
      errno = 0;
      long long v = std::strtoll(literal.c_str(), nullptr, 10);
      if (errno == ERANGE) is_integer = false;  // still a number, just not an exact int64
      integer = v;
    }
    return JsonValue::make_number(d, is_integer, integer);
  }

  const std::string& text_;
  const std::string& source_;
  size_t pos_ = 0;
};

}  // namespace

bool JsonValue::as_bool(const std::string& what) const {
  if (!is_bool()) type_error(what, "bool", type_);
  return bool_;
}

double JsonValue::as_double(const std::string& what) const {
  if (!is_number()) type_error(what, "number", type_);
  return number_;
}

int64_t JsonValue::as_int64(const std::string& what) const {
  if (!is_number()) type_error(what, "number", type_);
  if (!is_integer_) throw InvalidArgument(what + ": expected an integer that fits in int64");
  return integer_;
}

const std::string& JsonValue::as_string(const std::string& what) const {
  if (!is_string()) type_error(what, "string", type_);
  return string_;
}

const std::vector<JsonValue>& JsonValue::as_array(const std::string& what) const {
  if (!is_array()) type_error(what, "array", type_);
  return array_;
}

const std::map<std::string, JsonValue>& JsonValue::as_object(const std::string& what) const {
  if (!is_object()) type_error(what, "object", type_);
  return object_;
}

bool JsonValue::contains(const std::string& key) const {
  return is_object() && object_.count(key) > 0;
}

const JsonValue& JsonValue::at(const std::string& key) const {
  const auto& members = as_object("lookup of \"" + key + "\"");
  auto it = members.find(key);
  if (it == members.end()) throw NotFound("JSON object has no key \"" + key + "\"");
  return it->second;
}

JsonValue JsonValue::make_bool(bool b) {
  JsonValue v;
  v.type_ = JsonType::kBool;
  v.bool_ = b;
  return v;
}

JsonValue JsonValue::make_number(double d, bool is_integer, int64_t integer) {
  JsonValue v;
  v.type_ = JsonType::kNumber;
  v.number_ = d;
  v.is_integer_ = is_integer;
  v.integer_ = integer;
  return v;
}

JsonValue JsonValue::make_string(std::string s) {
  JsonValue v;
  v.type_ = JsonType::kString;
  v.string_ = std::move(s);
  return v;
}

JsonValue JsonValue::make_array(std::vector<JsonValue> items) {
  JsonValue v;
  v.type_ = JsonType::kArray;
  v.array_ = std::move(items);
  return v;
}

JsonValue JsonValue::make_object(std::map<std::string, JsonValue> members,
                                 std::vector<std::string> keys) {
  JsonValue v;
  v.type_ = JsonType::kObject;
  v.object_ = std::move(members);
  v.keys_ = std::move(keys);
  return v;
}

JsonValue parse_json(const std::string& text, const std::string& source) {
  return Parser(text, source).parse_document();
}

}  // namespace moelora::json
