// Safetensors headers, the JSON parser behind them, and the half/bfloat16 conversions used when
// packing adapters. Every file here is real and written by the test.
#include <cmath>
#include <cstring>
#include <fstream>

#include "half_convert.h"
#include "json.h"
#include "moelora/error.h"
#include "moelora/safetensors.h"
#include "safetensors_writer.h"
#include "test_harness.h"

using namespace moelora;
using namespace moelora_test;

TEST_CASE("json parses nested documents, escapes and exact big integers") {
  auto v = json::parse_json(
      R"( {"a": [1, -2.5e3, true, false, null], "s": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00",
           "big": 9007199254740993, "o": {}} )");
  CHECK_EQ(v.at("a").as_array().size(), size_t{5});
  CHECK_EQ(v.at("a").as_array()[1].as_double(), -2500.0);
  CHECK(v.at("a").as_array()[4].is_null());
  CHECK_EQ(v.at("s").as_string(), std::string("x\"\\/\b\f\n\r\t\xc3\xa9\xf0\x9f\x98\x80"));
  CHECK_EQ(v.at("big").as_int64(), int64_t{9007199254740993});
  CHECK_EQ(v.keys().size(), size_t{4});
  CHECK_EQ(v.keys()[0], std::string("a"));
  CHECK_THROWS_AS(v.at("missing"), NotFound);
  CHECK_THROWS_AS(v.at("a").as_array()[1].as_int64(), InvalidArgument);
}

TEST_CASE("json refuses malformed input and says where") {
  const char* bad[] = {"",        "{",           "[1,]",        "{\"a\":1,}", "01",
                       "1.",      "\"\\x\"",     "\"a\nb\"",    "{\"a\" 1}",  "[1] 2",
                       "nul",     "{\"a\":1,\"a\":2}", "\"\\ud800\"", "-",  "{1:2}"};
  for (const char* text : bad) CHECK_THROWS_AS(json::parse_json(text), InvalidArgument);
  try {
    json::parse_json("[1, 2, x]", "doc");
    CHECK(false);
  } catch (const InvalidArgument& e) {
    CHECK(std::string(e.what()).find("doc: invalid JSON at byte 7") != std::string::npos);
  }
}

TEST_CASE("json bounds nesting: 200,000 levels are an InvalidArgument, 128 parse") {
  const size_t hostile = 200000;
  for (const char* open_close : {"[]", "{}"}) {
    std::string deep;
    for (size_t i = 0; i < hostile; ++i) {
      deep += open_close[0];
      if (open_close[0] == '{') deep += "\"a\":";
    }
    deep += "1";
    deep.append(hostile, open_close[1]);
    try {
      json::parse_json(deep, "deep");
      CHECK(false);
    } catch (const InvalidArgument& e) {
      CHECK(std::string(e.what()).find("nesting deeper than 128 levels") != std::string::npos);
    }
  }
  std::string ok = std::string(128, '[') + "0" + std::string(128, ']');
  auto v = json::parse_json(ok);
  for (int i = 0; i < 128; ++i) v = json::JsonValue(v.as_array()[0]);
  CHECK_EQ(v.as_int64(), int64_t{0});
  CHECK_THROWS_AS(json::parse_json("[" + ok + "]"), InvalidArgument);
}

TEST_CASE("safetensors: a header nested 200,000 levels deep is InvalidArgument") {
  std::string header = "{\"a\":";
  header.append(200000, '[');
  header.append(200000, ']');
  header += "}";
  std::string path = temp_path("deep.safetensors");
  write_raw_file(path, header, std::vector<uint8_t>(16, 0));
  try {
    SafetensorsFile::open(path);
    CHECK(false);
  } catch (const InvalidArgument& e) {
    CHECK(std::string(e.what()).find("nesting deeper than") != std::string::npos);
  }
  std::remove(path.c_str());
}

TEST_CASE("safetensors: a good file lists tensors and reads their bytes") {
  std::string path = temp_path("good.safetensors");
  std::vector<float> a(7 * 3);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i) - 5.0f;
  std::vector<uint16_t> b(5);
  for (size_t i = 0; i < b.size(); ++i) b[i] = detail::float_to_bfloat16_bits(1.5f * i);
  write_safetensors(path, {{"a", "F32", {7, 3}, as_bytes(a)},
                           {"b", "BF16", {5}, as_bytes(b)},
                           {"empty", "F16", {0, 4}, {}}});
  SafetensorsFile file = SafetensorsFile::open(path);
  CHECK_EQ(file.tensors().size(), size_t{3});
  CHECK_EQ(file.metadata().at("format"), std::string("pt"));
  const SafetensorInfo& info = file.tensor("a");
  CHECK(info.dtype == DType::kFloat32);
  CHECK_EQ(info.shape.size(), size_t{2});
  CHECK_EQ(info.byte_length, int64_t{84});
  std::vector<float> a_back(a.size(), -999.0f);
  file.read_tensor("a", a_back.data());
  CHECK(a_back == a);
  std::vector<uint16_t> b_back(b.size(), 0xFFFF);
  file.read_tensor("b", b_back.data());
  CHECK(b_back == b);
  float partial[2] = {-1, -1};
  file.read_tensor_bytes(info, 4 * 10, 8, partial);
  CHECK_EQ(partial[0], a[10]);
  CHECK_EQ(partial[1], a[11]);
  CHECK_THROWS_AS(file.tensor("nope"), NotFound);
  CHECK_THROWS_AS(file.read_tensor("nope", partial), NotFound);
  CHECK_THROWS_AS(file.read_tensor_bytes(info, 80, 8, partial), InvalidArgument);
  std::remove(path.c_str());
}

