// The unified page pool. Bookkeeping is sized once at construction: a per-page owner array and
// a free stack of page ids hold every page; owner records live in two maps (KV and adapter ids
// are separate namespaces). Unpinned adapters that hold pages sit in an ordered set keyed by
// their last-use tick, so eviction walks them least recently used first.
#include "moelora/page_pool.h"

#include <algorithm>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "moelora/error.h"

namespace moelora {
namespace {

const char* kind_name(OwnerKind kind) { return kind == OwnerKind::kKv ? "kv" : "adapter"; }

std::string describe(Owner owner) {
  return std::string(kind_name(owner.kind)) + " " + std::to_string(owner.id);
}

// Which owner holds a page; kind is meaningless while free.
struct PageSlot {
  bool allocated = false;
  OwnerKind kind = OwnerKind::kKv;
  uint64_t id = 0;
};

struct OwnerRecord {
  std::vector<PageId> pages;
  int64_t pin_count = 0;
  int64_t used_bytes = 0;
  uint64_t last_use = 0;  // LRU tick; adapters only
};

using LruKey = std::pair<uint64_t, uint64_t>;  // (last_use tick, adapter id)

}  // namespace

struct PagePool::State {
  std::unique_ptr<Arena> arena;
  int64_t page_bytes = 0;
  int64_t num_pages = 0;

  mutable std::mutex mutex;
  std::vector<PageSlot> page_owner;  // [num_pages]
  std::vector<PageId> free_stack;    // capacity num_pages; back is allocated next
  std::unordered_map<uint64_t, OwnerRecord> kv;
  std::unordered_map<uint64_t, OwnerRecord> adapters;
  std::set<LruKey> evictable;  // unpinned adapters holding at least one page
  uint64_t tick = 0;

  int64_t kv_pages = 0;
  int64_t adapter_pages = 0;
  int64_t pinned_adapter_pages = 0;
  int64_t used_bytes = 0;
  int64_t evictions = 0;
  std::vector<EvictionListener> listeners;

  std::unordered_map<uint64_t, OwnerRecord>& records(OwnerKind kind) {
    return kind == OwnerKind::kKv ? kv : adapters;
  }
  const std::unordered_map<uint64_t, OwnerRecord>& records(OwnerKind kind) const {
    return kind == OwnerKind::kKv ? kv : adapters;
  }
  OwnerRecord* find(Owner owner) {
    auto& map = records(owner.kind);
    auto it = map.find(owner.id);
    return it == map.end() ? nullptr : &it->second;
  }
  const OwnerRecord* find(Owner owner) const {
    const auto& map = records(owner.kind);
    auto it = map.find(owner.id);
    return it == map.end() ? nullptr : &it->second;
  }

  static bool is_evictable(Owner owner, const OwnerRecord& record) {
    return owner.kind == OwnerKind::kAdapter && record.pin_count == 0 && !record.pages.empty();
  }
  // Every change to an adapter's pins, pages or tick goes through these two so that the
  // evictable set always mirrors the records.
  void leave_lru(Owner owner, const OwnerRecord& record) {
    if (is_evictable(owner, record)) evictable.erase({record.last_use, owner.id});
  }
  void enter_lru(Owner owner, const OwnerRecord& record) {
    if (is_evictable(owner, record)) evictable.insert({record.last_use, owner.id});
  }

  void add_page_count(Owner owner, const OwnerRecord& record, int64_t delta) {
    if (owner.kind == OwnerKind::kKv) {
      kv_pages += delta;
    } else {
      adapter_pages += delta;
      if (record.pin_count > 0) pinned_adapter_pages += delta;
    }
  }

  void release_page(PageId page) {
    page_owner[page] = PageSlot{};
    free_stack.push_back(page);
  }

