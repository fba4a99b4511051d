// Typed errors of libmoelora. Every failure reaches the caller as one of these, carrying what
// was wrong; the Python binding maps each to a Python exception of the same name.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace moelora {

enum class ErrorKind : uint8_t {
  kInvalidArgument,  // a caller passed something malformed (shape, dtype, range)
  kPoolExhausted,    // not enough free pages; the caller may evict, preempt or wait
  kAdapterError,     // an adapter is invalid or failed to load; names the adapter
  kNotFound,         // an id or name that does not exist
  kIoError,          // a file could not be read
  kCudaError,        // a CUDA runtime call failed
  kCancelled,        // an asynchronous operation was cancelled before it completed
  kInternal,         // an invariant of the library itself broke (a bug)
};

const char* error_kind_name(ErrorKind kind) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

class InvalidArgument : public Error {
 public:
  explicit InvalidArgument(const std::string& m) : Error(ErrorKind::kInvalidArgument, m) {}
};

// Not enough free pages. `requested` and `available` let the caller decide how much to free.
class PoolExhausted : public Error {
 public:
  PoolExhausted(const std::string& m, int64_t requested, int64_t available)
      : Error(ErrorKind::kPoolExhausted, m), requested_(requested), available_(available) {}
  int64_t requested() const noexcept { return requested_; }
  int64_t available() const noexcept { return available_; }

 private:
  int64_t requested_;
  int64_t available_;
};

// An adapter could not be registered or loaded. The message starts with the adapter's name.
class AdapterError : public Error {
 public:
  AdapterError(const std::string& adapter, const std::string& problem)
      : Error(ErrorKind::kAdapterError, "adapter '" + adapter + "': " + problem),
        adapter_(adapter) {}
  const std::string& adapter() const noexcept { return adapter_; }

 private:
  std::string adapter_;
};

class NotFound : public Error {
 public:
  explicit NotFound(const std::string& m) : Error(ErrorKind::kNotFound, m) {}
};

class IoError : public Error {
 public:
  explicit IoError(const std::string& m) : Error(ErrorKind::kIoError, m) {}
};

class CudaError : public Error {
 public:
  explicit CudaError(const std::string& m) : Error(ErrorKind::kCudaError, m) {}
};

class Cancelled : public Error {
 public:
  explicit Cancelled(const std::string& m) : Error(ErrorKind::kCancelled, m) {}
};

class InternalError : public Error {
 public:
  explicit InternalError(const std::string& m) : Error(ErrorKind::kInternal, m) {}
};

}  // namespace moelora

// Checks a caller-supplied condition; throws InvalidArgument with the message otherwise.
#define MOELORA_CHECK_ARG(cond, msg)                              \
  do {                                                            \
    if (!(cond)) throw ::moelora::InvalidArgument(std::string(msg)); \
  } while (0)
