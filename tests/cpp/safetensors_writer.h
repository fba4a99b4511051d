// Test helper: writes real safetensors files (and deliberately broken ones) to a temp dir.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace moelora_test {

struct TensorToWrite {
  std::string name;
  std::string dtype;  // "F32", "BF16", "F16"
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

inline std::string temp_path(const std::string& stem) {
  static int counter = 0;
  return "/tmp/moelora_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++) +
         "_" + stem;
}

inline void write_raw_file(const std::string& path, const std::string& header,
                           const std::vector<uint8_t>& data) {
  FILE* f = std::fopen(path.c_str(), "wb");
  uint64_t n = header.size();
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  std::fwrite(len, 1, 8, f);
  std::fwrite(header.data(), 1, header.size(), f);
  if (!data.empty()) std::fwrite(data.data(), 1, data.size(), f);
  std::fclose(f);
}

// A correct file: tensors laid out in order, metadata included.
inline void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  std::vector<uint8_t> data;
  for (const auto& t : tensors) {
    header += ",\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":[";
    for (size_t i = 0; i < t.shape.size(); ++i) {
      header += (i ? "," : "") + std::to_string(t.shape[i]);
    }
    header += "],\"data_offsets\":[" + std::to_string(data.size()) + "," +
              std::to_string(data.size() + t.bytes.size()) + "]}";
    data.insert(data.end(), t.bytes.begin(), t.bytes.end());
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  write_raw_file(path, header, data);
}

template <typename T>
std::vector<uint8_t> as_bytes(const std::vector<T>& values) {
  std::vector<uint8_t> out(values.size() * sizeof(T));
  std::memcpy(out.data(), values.data(), out.size());
  return out;
}

}  // namespace moelora_test