  // Frees every page of the owner and erases its record. The caller holds the mutex.
  void erase_owner(Owner owner) {
    auto& map = records(owner.kind);
    auto it = map.find(owner.id);
    if (it == map.end()) return;
    OwnerRecord& record = it->second;
    leave_lru(owner, record);
    add_page_count(owner, record, -static_cast<int64_t>(record.pages.size()));
    used_bytes -= record.used_bytes;
    // Pushed in reverse so that the owner's first page is the next one handed out again.
    for (auto page = record.pages.rbegin(); page != record.pages.rend(); ++page) {
      release_page(*page);
    }
    map.erase(it);
  }
};

PagePool::PagePool(std::unique_ptr<Arena> arena, int64_t page_bytes)
    : state_(std::make_unique<State>()) {
  if (!arena) throw InvalidArgument("PagePool: arena must not be null");
  if (page_bytes <= 0 || page_bytes % 256 != 0) {
    throw InvalidArgument("PagePool: page_bytes must be a positive multiple of 256, got " +
                          std::to_string(page_bytes));
  }
  if (reinterpret_cast<uintptr_t>(arena->base()) % 16 != 0) {
    throw InvalidArgument("PagePool: the arena's base must be 16-byte aligned");
  }
  const int64_t num_pages = arena->bytes() / page_bytes;
  if (num_pages < 1) {
    throw InvalidArgument("PagePool: the arena (" + std::to_string(arena->bytes()) +
                          " bytes) holds no page of " + std::to_string(page_bytes) + " bytes");
  }
  if (num_pages > INT32_MAX) {
    throw InvalidArgument("PagePool: " + std::to_string(num_pages) +
                          " pages exceed the PageId range; use larger pages");
  }
  State& s = *state_;
  s.arena = std::move(arena);
  s.page_bytes = page_bytes;
  s.num_pages = num_pages;
  s.page_owner.assign(static_cast<size_t>(num_pages), PageSlot{});
  s.free_stack.reserve(static_cast<size_t>(num_pages));
  for (int64_t page = num_pages - 1; page >= 0; --page) {
    s.free_stack.push_back(static_cast<PageId>(page));
  }
}

PagePool::~PagePool() = default;

int64_t PagePool::page_bytes() const { return state_->page_bytes; }
int64_t PagePool::num_pages() const { return state_->num_pages; }
const Arena& PagePool::arena() const { return *state_->arena; }

std::byte* PagePool::page_address(PageId page) const {
  if (page < 0 || page >= state_->num_pages) {
    throw InvalidArgument("page_address: page " + std::to_string(page) + " is out of range [0, " +
                          std::to_string(state_->num_pages) + ")");
  }
  return state_->arena->base() + static_cast<int64_t>(page) * state_->page_bytes;
}

AllocationOutcome PagePool::try_allocate(Owner owner, int64_t n, Eviction eviction) {
  if (n < 0) {
    throw InvalidArgument("try_allocate: n must be >= 0 for " + describe(owner) + ", got " +
                          std::to_string(n));
  }
  AllocationOutcome outcome;
  std::vector<EvictionListener> listeners;
  {
    State& s = *state_;
    std::lock_guard<std::mutex> lock(s.mutex);
    const int64_t free_count = static_cast<int64_t>(s.free_stack.size());
    std::vector<uint64_t> victims;
    if (free_count < n) {
      int64_t reachable = free_count;
      if (eviction == Eviction::kIdleAdapters) {
        // Decide first, evict after: nothing is evicted unless the whole request can be met.
        for (const LruKey& key : s.evictable) {
          if (reachable >= n) break;
          if (owner.kind == OwnerKind::kAdapter && key.second == owner.id) continue;
          reachable += static_cast<int64_t>(s.adapters.at(key.second).pages.size());
          victims.push_back(key.second);
        }
      }
      if (reachable < n) {
        outcome.shortfall = n - reachable;
        return outcome;
      }
      for (uint64_t victim : victims) {
        s.erase_owner(adapter_owner(victim));
        outcome.evicted.push_back(adapter_owner(victim));
      }
      s.evictions += static_cast<int64_t>(victims.size());
    }
    OwnerRecord& record = s.records(owner.kind)[owner.id];
    s.leave_lru(owner, record);
    if (owner.kind == OwnerKind::kAdapter) record.last_use = ++s.tick;
    outcome.pages.reserve(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const PageId page = s.free_stack.back();
      s.free_stack.pop_back();
      s.page_owner[page] = PageSlot{true, owner.kind, owner.id};
      record.pages.push_back(page);
      outcome.pages.push_back(page);
    }
    s.add_page_count(owner, record, n);
    s.enter_lru(owner, record);
    outcome.ok = true;
    if (!outcome.evicted.empty()) listeners = s.listeners;
  }
  // Outside the lock: a listener may call back into the pool.
  for (const Owner& evicted : outcome.evicted) {
    for (const auto& listener : listeners) listener(evicted);
  }
  return outcome;
}

std::vector<PageId> PagePool::allocate(Owner owner, int64_t n, Eviction eviction) {
  AllocationOutcome outcome = try_allocate(owner, n, eviction);
  if (!outcome.ok) {
    const int64_t available = n - outcome.shortfall;
    throw PoolExhausted("page pool exhausted: " + describe(owner) + " asked for " +
                            std::to_string(n) + " pages, " + std::to_string(available) +
                            " could be found (" + std::to_string(outcome.shortfall) + " short)",
                        n, available);
  }
  return std::move(outcome.pages);
}

void PagePool::free(Owner owner) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->erase_owner(owner);
}

