// A minimal test harness for the native tests (no third-party framework needed in CI).
//   TEST_CASE(name) { CHECK(cond); CHECK_EQ(a, b); CHECK_THROWS_AS(expr, Type); }
//   int main() { return moelora_test::run_all(); }   // or MOELORA_TEST_MAIN()
// Each failing check prints file:line and the expression; run_all prints one line per test and
// a closing "N passed, N failed" line, and returns non-zero if anything failed. eventually(pred)
// waits for something another thread does, with a bound: a test that goes wrong fails its
// check instead of hanging.
#pragma once

#include <chrono>
#include <cstdio>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace moelora_test {

template <typename Pred>
bool eventually(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

struct TestCase {
  const char* name;
  std::function<void()> body;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

inline int& failures_in_current_test() {
  static int failures = 0;
  return failures;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> body) {
    registry().push_back({name, std::move(body)});
  }
};

inline void report_failure(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "  %s:%d: check failed: %s\n", file, line, what.c_str());
  ++failures_in_current_test();
}

inline int run_all() {
  int passed = 0, failed = 0;
  for (const auto& test : registry()) {
    failures_in_current_test() = 0;
    try {
      test.body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  unexpected exception: %s\n", e.what());
      ++failures_in_current_test();
    } catch (...) {
      std::fprintf(stderr, "  unexpected non-standard exception\n");
      ++failures_in_current_test();
    }
    if (failures_in_current_test() == 0) {
      ++passed;
      std::printf("[ ok ] %s\n", test.name);
    } else {
      ++failed;
      std::printf("[FAIL] %s\n", test.name);
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace moelora_test

#define MOELORA_TEST_CONCAT_(a, b) a##b
#define MOELORA_TEST_CONCAT(a, b) MOELORA_TEST_CONCAT_(a, b)
#define TEST_CASE(name)                                                              \
  static void MOELORA_TEST_CONCAT(test_fn_, __LINE__)();                             \
  static ::moelora_test::Registrar MOELORA_TEST_CONCAT(test_reg_, __LINE__)(         \
      name, &MOELORA_TEST_CONCAT(test_fn_, __LINE__));                               \
  static void MOELORA_TEST_CONCAT(test_fn_, __LINE__)()

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) ::moelora_test::report_failure(__FILE__, __LINE__, #cond); \
  } while (0)

#define CHECK_EQ(a, b)                                                                     \
  do {                                                                                     \
    auto&& check_a_ = (a);                                                                 \
    auto&& check_b_ = (b);                                                                 \
    if (!(check_a_ == check_b_)) {                                                         \
      std::ostringstream check_msg_;                                                       \
      check_msg_ << #a " == " #b " (" << check_a_ << " vs " << check_b_ << ")";            \
      ::moelora_test::report_failure(__FILE__, __LINE__, check_msg_.str());                \
    }                                                                                      \
  } while (0)

#define CHECK_THROWS_AS(expr, type)                                                        \
  do {                                                                                     \
    bool check_threw_ = false;                                                             \
    try {                                                                                  \
      (void)(expr);                                                                        \
    } catch (const type&) {                                                                \
      check_threw_ = true;                                                                 \
    } catch (...) {                                                                        \
    }                                                                                      \
    if (!check_threw_)                                                                     \
      ::moelora_test::report_failure(__FILE__, __LINE__, #expr " throws " #type);          \
  } while (0)

#define MOELORA_TEST_MAIN() \
  int main() { return ::moelora_test::run_all(); }
