// The unified page pool: one arena, fixed-size pages, shared by KV-cache blocks and adapter
// weights, so memory flows to whichever the workload needs.
//
// Policy in one place:
//  - every page has exactly one owner (a request's KV, an adapter) or is free;
//  - adapter owners can be pinned (requests are using them); pins nest;
//  - when an allocation cannot be met from free pages and eviction is allowed, unpinned
//    adapters are evicted whole, least recently used first; KV pages are never evicted (the
//    scheduler preempts requests instead);
//  - exhaustion is an ordinary outcome: try_allocate() reports it, allocate() throws
//    PoolExhausted; nothing is half-allocated either way.
// Thread-safe: every method takes the pool's mutex. Eviction listeners run after the mutex is
// released, on the thread that triggered the eviction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "moelora/arena.h"

namespace moelora {

using PageId = int32_t;

enum class OwnerKind : uint8_t { kKv = 0, kAdapter = 1 };

struct Owner {
  OwnerKind kind = OwnerKind::kKv;
  uint64_t id = 0;
  bool operator==(const Owner& o) const { return kind == o.kind && id == o.id; }
  bool operator!=(const Owner& o) const { return !(*this == o); }
};
inline Owner kv_owner(uint64_t request_id) { return {OwnerKind::kKv, request_id}; }
inline Owner adapter_owner(uint64_t adapter_id) { return {OwnerKind::kAdapter, adapter_id}; }

enum class Eviction : uint8_t {
  kNone = 0,          // use free pages only
  kIdleAdapters = 1,  // evict unpinned adapters, LRU first, when free pages do not suffice
};

struct AllocationOutcome {
  bool ok = false;
  std::vector<PageId> pages;    // the new pages when ok, in allocation order
  std::vector<Owner> evicted;   // adapters evicted to make room (also when !ok: none are)
  int64_t shortfall = 0;        // when !ok: pages that could not be found
};

struct PoolStats {
  int64_t page_bytes = 0;
  int64_t total_pages = 0;
  int64_t free_pages = 0;
  int64_t kv_pages = 0;
  int64_t adapter_pages = 0;
  int64_t pinned_adapter_pages = 0;
  int64_t kv_owners = 0;
  int64_t adapter_owners = 0;
  // Bytes owners reported using (set_used_bytes) vs the bytes of their pages: the difference
  // is internal waste (partly filled pages).
  int64_t used_bytes = 0;
  int64_t waste_bytes = 0;
  int64_t evictions = 0;  // adapters evicted since creation
};

class PagePool {
 public:
  // page_bytes must be a positive multiple of 256; the arena must hold at least one page.
  PagePool(std::unique_ptr<Arena> arena, int64_t page_bytes);
  ~PagePool();
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  int64_t page_bytes() const;
  int64_t num_pages() const;
  const Arena& arena() const;
  std::byte* page_address(PageId page) const;

  // Adds n pages to `owner` (creating it if new). Never partial: either all n or none.
  AllocationOutcome try_allocate(Owner owner, int64_t n, Eviction eviction = Eviction::kNone);
  // As try_allocate, but throws PoolExhausted when the pages cannot be found.
  std::vector<PageId> allocate(Owner owner, int64_t n, Eviction eviction = Eviction::kNone);
  // Frees every page of `owner` and forgets it (its pins too). Unknown owners are a no-op.
  void free(Owner owner);
  // Frees some pages of `owner`; throws InvalidArgument if one is not owned by it.
  void free_pages(Owner owner, const std::vector<PageId>& pages);

  // Pins nest: an adapter is evictable only when every pin was released.
  void pin(Owner owner);
  void unpin(Owner owner);
  // Marks an adapter as just used, for LRU order.
  void touch(Owner owner);
  void set_used_bytes(Owner owner, int64_t bytes);

  bool contains(Owner owner) const;
  bool is_pinned(Owner owner) const;
  std::vector<PageId> pages_of(Owner owner) const;
  int64_t free_pages() const;
  PoolStats stats() const;

  // Called once per adapter evicted by try_allocate/allocate (after the pool's mutex is
  // released). The adapter cache uses it to mark the adapter not resident.
  using EvictionListener = std::function<void(Owner)>;
  void add_eviction_listener(EvictionListener listener);

  // Verifies the bookkeeping (each page owned once, free list and owner lists agree, counts
  // add up); throws InternalError naming the broken invariant. For tests.
  void check_invariants() const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace moelora
