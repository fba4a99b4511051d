// Reading an adapter's files for one load (each file opened once, its identity checked against
// registration before and after the read), and the host buffers kept for reuse.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "adapter_cache_internal.h"
#include "moelora/error.h"

namespace moelora::detail {

namespace {

[[noreturn]] void fail_file(const AdapterEntry& entry, size_t file, const std::string& what) {
  throw AdapterError(entry.name, "file '" + base_name(entry.files[file].path()) + "' " + what);
}

}  // namespace

OpenFiles::OpenFiles(const AdapterEntry& entry) {
  try {
    for (size_t i = 0; i < entry.files.size(); ++i) {
      const int fd = ::open(entry.files[i].path().c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        const int error = errno;
        if (error == ENOENT || error == ENOTDIR) {
          fail_file(entry, i, std::string("is gone since the adapter was registered (") +
                                  std::strerror(error) + "); reload the adapter");
        }
        fail_file(entry, i, std::string("cannot be opened (") + std::strerror(error) + ")");
      }
      fds_.push_back(fd);
      struct stat st {};
      if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        fail_file(entry, i, "is no longer a regular file; reload the adapter");
      }
      const FileStamp now = stamp_of_stat(&st);
      const FileStamp& then = entry.file_stamps[i];
      if (now.size < then.size) {
        fail_file(entry, i, "was truncated since the adapter was registered (" +
                                std::to_string(now.size) + " bytes, was " +
                                std::to_string(then.size) + "); reload the adapter");
      }
      if (now.size != then.size || now.mtime_ns != then.mtime_ns || now.inode != then.inode) {
        fail_file(entry, i, "changed since the adapter was registered; reload the adapter");
      }
    }
  } catch (...) {
    for (int fd : fds_) ::close(fd);
    throw;
  }
}

OpenFiles::~OpenFiles() {
  for (int fd : fds_) ::close(fd);
}

void OpenFiles::read(const AdapterEntry& entry, const ReadChunk& chunk, std::byte* dst) const {
  const int fd = fds_[chunk.file];
  int64_t offset = chunk.offset, left = chunk.bytes;
  while (left > 0) {
    const ssize_t n = ::pread(fd, dst, static_cast<size_t>(std::min<int64_t>(left, 1 << 30)),
                              offset);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_file(entry, chunk.file, std::string("cannot be read (") + std::strerror(errno) +
                                       " at byte " + std::to_string(offset) + ")");
    }
    if (n == 0) {
      fail_file(entry, chunk.file, "was truncated while it was read (end of file at byte " +
                                       std::to_string(offset) + "); reload the adapter");
    }
    dst += n;
    offset += n;
    left -= n;
  }
}

void OpenFiles::check_unchanged(const AdapterEntry& entry) const {
  for (size_t i = 0; i < fds_.size(); ++i) {
    struct stat st {};
    if (::fstat(fds_[i], &st) != 0) {
      fail_file(entry, i, std::string("cannot be checked (") + std::strerror(errno) + ")");
    }
    const FileStamp now = stamp_of_stat(&st);
    const FileStamp& then = entry.file_stamps[i];
    if (now.size != then.size || now.mtime_ns != then.mtime_ns) {
      fail_file(entry, i, "changed while it was read; reload the adapter");
    }
  }
}

}  // namespace moelora::detail