void PagePool::free_pages(Owner owner, const std::vector<PageId>& pages) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  OwnerRecord* record = s.find(owner);
  if (record == nullptr) {
    throw InvalidArgument("free_pages: " + describe(owner) + " owns no pages");
  }
  // Validate everything before changing anything.
  std::unordered_set<PageId> to_free;
  to_free.reserve(pages.size());
  for (PageId page : pages) {
    const bool in_range = page >= 0 && page < s.num_pages;
    const PageSlot* slot = in_range ? &s.page_owner[page] : nullptr;
    if (slot == nullptr || !slot->allocated || slot->kind != owner.kind || slot->id != owner.id) {
      throw InvalidArgument("free_pages: page " + std::to_string(page) + " is not owned by " +
                            describe(owner));
    }
    if (!to_free.insert(page).second) {
      throw InvalidArgument("free_pages: page " + std::to_string(page) + " is listed twice");
    }
  }
  s.leave_lru(owner, *record);
  auto kept = std::remove_if(record->pages.begin(), record->pages.end(),
                             [&](PageId page) { return to_free.count(page) != 0; });
  record->pages.erase(kept, record->pages.end());
  for (PageId page : pages) s.release_page(page);
  s.add_page_count(owner, *record, -static_cast<int64_t>(pages.size()));
  // Fewer pages cannot hold more bytes than before: clamp what the owner reported.
  const int64_t capacity = static_cast<int64_t>(record->pages.size()) * s.page_bytes;
  if (record->used_bytes > capacity) {
    s.used_bytes -= record->used_bytes - capacity;
    record->used_bytes = capacity;
  }
  s.enter_lru(owner, *record);
}

void PagePool::pin(Owner owner) {
  if (owner.kind != OwnerKind::kAdapter) {
    throw InvalidArgument("pin: only adapters can be pinned (KV pages are never evicted), got " +
                          describe(owner));
  }
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  // A pin of an unknown adapter creates its record: an adapter is pinned before it loads.
  OwnerRecord& record = s.adapters[owner.id];
  s.leave_lru(owner, record);
  if (record.pin_count == 0) s.pinned_adapter_pages += static_cast<int64_t>(record.pages.size());
  ++record.pin_count;
  record.last_use = ++s.tick;
}

void PagePool::unpin(Owner owner) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  OwnerRecord* record = s.find(owner);
  if (record == nullptr || record->pin_count == 0) {
    throw InvalidArgument("unpin: " + describe(owner) + " is not pinned");
  }
  --record->pin_count;
  if (record->pin_count == 0) {
    s.pinned_adapter_pages -= static_cast<int64_t>(record->pages.size());
  }
  // The moment the last request stops using an adapter counts as its last use.
  record->last_use = ++s.tick;
  s.enter_lru(owner, *record);
}

void PagePool::touch(Owner owner) {
  if (owner.kind != OwnerKind::kAdapter) return;  // KV owners have no LRU order
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  OwnerRecord* record = s.find(owner);
  if (record == nullptr) return;  // evicted meanwhile: nothing to order
  s.leave_lru(owner, *record);
  record->last_use = ++s.tick;
  s.enter_lru(owner, *record);
}

void PagePool::set_used_bytes(Owner owner, int64_t bytes) {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  OwnerRecord* record = s.find(owner);
  if (record == nullptr) throw NotFound("set_used_bytes: unknown owner " + describe(owner));
  const int64_t capacity = static_cast<int64_t>(record->pages.size()) * s.page_bytes;
  if (bytes < 0 || bytes > capacity) {
    throw InvalidArgument("set_used_bytes: " + std::to_string(bytes) + " bytes for " +
                          describe(owner) + " is outside [0, " + std::to_string(capacity) +
                          "] (its pages' bytes)");
  }
  s.used_bytes += bytes - record->used_bytes;
  record->used_bytes = bytes;
}

bool PagePool::contains(Owner owner) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->find(owner) != nullptr;
}

bool PagePool::is_pinned(Owner owner) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  const OwnerRecord* record = state_->find(owner);
  return record != nullptr && record->pin_count > 0;
}

