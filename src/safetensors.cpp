// Safetensors header parsing and validation; tensor reads with pread so that several threads
// may read from one file without sharing a file position.
#include "moelora/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "json.h"
#include "moelora/error.h"

namespace moelora {

namespace {

// Headers of real checkpoints are at most a few MiB; anything huge is corrupt or hostile.
constexpr int64_t kMaxHeaderBytes = int64_t{100} << 20;

class FileDescriptor {
 public:
  explicit FileDescriptor(const std::string& path) : fd_(::open(path.c_str(), O_RDONLY)) {
    if (fd_ < 0) {
      throw IoError("cannot open '" + path + "': " + std::strerror(errno));
    }
  }
  ~FileDescriptor() { ::close(fd_); }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// Reads exactly `bytes` bytes at `offset`; a short read means the file is shorter than expected.
void pread_exact(int fd, void* dst, int64_t bytes, int64_t offset, const std::string& path,
                 const std::string& what) {
  auto* out = static_cast<char*>(dst);
  while (bytes > 0) {
    ssize_t n = ::pread(fd, out, static_cast<size_t>(std::min<int64_t>(bytes, 1 << 30)), offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw IoError("cannot read " + what + " of '" + path + "': " + std::strerror(errno));
    }
    if (n == 0) throw IoError("'" + path + "' is truncated: end of file while reading " + what);
    out += n;
    bytes -= n;
    offset += n;
  }
}

[[noreturn]] void corrupt(const std::string& path, const std::string& problem) {
  throw InvalidArgument("safetensors file '" + path + "': " + problem);
}

}  // namespace

int64_t SafetensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  FileDescriptor fd(path);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    throw IoError("cannot stat '" + path + "': " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) throw IoError("'" + path + "' is not a regular file");
  SafetensorsFile file;
  file.path_ = path;
  file.file_size_ = static_cast<int64_t>(st.st_size);
  if (file.file_size_ < 8) corrupt(path, "truncated: shorter than the 8-byte header length");

