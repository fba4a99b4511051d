// Bindings of the copy engines, safetensors headers and the adapter cache. Blocking calls
// release the GIL; the AdapterCache keeps its PagePool and CopyEngine Python objects alive.
#include <pybind11/stl.h>
#include <tuple>

#include "adapter_cache_internal.h"
#include "bindings/common.h"
#include "moelora/adapter_cache.h"
#include "moelora/copy_engine.h"
#include "moelora/safetensors.h"

namespace moelora::bindings {

namespace {

py::dict tensor_info_dict(const SafetensorInfo& info) {
  py::dict d;
  d["name"] = info.name;
  d["dtype"] = std::string(dtype_name(info.dtype));
  d["shape"] = info.shape;
  d["data_offset"] = info.data_offset;
  d["byte_length"] = info.byte_length;
  return d;
}

py::dict stats_dict(const AdapterCacheStats& s) {
  py::dict d;
  d["registered"] = s.registered;
  d["on_disk"] = s.on_disk;
  d["on_host"] = s.on_host;
  d["loading"] = s.loading;
  d["on_device"] = s.on_device;
  d["failed"] = s.failed;
  d["waiting_for_memory"] = s.waiting_for_memory;
  d["host_copies"] = s.host_copies;
  d["host_bytes"] = s.host_bytes;
  d["host_loads"] = s.host_loads;
  d["device_loads"] = s.device_loads;
  d["device_loads_streamed"] = s.device_loads_streamed;
  d["device_evictions"] = s.device_evictions;
  d["host_evictions"] = s.host_evictions;
  d["bytes_loaded"] = s.bytes_loaded;
  d["load_seconds"] = s.load_seconds;
  d["host_bytes_read"] = s.host_bytes_read;
  d["host_load_seconds"] = s.host_load_seconds;
  d["host_buffer_seconds"] = s.host_buffer_seconds;
  d["host_loads_failed"] = s.host_loads_failed;
  d["host_buffers_in_use"] = s.host_buffers_in_use;
  d["host_blocks_kept"] = s.host_blocks_kept;
  d["host_block_bytes_kept"] = s.host_block_bytes_kept;
  d["host_block_bytes_in_use"] = s.host_block_bytes_in_use;
  d["host_reserve_blocks_made"] = s.host_reserve_blocks_made;
  d["host_load_histogram"] = s.host_load_histogram;
  d["device_load_histogram"] = s.device_load_histogram;
  return d;
}

// GraphCaptureScope as a Python context manager (entered and left on the same thread).
struct CaptureScopeHandle {
  std::unique_ptr<GraphCaptureScope> scope;
};

}  // namespace

void register_adapter_cache(py::module_& m) {
  py::class_<CaptureScopeHandle>(m, "GraphCaptureScope",
                                 "with GraphCaptureScope(): capture a CUDA graph on this thread. "
                                 "Synchronising copy/adapter calls on this thread raise meanwhile, "
                                 "and pinned host frees wait for the capture's end.")
      .def(py::init<>())
      .def("__enter__",
           [](CaptureScopeHandle& h) -> CaptureScopeHandle& {
             if (h.scope) throw InvalidArgument("GraphCaptureScope entered twice");
             h.scope = std::make_unique<GraphCaptureScope>();
             return h;
           },
           py::return_value_policy::reference)
      .def("__exit__", [](CaptureScopeHandle& h, const py::args&) { h.scope.reset(); });
  m.def("this_thread_capturing", &this_thread_capturing,
        "Whether the calling thread holds a GraphCaptureScope.");

  py::class_<CopyEngine>(m, "CopyEngine")
      .def(
          "submit",
          [](CopyEngine& e, const std::vector<std::tuple<uintptr_t, uintptr_t, int64_t>>& regions) {
            std::vector<CopyRegion> native;
            for (const auto& [dst, src, bytes] : regions) {
              native.push_back({reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                                bytes});
            }
            return e.submit(std::move(native));
          },
          py::arg("regions"), "Queues [(dst_ptr, src_ptr, bytes), ...]; returns a ticket.")
      .def("is_done", &CopyEngine::is_done, py::arg("ticket"))
      .def("wait", &CopyEngine::wait, py::arg("ticket"), py::call_guard<py::gil_scoped_release>())
      .def(
          "make_stream_wait",
          [](CopyEngine& e, CopyTicket ticket, uintptr_t stream) {
            e.make_stream_wait(ticket, stream_from_int(stream));
          },
          py::arg("ticket"), py::arg("stream"), py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &CopyEngine::synchronize, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("device", [](const CopyEngine& e) {
        return e.device() == DeviceKind::kCUDA ? "cuda" : "cpu";
      });
  m.def("make_cpu_copy_engine", &make_cpu_copy_engine,
        "A copy engine running memcpy on a background thread.");
  m.def("make_cuda_copy_engine", &make_cuda_copy_engine, py::arg("device_index") = 0,
        py::arg("num_streams") = 2, "A copy engine on dedicated CUDA streams (CudaError without).");

  py::class_<HostBuffer>(m, "HostBuffer")
      .def(py::init<int64_t, bool>(), py::arg("bytes"), py::arg("try_pinned") = true)
      .def_property_readonly("data_ptr",
                             [](const HostBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); })
      .def_property_readonly("bytes", &HostBuffer::bytes)
      .def_property_readonly("pinned", &HostBuffer::pinned);

  py::class_<SafetensorsFile>(m, "SafetensorsFile")
      .def_static("open", &SafetensorsFile::open, py::arg("path"),
                  py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("path", &SafetensorsFile::path)
      .def_property_readonly("file_size", &SafetensorsFile::file_size)
      .def_property_readonly("metadata", &SafetensorsFile::metadata)
      .def("tensors",
           [](const SafetensorsFile& f) {
             py::list out;
             for (const SafetensorInfo& info : f.tensors()) out.append(tensor_info_dict(info));
             return out;
           })
      .def("tensor", [](const SafetensorsFile& f,
                        const std::string& name) { return tensor_info_dict(f.tensor(name)); })
      .def("__contains__", &SafetensorsFile::contains)
      .def(
          "read_tensor",
          [](const SafetensorsFile& f, const std::string& name) {
            std::string bytes(static_cast<size_t>(f.tensor(name).byte_length), '\0');
            {
              py::gil_scoped_release release;
              f.read_tensor(name, bytes.data());
            }
            return py::bytes(bytes);
          },
          py::arg("name"), "The tensor's raw bytes.");

  py::class_<LoraMatrixSource>(m, "LoraMatrixSource")
      .def(py::init([](int32_t site, int32_t layer, int32_t expert, bool is_b, int32_t file,
                       std::string tensor, int64_t offset, int64_t rows, int64_t cols,
                       int64_t row_stride, int64_t col_stride, float scale, int32_t experts,
                       int64_t expert_stride) {
             return LoraMatrixSource{site, layer, expert, is_b, file, std::move(tensor),
                                     offset, rows, cols, row_stride, col_stride, scale,
                                     experts, expert_stride};
           }),
           py::arg("site"), py::arg("layer"), py::arg("expert"), py::arg("is_b"),
           py::arg("file") = 0, py::arg("tensor") = "", py::arg("offset") = 0,
           py::arg("rows") = 0, py::arg("cols") = 0, py::arg("row_stride") = 0,
           py::arg("col_stride") = 1, py::arg("scale") = 1.0f, py::arg("experts") = 1,
           py::arg("expert_stride") = 0)
      .def_readwrite("site", &LoraMatrixSource::site)
      .def_readwrite("layer", &LoraMatrixSource::layer)
      .def_readwrite("expert", &LoraMatrixSource::expert)
      .def_readwrite("is_b", &LoraMatrixSource::is_b)
      .def_readwrite("file", &LoraMatrixSource::file)
      .def_readwrite("tensor", &LoraMatrixSource::tensor)
      .def_readwrite("offset", &LoraMatrixSource::offset)
      .def_readwrite("rows", &LoraMatrixSource::rows)
      .def_readwrite("cols", &LoraMatrixSource::cols)
      .def_readwrite("row_stride", &LoraMatrixSource::row_stride)
      .def_readwrite("col_stride", &LoraMatrixSource::col_stride)
      .def_readwrite("scale", &LoraMatrixSource::scale)
      .def_readwrite("experts", &LoraMatrixSource::experts)
      .def_readwrite("expert_stride", &LoraMatrixSource::expert_stride);
  // One LoraMatrixSource per tuple (site, layer, expert, is_b, file, tensor, offset, rows, cols,
  // row_stride, col_stride, scale, experts, expert_stride): an adapter has hundreds of sources,
  // and a keyword constructor call each cost more than the native registration itself.
  m.def(
      "lora_matrix_sources",
      [](const std::vector<std::tuple<int32_t, int32_t, int32_t, bool, int32_t, std::string,
                                      int64_t, int64_t, int64_t, int64_t, int64_t, float,
                                      int32_t, int64_t>>& rows) {
        std::vector<LoraMatrixSource> sources;
        sources.reserve(rows.size());
        for (const auto& r : rows) {
          sources.push_back(LoraMatrixSource{
              std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
              std::get<5>(r), std::get<6>(r), std::get<7>(r), std::get<8>(r), std::get<9>(r),
              std::get<10>(r), std::get<11>(r), std::get<12>(r), std::get<13>(r)});
        }
        return sources;
      },
      py::arg("rows"));

  py::class_<AdapterSpec>(m, "AdapterSpec")
      .def(py::init([](std::string name, std::vector<std::string> files, SiteRanks ranks,
                       std::vector<LoraMatrixSource> matrices) {
             return AdapterSpec{std::move(name), std::move(files), std::move(ranks),
                                std::move(matrices)};
           }),
           py::arg("name"), py::arg("files"), py::arg("ranks"), py::arg("matrices"))
      .def_readwrite("name", &AdapterSpec::name)
      .def_readwrite("files", &AdapterSpec::files)
      .def_readwrite("ranks", &AdapterSpec::ranks)
      .def_readwrite("matrices", &AdapterSpec::matrices);

  py::enum_<Residency>(m, "Residency")
      .value("DISK", Residency::kDisk)
      .value("HOST", Residency::kHost)
      .value("LOADING", Residency::kLoading)
      .value("DEVICE", Residency::kDevice)
      .value("FAILED", Residency::kFailed)
      .value("WAITING_FOR_MEMORY", Residency::kWaitingForMemory);

  using Release = py::call_guard<py::gil_scoped_release>;
  py::class_<AdapterCache>(m, "AdapterCache")
      .def(py::init([](PagePool& pool, CopyEngine& copies, std::vector<LoraSite> sites,
                       int32_t max_loras, int32_t max_lora_rank, int64_t max_cpu_loras,
                       int64_t max_cpu_bytes, const py::object& dtype, int32_t host_threads,
                       int32_t pack_threads, int64_t read_chunk_bytes, int64_t host_block_bytes,
                       int64_t host_reserve_bytes) {
             AdapterCacheConfig config{std::move(sites), max_loras,    max_lora_rank,
                                       max_cpu_loras,    max_cpu_bytes, dtype_from_object(dtype),
                                       host_threads,     pack_threads,  read_chunk_bytes,
                                       host_block_bytes, host_reserve_bytes};
             return std::make_unique<AdapterCache>(pool, copies, std::move(config));
           }),
           py::arg("pool"), py::arg("copies"), py::arg("sites"), py::arg("max_loras"),
           py::arg("max_lora_rank"), py::arg("max_cpu_loras") = 8, py::arg("max_cpu_bytes") = 0,
           py::arg("dtype") = "float32", py::arg("host_threads") = 4,
           py::arg("pack_threads") = 0, py::arg("read_chunk_bytes") = int64_t{1} << 20,
           py::arg("host_block_bytes") = int64_t{8} << 20, py::arg("host_reserve_bytes") = 0,
           py::keep_alive<1, 2>(),
           py::keep_alive<1, 3>())
      .def("register_adapter", &AdapterCache::register_adapter, py::arg("spec"), Release())
      .def("unregister", py::overload_cast<int64_t>(&AdapterCache::unregister), py::arg("id"),
           Release())
      .def("unregister", py::overload_cast<const std::string&>(&AdapterCache::unregister),
           py::arg("name"), Release())
      .def("id_of", &AdapterCache::id_of, py::arg("name"))
      .def("adapter_ids", &AdapterCache::adapter_ids)
      .def("load_host", &AdapterCache::load_host, py::arg("id"), Release())
      .def("prefetch", &AdapterCache::prefetch, py::arg("id"), py::arg("background") = false,
           Release())
      .def("prefetch_host", &AdapterCache::prefetch_host, py::arg("id"), Release())
      .def("set_demand", &AdapterCache::set_demand, py::arg("queued_adapters"),
           py::arg("background") = false, Release(),
           "The adapters queued requests wait for, most urgent first.")
      .def("wait", &AdapterCache::wait, py::arg("id"), Release())
      .def(
          "make_stream_wait",
          [](AdapterCache& c, int64_t id, uintptr_t stream) {
            c.make_stream_wait(id, stream_from_int(stream));
          },
          py::arg("id"), py::arg("stream"), Release())
      .def("acquire", &AdapterCache::acquire, py::arg("id"))
      .def("release", &AdapterCache::release, py::arg("id"))
      .def("touch", &AdapterCache::touch, py::arg("id"))
      .def("note_request", &AdapterCache::note_request, py::arg("id"))
      .def("residency", &AdapterCache::residency, py::arg("id"))
      .def("error_message", &AdapterCache::error_message, py::arg("id"))
      .def("slot_of", &AdapterCache::slot_of, py::arg("id"))
      .def("num_pages", &AdapterCache::num_pages, py::arg("id"))
      .def("site_view", &AdapterCache::site_view, py::arg("site_index"), py::arg("layer"))
      .def_property_readonly("max_loras", &AdapterCache::max_loras)
      .def("stats", [](const AdapterCache& c) { return stats_dict(c.stats()); })
      .def(
          "_set_read_hook",
          [](AdapterCache& c, py::object hook) {
            if (hook.is_none()) {
              detail::set_read_hook(c, nullptr);
              return;
            }
            // Called on a reader thread: takes the GIL; an exception fails the read. The last
            // copy of the hook may go on a reader thread too: it takes the GIL to drop it.
            std::shared_ptr<py::object> shared(new py::object(std::move(hook)), [](py::object* o) {
              py::gil_scoped_acquire gil;
              delete o;
            });
            detail::set_read_hook(c, [shared](const std::string& adapter, int32_t file,
                                              int64_t chunk) {
              py::gil_scoped_acquire gil;
              try {
                (*shared)(adapter, file, chunk);
              } catch (py::error_already_set& e) {
                throw IoError(e.what());
              }
            });
          },
          py::arg("hook"),
          "Tests only: hook(adapter, file_index, chunk_index) runs before each chunk is read; "
          "what it raises fails the read. Clear it (None) before dropping the cache.");
  m.attr("ADAPTER_LOAD_SECONDS_BUCKETS") = load_seconds_buckets();
}

}  // namespace moelora::bindings