std::vector<PageId> PagePool::pages_of(Owner owner) const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  const OwnerRecord* record = state_->find(owner);
  return record == nullptr ? std::vector<PageId>{} : record->pages;
}

int64_t PagePool::free_pages() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return static_cast<int64_t>(state_->free_stack.size());
}

PoolStats PagePool::stats() const {
  const State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  PoolStats stats;
  stats.page_bytes = s.page_bytes;
  stats.total_pages = s.num_pages;
  stats.free_pages = static_cast<int64_t>(s.free_stack.size());
  stats.kv_pages = s.kv_pages;
  stats.adapter_pages = s.adapter_pages;
  stats.pinned_adapter_pages = s.pinned_adapter_pages;
  stats.kv_owners = static_cast<int64_t>(s.kv.size());
  stats.adapter_owners = static_cast<int64_t>(s.adapters.size());
  stats.used_bytes = s.used_bytes;
  stats.waste_bytes = (s.kv_pages + s.adapter_pages) * s.page_bytes - s.used_bytes;
  stats.evictions = s.evictions;
  return stats;
}

void PagePool::add_eviction_listener(EvictionListener listener) {
  if (!listener) throw InvalidArgument("add_eviction_listener: listener must not be empty");
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->listeners.push_back(std::move(listener));
}

}  // namespace moelora

namespace moelora {

void PagePool::check_invariants() const {
  const State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  auto fail = [](const std::string& what) { throw InternalError("PagePool invariant: " + what); };

  // Every page is either on the free stack exactly once or in exactly one owner's list, and the
  // per-page owner array agrees with both.
  std::vector<uint8_t> seen(static_cast<size_t>(s.num_pages), 0);
  for (PageId page : s.free_stack) {
    if (page < 0 || page >= s.num_pages) fail("free page " + std::to_string(page) + " in range");
    if (seen[page]++) fail("page " + std::to_string(page) + " is on the free stack twice");
    if (s.page_owner[page].allocated) fail("free page " + std::to_string(page) + " has an owner");
  }
  int64_t kv_pages = 0, adapter_pages = 0, pinned_pages = 0, used_bytes = 0;
  std::set<LruKey> expected_lru;
  for (OwnerKind kind : {OwnerKind::kKv, OwnerKind::kAdapter}) {
    for (const auto& [id, record] : s.records(kind)) {
      const Owner owner{kind, id};
      for (PageId page : record.pages) {
        if (page < 0 || page >= s.num_pages) fail(describe(owner) + " holds an out-of-range page");
        if (seen[page]++) fail("page " + std::to_string(page) + " is held twice");
        const PageSlot& slot = s.page_owner[page];
        if (!slot.allocated || slot.kind != kind || slot.id != id) {
          fail("page " + std::to_string(page) + " is listed by " + describe(owner) +
               " but the owner array disagrees");
        }
      }
      const int64_t count = static_cast<int64_t>(record.pages.size());
      if (record.pin_count < 0) fail(describe(owner) + " has a negative pin count");
      if (kind == OwnerKind::kKv && record.pin_count != 0) fail(describe(owner) + " is pinned");
      if (record.used_bytes < 0 || record.used_bytes > count * s.page_bytes) {
        fail(describe(owner) + " reports more used bytes than its pages hold");
      }
      used_bytes += record.used_bytes;
      if (kind == OwnerKind::kKv) {
        kv_pages += count;
      } else {
        adapter_pages += count;
        if (record.pin_count > 0) pinned_pages += count;
        if (State::is_evictable(owner, record)) expected_lru.insert({record.last_use, id});
        if (record.last_use > s.tick) fail(describe(owner) + " has a tick from the future");
      }
    }
  }
  for (int64_t page = 0; page < s.num_pages; ++page) {
    if (!seen[page]) fail("page " + std::to_string(page) + " is neither free nor owned");
  }
  if (kv_pages != s.kv_pages) fail("kv page count");
  if (adapter_pages != s.adapter_pages) fail("adapter page count");
  if (pinned_pages != s.pinned_adapter_pages) fail("pinned adapter page count");
  if (used_bytes != s.used_bytes) fail("used bytes total");
  if (kv_pages + adapter_pages + static_cast<int64_t>(s.free_stack.size()) != s.num_pages) {
    fail("owned + free pages != total pages");
  }
  if (expected_lru != s.evictable) fail("the LRU set differs from the unpinned adapters");
}

}  // namespace moelora