  unsigned char length_bytes[8];
  pread_exact(fd.get(), length_bytes, 8, 0, path, "the header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | length_bytes[i];
  if (header_len > static_cast<uint64_t>(kMaxHeaderBytes)) {
    corrupt(path, "header length " + std::to_string(header_len) + " is implausibly large");
  }
  if (static_cast<int64_t>(header_len) > file.file_size_ - 8) {
    corrupt(path, "truncated: header of " + std::to_string(header_len) + " bytes but the file has " +
                      std::to_string(file.file_size_) + " bytes");
  }
  std::string header(header_len, '\0');
  pread_exact(fd.get(), header.data(), static_cast<int64_t>(header_len), 8, path, "the header");

  const int64_t data_start = 8 + static_cast<int64_t>(header_len);
  const int64_t data_bytes = file.file_size_ - data_start;
  json::JsonValue root;
  try {
    root = json::parse_json(header, "safetensors header of '" + path + "'");
    if (!root.is_object()) corrupt(path, "header is not a JSON object");
    for (const std::string& name : root.keys()) {
      const json::JsonValue& entry = root.at(name);
      if (name == "__metadata__") {
        for (const auto& [key, value] : entry.as_object("__metadata__")) {
          file.metadata_[key] = value.as_string("__metadata__." + key);
        }
        continue;
      }
      // What an error names, built only for an error: a header holds hundreds of tensors.
      const auto what = [&name](const char* part = "") {
        return "tensor '" + name + "'" + part;
      };
      // `read` (a typed accessor taking the name it reports) tried first with a placeholder
      // name; only when that throws is it called again with the real one, which throws too.
      const auto typed = [&what](const char* part, const auto& read) {
        try {
          return read(std::string());
        } catch (const InvalidArgument&) {
          return read(what(part));
        }
      };
      typed("", [&entry](const std::string& w) { return &entry.as_object(w); });
      SafetensorInfo info;
      info.name = name;
      const json::JsonValue& dtype = entry.at("dtype");
      info.dtype = parse_dtype(
          typed(" dtype", [&dtype](const std::string& w) { return dtype.as_string(w); }));
      int64_t numel = 1;
      const json::JsonValue& shape = entry.at("shape");
      for (const auto& dim :
           *typed(" shape", [&shape](const std::string& w) { return &shape.as_array(w); })) {
        int64_t d = typed(" shape", [&dim](const std::string& w) { return dim.as_int64(w); });
        if (d < 0) corrupt(path, what(" has a negative dimension"));
        if (d != 0 && numel > (int64_t{1} << 50) / d) corrupt(path, what(" is too large"));
        numel *= d;
        info.shape.push_back(d);
      }
      const json::JsonValue& offsets_value = entry.at("data_offsets");
      const auto& offsets = *typed(" data_offsets", [&offsets_value](const std::string& w) {
        return &offsets_value.as_array(w);
      });
      if (offsets.size() != 2) corrupt(path, what(" data_offsets must have 2 entries"));
      const auto offset = [&typed](const json::JsonValue& v) {
        return typed(" data_offsets", [&v](const std::string& w) { return v.as_int64(w); });
      };
      int64_t begin = offset(offsets[0]);
      int64_t end = offset(offsets[1]);
      if (begin < 0 || end < begin) {
        corrupt(path, what(" has invalid data_offsets [") + std::to_string(begin) + ", " +
                          std::to_string(end) + "]");
      }
      if (end > data_bytes) {
        corrupt(path, "truncated: " + what(" ends at data byte ") + std::to_string(end) +
                          " but the data section has " + std::to_string(data_bytes) + " bytes");
      }
      int64_t expected = numel * static_cast<int64_t>(dtype_size(info.dtype));
      if (end - begin != expected) {
        corrupt(path, what(" has ") + std::to_string(end - begin) + " bytes but its shape and " +
                          "dtype need " + std::to_string(expected));
      }
      info.data_offset = data_start + begin;
      info.byte_length = end - begin;
      file.tensors_.push_back(std::move(info));
    }
  } catch (const NotFound& e) {
    corrupt(path, std::string("missing field: ") + e.what());
  } catch (const InvalidArgument& e) {
    std::string message = e.what();
    if (message.rfind("safetensors file", 0) == 0) throw;
    corrupt(path, message);
  }

  std::sort(file.tensors_.begin(), file.tensors_.end(),
            [](const SafetensorInfo& a, const SafetensorInfo& b) {
              return a.data_offset != b.data_offset ? a.data_offset < b.data_offset
                                                    : a.byte_length < b.byte_length;
            });
  for (size_t i = 1; i < file.tensors_.size(); ++i) {
    const SafetensorInfo& prev = file.tensors_[i - 1];
    const SafetensorInfo& cur = file.tensors_[i];
    // Zero-sized tensors occupy no bytes and cannot overlap anything.
    if (cur.byte_length > 0 && prev.data_offset + prev.byte_length > cur.data_offset) {
      corrupt(path, "tensors '" + prev.name + "' and '" + cur.name + "' overlap");
    }
  }
  for (size_t i = 0; i < file.tensors_.size(); ++i) file.index_[file.tensors_[i].name] = i;
  return file;
}

const SafetensorInfo& SafetensorsFile::tensor(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw NotFound("tensor '" + name + "' not found in '" + path_ + "'");
  return tensors_[it->second];
}

void SafetensorsFile::read_tensor(const std::string& name, void* dst) const {
  const SafetensorInfo& info = tensor(name);
  read_tensor_bytes(info, 0, info.byte_length, dst);
}

void SafetensorsFile::read_tensor_bytes(const SafetensorInfo& info, int64_t byte_offset,
                                        int64_t bytes, void* dst) const {
  if (byte_offset < 0 || bytes < 0 || byte_offset + bytes > info.byte_length) {
    throw InvalidArgument("read of bytes [" + std::to_string(byte_offset) + ", " +
                          std::to_string(byte_offset + bytes) + ") is outside tensor '" +
                          info.name + "' of " + std::to_string(info.byte_length) + " bytes");
  }
  if (bytes == 0) return;
  FileDescriptor fd(path_);
  pread_exact(fd.get(), dst, bytes, info.data_offset + byte_offset, path_,
              "tensor '" + info.name + "'");
}

}  // namespace moelora