TEST_CASE("safetensors: missing and unreadable files are IoError") {
  CHECK_THROWS_AS(SafetensorsFile::open("/nonexistent/dir/x.safetensors"), IoError);
  CHECK_THROWS_AS(SafetensorsFile::open("/tmp"), IoError);
}

TEST_CASE("safetensors: corrupt headers are InvalidArgument") {
  std::vector<uint8_t> data(64, 1);
  auto expect_invalid = [&](const std::string& header, const std::vector<uint8_t>& bytes) {
    std::string path = temp_path("bad.safetensors");
    write_raw_file(path, header, bytes);
    CHECK_THROWS_AS(SafetensorsFile::open(path), InvalidArgument);
    std::remove(path.c_str());
  };
  expect_invalid("{not json", data);
  expect_invalid("[1,2]", data);
  // Overlapping tensors.
  expect_invalid(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                 R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                 data);
  // Shape and dtype disagree with the byte length.
  expect_invalid(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", data);
  // Unknown dtype, missing field, negative dim, reversed offsets, too many offsets.
  expect_invalid(R"({"a":{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}})", data);
  expect_invalid(R"({"a":{"dtype":"F32","shape":[4]}})", data);
  expect_invalid(R"({"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", data);
  expect_invalid(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}})", data);
  expect_invalid(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16,32]}})", data);
  // Offsets beyond the data section: a truncated file.
  expect_invalid(R"({"a":{"dtype":"F32","shape":[32],"data_offsets":[0,128]}})", data);
}

TEST_CASE("safetensors: truncated files") {
  std::string path = temp_path("trunc.safetensors");
  {
    std::ofstream f(path, std::ios::binary);
    f.write("\x10\x00\x00", 3);  // not even the 8-byte length
  }
  CHECK_THROWS_AS(SafetensorsFile::open(path), InvalidArgument);
  {
    std::ofstream f(path, std::ios::binary);
    const char len[8] = {static_cast<char>(200), 0, 0, 0, 0, 0, 0, 0};
    f.write(len, 8);
    f.write("{}", 2);  // header shorter than announced
  }
  CHECK_THROWS_AS(SafetensorsFile::open(path), InvalidArgument);
  // A file that shrinks after open: the read reports it.
  std::vector<float> a(1000, 2.0f);
  write_safetensors(path, {{"a", "F32", {1000}, as_bytes(a)}});
  SafetensorsFile file = SafetensorsFile::open(path);
  CHECK(::truncate(path.c_str(), 100) == 0);
  CHECK_THROWS_AS(file.read_tensor("a", a.data()), IoError);
  std::remove(path.c_str());
}

TEST_CASE("half conversions round to nearest even and keep specials") {
  using namespace detail;
  CHECK_EQ(float_to_half_bits(1.0f), uint16_t{0x3C00});
  CHECK_EQ(float_to_half_bits(-2.0f), uint16_t{0xC000});
  CHECK_EQ(float_to_half_bits(65504.0f), uint16_t{0x7BFF});
  CHECK_EQ(float_to_half_bits(65520.0f), uint16_t{0x7C00});  // ties up to inf
  CHECK_EQ(float_to_half_bits(std::ldexp(1.0f, -24)), uint16_t{0x0001});
  CHECK_EQ(float_to_half_bits(std::ldexp(1.0f, -25)), uint16_t{0x0000});  // tie to even (0)
  CHECK_EQ(float_to_half_bits(std::ldexp(3.0f, -25)), uint16_t{0x0002});  // tie to even (2)
  CHECK_EQ(float_to_half_bits(1.0f + std::ldexp(1.0f, -11)), uint16_t{0x3C00});  // tie, even
  CHECK_EQ(float_to_half_bits(1.0f + std::ldexp(3.0f, -11)), uint16_t{0x3C02});  // tie, up
  CHECK(std::isnan(half_bits_to_float(float_to_half_bits(NAN))));
  CHECK(std::isinf(half_bits_to_float(float_to_half_bits(INFINITY))));
  // Every finite half round-trips exactly through float.
  int mismatches = 0;
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    if ((bits & 0x7C00) == 0x7C00) continue;
    float f = half_bits_to_float(static_cast<uint16_t>(bits));
    if (float_to_half_bits(f) != bits) ++mismatches;
  }
  CHECK_EQ(mismatches, 0);
  CHECK_EQ(half_bits_to_float(0x0001), std::ldexp(1.0f, -24));
  CHECK_EQ(half_bits_to_float(0x03FF), std::ldexp(1023.0f, -24));
  // bfloat16: ties to even, NaN stays NaN.
  CHECK_EQ(float_to_bfloat16_bits(1.0f), uint16_t{0x3F80});
  CHECK_EQ(float_to_bfloat16_bits(1.0f + std::ldexp(1.0f, -8)), uint16_t{0x3F80});
  CHECK_EQ(float_to_bfloat16_bits(1.0f + std::ldexp(3.0f, -8)), uint16_t{0x3F82});
  CHECK(std::isnan(bfloat16_bits_to_float(float_to_bfloat16_bits(NAN))));
  for (uint32_t bits = 0; bits < 0x10000; bits += 7) {
    if ((bits & 0x7F80) == 0x7F80) continue;
    CHECK_EQ(float_to_bfloat16_bits(bfloat16_bits_to_float(static_cast<uint16_t>(bits))), bits);
  }
}

MOELORA_TEST_MAIN()
