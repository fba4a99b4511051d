// Reading safetensors files lazily: open() reads and validates only the header (8-byte
// little-endian length + JSON), so registering hundreds of adapters touches no weights;
// read_tensor() preads one tensor's bytes when they are needed.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "moelora/dtype.h"

namespace moelora {

struct SafetensorInfo {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  int64_t data_offset = 0;  // absolute byte offset of the first element in the file
  int64_t byte_length = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Throws IoError when the file cannot be opened or read, InvalidArgument when the header is
  // corrupt (bad JSON, unknown dtype, size mismatch, offsets outside the file or overlapping).
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  int64_t file_size() const { return file_size_; }
  // In file order (ascending data offset).
  const std::vector<SafetensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  // Throws NotFound naming the tensor and the file.
  const SafetensorInfo& tensor(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Reads the whole tensor into dst (byte_length bytes). Throws NotFound, or IoError when the
  // file has become unreadable or shorter than its header says.
  void read_tensor(const std::string& name, void* dst) const;
  // Reads `bytes` bytes starting `byte_offset` bytes into the tensor.
  void read_tensor_bytes(const SafetensorInfo& info, int64_t byte_offset, int64_t bytes,
                         void* dst) const;

 private:
  std::string path_;
  int64_t file_size_ = 0;
  std::vector<SafetensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moelora
