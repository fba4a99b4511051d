// Python bindings of the page pool, arenas and row layouts. Owners cross as (kind, id) with kind
// an OwnerKind or its name ("kv", "adapter"). Pool calls release the GIL: copy threads contend.
#include <pybind11/functional.h>

#include <memory>
#include <string>

#include "bindings/common.h"
#include "moelora/arena.h"
#include "moelora/page_pool.h"
#include "moelora/row_layout.h"

namespace moelora::bindings {
namespace {

OwnerKind to_owner_kind(const py::object& kind) {
  if (py::isinstance<OwnerKind>(kind)) return kind.cast<OwnerKind>();
  if (py::isinstance<py::str>(kind)) {
    const auto name = kind.cast<std::string>();
    if (name == "kv") return OwnerKind::kKv;
    if (name == "adapter") return OwnerKind::kAdapter;
  }
  throw InvalidArgument("owner kind must be OwnerKind or 'kv' / 'adapter', got " +
                        py::repr(kind).cast<std::string>());
}

Owner to_owner(const py::object& kind, uint64_t id) { return {to_owner_kind(kind), id}; }

py::tuple owner_tuple(Owner owner) { return py::make_tuple(owner.kind, owner.id); }

DeviceKind to_device_kind(const std::string& device) {
  if (device == "cpu") return DeviceKind::kCPU;
  if (device == "cuda") return DeviceKind::kCUDA;
  throw InvalidArgument("device must be 'cpu' or 'cuda', got '" + device + "'");
}

// A Python listener may be copied and destroyed on threads that do not hold the GIL; the
// function object is shared and only ever touched with the GIL held.
PagePool::EvictionListener wrap_listener(py::function callback) {
  std::shared_ptr<py::function> shared(new py::function(std::move(callback)),
                                       [](py::function* f) {
                                         py::gil_scoped_acquire gil;
                                         delete f;
                                       });
  return [shared](Owner owner) {
    py::gil_scoped_acquire gil;
    try {
      (*shared)(owner.kind, owner.id);
    } catch (py::error_already_set& e) {
      // The eviction already happened; a failing listener must not undo an allocation.
      e.discard_as_unraisable("moelora PagePool eviction listener");
    }
  };
}

py::dict stats_dict(const PoolStats& s) {
  py::dict d;
  d["page_bytes"] = s.page_bytes;
  d["total_pages"] = s.total_pages;
  d["free_pages"] = s.free_pages;
  d["kv_pages"] = s.kv_pages;
  d["adapter_pages"] = s.adapter_pages;
  d["pinned_adapter_pages"] = s.pinned_adapter_pages;
  d["kv_owners"] = s.kv_owners;
  d["adapter_owners"] = s.adapter_owners;
  d["used_bytes"] = s.used_bytes;
  d["waste_bytes"] = s.waste_bytes;
  d["evictions"] = s.evictions;
  return d;
}

Eviction to_eviction(bool evict) { return evict ? Eviction::kIdleAdapters : Eviction::kNone; }

void register_page_pool(py::module_& m) {
  py::enum_<OwnerKind>(m, "OwnerKind").value("kv", OwnerKind::kKv).value("adapter",
                                                                         OwnerKind::kAdapter);

  py::class_<AllocationOutcome>(m, "AllocationOutcome")
      .def_readonly("ok", &AllocationOutcome::ok)
      .def_readonly("pages", &AllocationOutcome::pages)
      .def_readonly("shortfall", &AllocationOutcome::shortfall)
      .def_property_readonly("evicted",
                             [](const AllocationOutcome& o) {
                               py::list evicted;
                               for (const Owner& owner : o.evicted) {
                                 evicted.append(owner_tuple(owner));
                               }
                               return evicted;
                             })
      .def("__bool__", [](const AllocationOutcome& o) { return o.ok; })
      .def("__repr__", [](const AllocationOutcome& o) {
        return "AllocationOutcome(ok=" + std::string(o.ok ? "True" : "False") +
               ", pages=" + std::to_string(o.pages.size()) + ", evicted=" +
               std::to_string(o.evicted.size()) + ", shortfall=" + std::to_string(o.shortfall) +
               ")";
      });

  py::class_<PagePool>(m, "PagePool", py::dynamic_attr())
      .def(py::init([](int64_t bytes, int64_t page_bytes, const std::string& device,
                       int device_index, bool pinned) {
             auto arena = to_device_kind(device) == DeviceKind::kCUDA
                              ? make_cuda_arena(bytes, device_index)
                              : make_host_arena(bytes, pinned);
             return std::make_unique<PagePool>(std::move(arena), page_bytes);
           }),
           py::arg("bytes"), py::arg("page_bytes"), py::arg("device") = "cpu",
           py::arg("device_index") = 0, py::arg("pinned") = false,
           "A pool over a new arena of `bytes` bytes on `device` ('cpu' or 'cuda').")
      .def_static(
          "from_external",
          [](uintptr_t ptr, int64_t bytes, int64_t page_bytes, const std::string& device,
             int device_index, py::object keep_alive) {
            auto arena = make_external_arena(reinterpret_cast<void*>(ptr), bytes,
                                             to_device_kind(device), device_index);
            py::object pool = py::cast(std::make_unique<PagePool>(std::move(arena), page_bytes));
            // The pool does not own the memory: keep its Python owner (e.g. a tensor) alive.
            pool.attr("_external_memory") = keep_alive;
            return pool;
          },
          py::arg("ptr"), py::arg("bytes"), py::arg("page_bytes"), py::arg("device") = "cpu",
          py::arg("device_index") = 0, py::arg("keep_alive") = py::none(),
          "A pool over memory allocated elsewhere (e.g. a torch tensor passed as keep_alive).")
      .def(
          "try_allocate",
          [](PagePool& p, const py::object& kind, uint64_t id, int64_t n, bool evict) {
            const Owner owner = to_owner(kind, id);
            py::gil_scoped_release release;
            return p.try_allocate(owner, n, to_eviction(evict));
          },
          py::arg("kind"), py::arg("id"), py::arg("n"), py::arg("evict") = false)
      .def(
          "allocate",
          [](PagePool& p, const py::object& kind, uint64_t id, int64_t n, bool evict) {
            const Owner owner = to_owner(kind, id);
            py::gil_scoped_release release;
            return p.allocate(owner, n, to_eviction(evict));
          },
          py::arg("kind"), py::arg("id"), py::arg("n"), py::arg("evict") = false)
      .def(
          "free",
          [](PagePool& p, const py::object& kind, uint64_t id) {
            const Owner owner = to_owner(kind, id);
            py::gil_scoped_release release;
            p.free(owner);
          },
          py::arg("kind"), py::arg("id"))
      .def(
          "free_pages",
          [](PagePool& p, const py::object& kind, uint64_t id, const std::vector<PageId>& pages) {
            const Owner owner = to_owner(kind, id);
            py::gil_scoped_release release;
            p.free_pages(owner, pages);
          },
          py::arg("kind"), py::arg("id"), py::arg("pages"))
      .def(
          "pin",
          [](PagePool& p, const py::object& kind, uint64_t id) {
            const Owner owner = to_owner(kind, id);
            py::gil_scoped_release release;
            p.pin(owner);
          },
          py::arg("kind"), py::arg("id"))
      .def(
          "unpin",
          [](PagePool& p, const py::object& kind, uint64_t id) {
            const Owner owner = to_owner(kind, id);
            py::gil_scoped_release release;
            p.unpin(owner);
          },
          py::arg("kind"), py::arg("id"))
      .def(
          "touch",
          [](PagePool& p, const py::object& kind, uint64_t id) {
            const Owner owner = to_owner(kind, id);
            py::gil_scoped_release release;
            p.touch(owner);
          },
          py::arg("kind"), py::arg("id"))
      .def(
          "set_used_bytes",
          [](PagePool& p, const py::object& kind, uint64_t id, int64_t bytes) {
            const Owner owner = to_owner(kind, id);
            py::gil_scoped_release release;
            p.set_used_bytes(owner, bytes);
          },
          py::arg("kind"), py::arg("id"), py::arg("bytes"))
      .def(
          "contains",
          [](PagePool& p, const py::object& kind, uint64_t id) {
            const Owner owner = to_owner(kind, id);
            py::gil_scoped_release release;
            return p.contains(owner);
          },
          py::arg("kind"), py::arg("id"))
      .def(
          "is_pinned",
          [](PagePool& p, const py::object& kind, uint64_t id) {
            const Owner owner = to_owner(kind, id);
            py::gil_scoped_release release;
            return p.is_pinned(owner);
          },
          py::arg("kind"), py::arg("id"))
      .def(
          "pages_of",
          [](PagePool& p, const py::object& kind, uint64_t id) {
            const Owner owner = to_owner(kind, id);
            py::gil_scoped_release release;
            return p.pages_of(owner);
          },
          py::arg("kind"), py::arg("id"))
      .def(
          "free_pages_count", [](const PagePool& p) { return p.free_pages(); },
          py::call_guard<py::gil_scoped_release>())
      .def("stats", [](PagePool& p) {
        PoolStats s;
        {
          py::gil_scoped_release release;
          s = p.stats();
        }
        return stats_dict(s);
      })
      .def("check_invariants", &PagePool::check_invariants,
           py::call_guard<py::gil_scoped_release>())
      .def("add_eviction_listener",
           [](PagePool& p, py::function callback) {
             p.add_eviction_listener(wrap_listener(std::move(callback)));
           },
           py::arg("callback"), "callback(kind, id) runs once per evicted adapter.")
      .def("page_address",
           [](const PagePool& p, PageId page) {
             return reinterpret_cast<uintptr_t>(p.page_address(page));
           },
           py::arg("page"))
      .def_property_readonly("page_bytes", &PagePool::page_bytes)
      .def_property_readonly("num_pages", &PagePool::num_pages)
      .def_property_readonly("arena_ptr",
                             [](const PagePool& p) {
                               return reinterpret_cast<uintptr_t>(p.arena().base());
                             })
      .def_property_readonly("arena_bytes", [](const PagePool& p) { return p.arena().bytes(); })
      .def_property_readonly("device",
                             [](const PagePool& p) {
                               return p.arena().device() == DeviceKind::kCUDA ? "cuda" : "cpu";
                             })
      .def_property_readonly("device_index",
                             [](const PagePool& p) { return p.arena().device_index(); });

  m.def("cuda_arena_bytes_for_fraction", &cuda_arena_bytes_for_fraction, py::arg("fraction"),
        py::arg("device_index") = 0);
}

void register_row_layouts(py::module_& m) {
  py::class_<LoraSite>(m, "LoraSite")
      .def(py::init([](std::string name, int32_t num_layers, int32_t num_experts, int64_t in_dim,
                       int64_t out_dim) {
             return LoraSite{std::move(name), num_layers, num_experts, in_dim, out_dim};
           }),
           py::kw_only(), py::arg("name"), py::arg("num_layers"), py::arg("num_experts") = 1,
           py::arg("in_dim"), py::arg("out_dim"))
      .def_readwrite("name", &LoraSite::name)
      .def_readwrite("num_layers", &LoraSite::num_layers)
      .def_readwrite("num_experts", &LoraSite::num_experts)
      .def_readwrite("in_dim", &LoraSite::in_dim)
      .def_readwrite("out_dim", &LoraSite::out_dim)
      .def("__repr__", [](const LoraSite& s) {
        return "LoraSite(name='" + s.name + "', num_layers=" + std::to_string(s.num_layers) +
               ", num_experts=" + std::to_string(s.num_experts) + ", in_dim=" +
               std::to_string(s.in_dim) + ", out_dim=" + std::to_string(s.out_dim) + ")";
      });

  py::class_<AdapterRowLayout>(m, "AdapterRowLayout")
      .def(py::init([](const std::vector<LoraSite>& sites, const SiteRanks& ranks,
                       const py::object& dtype, int64_t page_bytes, int32_t max_rank) {
             return AdapterRowLayout(sites, ranks, dtype_from_object(dtype), page_bytes, max_rank);
           }),
           py::arg("sites"), py::arg("ranks"), py::arg("dtype"), py::arg("page_bytes"),
           py::arg("max_rank"))
      .def_property_readonly("num_pages", &AdapterRowLayout::num_pages)
      .def_property_readonly("used_bytes", &AdapterRowLayout::used_bytes)
      .def_property_readonly("page_bytes", &AdapterRowLayout::page_bytes)
      .def_property_readonly("ranks", &AdapterRowLayout::ranks)
      .def("rank", &AdapterRowLayout::rank, py::arg("site"), py::arg("layer"))
      .def("row_offset", &AdapterRowLayout::row_offset, py::arg("site"), py::arg("layer"),
           py::arg("expert"), py::arg("is_b"), py::arg("row"))
      .def(
          "layer_row_offsets",
          [](const AdapterRowLayout& layout, int site, int layer, int num_experts) {
            // Every row of one (site, layer) in [expert][A, B][rank] order, in one call.
            std::vector<int64_t> offsets;
            const int rank = layout.rank(site, layer);
            for (int expert = 0; expert < num_experts; ++expert) {
              for (bool is_b : {false, true}) {
                for (int row = 0; row < rank; ++row) {
                  offsets.push_back(layout.row_offset(site, layer, expert, is_b, row));
                }
              }
            }
            return offsets;
          },
          py::arg("site"), py::arg("layer"), py::arg("num_experts"));

  py::class_<RowTableLayout>(m, "RowTableLayout")
      .def(py::init<const std::vector<LoraSite>&, int32_t>(), py::arg("sites"),
           py::arg("max_rank"))
      .def_property_readonly("entries_per_slot", &RowTableLayout::entries_per_slot)
      .def_property_readonly("rank_entries_per_slot", &RowTableLayout::rank_entries_per_slot)
      .def_property_readonly("max_rank", &RowTableLayout::max_rank)
      .def_property_readonly("sites", &RowTableLayout::sites)
      .def("row_base", &RowTableLayout::row_base, py::arg("site"), py::arg("layer"))
      .def("row_index", &RowTableLayout::row_index, py::arg("site"), py::arg("layer"),
           py::arg("expert"), py::arg("is_b"), py::arg("row"))
      .def("rank_index", &RowTableLayout::rank_index, py::arg("site"), py::arg("layer"))
      .def("site_index", &RowTableLayout::site_index, py::arg("name"));

  m.def("lora_row_bytes",
        [](int64_t dim, const py::object& dtype) { return lora_row_bytes(dim, dtype_from_object(dtype)); },
        py::arg("dim"), py::arg("dtype"));
}

}  // namespace

void register_pool(py::module_& m) {
  register_page_pool(m);
  register_row_layouts(m);
}

}  // namespace moelora::bindings
