// Bindings of the plan (moelora/plan.h): DeviceProps, PlanOverrides, LoraPlan and AttentionPlan
// as Python classes whose fields read as ints, bools and the names to_string gives, and
// _C.plan_lora / _C.plan_attention. Overrides from keywords go through PlanOverrides::parse, the
// one parser of override values.
#include <optional>
#include <string>

#include "bindings/common.h"
#include "moelora/plan.h"

namespace moelora::bindings {

namespace {

template <typename E>
py::object name_or_none(const std::optional<E>& value) {
  if (!value) return py::none();
  return py::str(to_string(*value));
}

// "key=value," for a keyword given a value; nothing for None.
void add_override(std::string& text, const char* key, const py::object& value) {
  if (value.is_none()) return;
  std::string item;
  if (py::isinstance<py::bool_>(value)) {
    item = value.cast<bool>() ? "1" : "0";
  } else if (py::isinstance<py::int_>(value)) {
    item = std::to_string(value.cast<long long>());
  } else if (py::isinstance<py::str>(value)) {
    item = value.cast<std::string>();
  } else {
    throw InvalidArgument(std::string("plan override ") + key +
                          " must be a str, int or bool, got " +
                          py::str(py::type::of(value)).cast<std::string>());
  }
  text += std::string(key) + "=" + item + ",";
}

void register_overrides(py::module_& m) {
  py::class_<PlanOverrides>(m, "PlanOverrides")
      .def(py::init([](const py::object& form, const py::object& lora_kernel,
                       const py::object& block_m, const py::object& cluster_max,
                       const py::object& mma_split, const py::object& align_kernel,
                       const py::object& pdl, const py::object& attention_kernel,
                       const py::object& attention_splits, const py::object& prefill_attention) {
             std::string text;
             add_override(text, "form", form);
             add_override(text, "lora_kernel", lora_kernel);
             add_override(text, "block_m", block_m);
             add_override(text, "cluster_max", cluster_max);
             add_override(text, "mma_split", mma_split);
             add_override(text, "align_kernel", align_kernel);
             add_override(text, "pdl", pdl);
             add_override(text, "attention_kernel", attention_kernel);
             add_override(text, "attention_splits", attention_splits);
             add_override(text, "prefill_attention", prefill_attention);
             return PlanOverrides::parse(text);
           }),
           py::kw_only(), py::arg("form") = py::none(), py::arg("lora_kernel") = py::none(),
           py::arg("block_m") = py::none(), py::arg("cluster_max") = py::none(),
           py::arg("mma_split") = py::none(), py::arg("align_kernel") = py::none(),
           py::arg("pdl") = py::none(), py::arg("attention_kernel") = py::none(),
           py::arg("attention_splits") = py::none(), py::arg("prefill_attention") = py::none())
      .def_static("parse", &PlanOverrides::parse, py::arg("text"))
      .def_property_readonly("form", [](const PlanOverrides& o) { return name_or_none(o.form); })
      .def_property_readonly("lora_kernel",
                             [](const PlanOverrides& o) { return name_or_none(o.lora_kernel); })
      .def_readonly("block_m", &PlanOverrides::block_m)
      .def_readonly("cluster_max", &PlanOverrides::cluster_max)
      .def_readonly("mma_split", &PlanOverrides::mma_split)
      .def_property_readonly("align_kernel",
                             [](const PlanOverrides& o) { return name_or_none(o.align_kernel); })
      .def_property_readonly("pdl", [](const PlanOverrides& o) { return o.pdl; })
      .def_property_readonly("attention_kernel",
                             [](const PlanOverrides& o) {
                               return name_or_none(o.attention_kernel);
                             })
      .def_readonly("attention_splits", &PlanOverrides::attention_splits)
      .def_property_readonly("prefill_attention", [](const PlanOverrides& o) {
        return name_or_none(o.prefill_attention);
      })
      .def("__repr__",
           [](const PlanOverrides& o) { return "PlanOverrides(" + o.describe() + ")"; });
}

void register_plans(py::module_& m) {
  py::class_<LoraPlan>(m, "LoraPlan")
      .def_property_readonly("form", [](const LoraPlan& p) { return to_string(p.form); })
      .def_readonly("block_m", &LoraPlan::block_m)
      .def_property_readonly("align_kernel", [](const LoraPlan& p) { return to_string(p.align); })
      .def_property_readonly("lora_kernel", [](const LoraPlan& p) { return to_string(p.kernel); })
      .def_property_readonly("unaligned_kernel",
                             [](const LoraPlan& p) { return to_string(p.unaligned_kernel); })
      .def_readonly("pdl", &LoraPlan::pdl)
      .def_readonly("cluster_max", &LoraPlan::cluster_max)
      .def_readonly("mma_split", &LoraPlan::mma_split)
      .def("__repr__", &LoraPlan::describe);

  py::class_<AttentionPlan>(m, "AttentionPlan")
      .def_property_readonly("kernel", [](const AttentionPlan& p) { return to_string(p.kernel); })
      .def_readonly("splits", &AttentionPlan::splits)
      .def_property_readonly("prefill_attention",
                             [](const AttentionPlan& p) { return to_string(p.prefill); })
      .def("__repr__", &AttentionPlan::describe);

  m.def(
      "plan_lora",
      [](int64_t num_pairs, int32_t num_experts, int32_t num_adapters, bool dense,
         const py::object& dtype, const DeviceProps& device, const PlanOverrides& overrides) {
        LoraStep step;
        step.num_pairs = num_pairs;
        step.num_experts = num_experts;
        step.num_adapters = num_adapters;
        step.dense = dense;
        step.dtype = dtype_from_object(dtype);
        return plan_lora(step, device, overrides);
      },
      py::kw_only(), py::arg("num_pairs"), py::arg("num_experts"), py::arg("num_adapters"),
      py::arg("dense"), py::arg("dtype"), py::arg("device"), py::arg("overrides"));

  m.def(
      "plan_attention",
      [](int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int64_t page_bytes,
         int64_t max_context, const py::object& dtype, const DeviceProps& device,
         const PlanOverrides& overrides) {
        AttentionStep step;
        step.num_heads = num_heads;
        step.num_kv_heads = num_kv_heads;
        step.head_dim = head_dim;
        step.page_bytes = page_bytes;
        step.max_context = max_context;
        step.dtype = dtype_from_object(dtype);
        return plan_attention(step, device, overrides);
      },
      py::kw_only(), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
      py::arg("page_bytes"), py::arg("max_context"), py::arg("dtype"), py::arg("device"),
      py::arg("overrides"));
}

}  // namespace

void register_plan(py::module_& m) {
  py::class_<DeviceProps>(m, "DeviceProps")
      .def(py::init([](bool cuda, int32_t sm_count, int32_t cc_major, bool cooperative_launch) {
             DeviceProps p;
             p.kind = cuda ? DeviceKind::kCUDA : DeviceKind::kCPU;
             p.sm_count = sm_count;
             p.cc_major = cc_major;
             p.cooperative_launch = cooperative_launch;
             return p;
           }),
           py::kw_only(), py::arg("cuda"), py::arg("sm_count") = 0, py::arg("cc_major") = 0,
           py::arg("cooperative_launch") = false)
      .def_property_readonly("cuda",
                             [](const DeviceProps& p) { return p.kind == DeviceKind::kCUDA; })
      .def_readonly("sm_count", &DeviceProps::sm_count)
      .def_readonly("cc_major", &DeviceProps::cc_major)
      .def_readonly("cooperative_launch", &DeviceProps::cooperative_launch)
      .def("__repr__", [](const DeviceProps& p) {
        return std::string("DeviceProps(cuda=") + (p.kind == DeviceKind::kCUDA ? "True" : "False") +
               ", sm_count=" + std::to_string(p.sm_count) +
               ", cc_major=" + std::to_string(p.cc_major) +
               ", cooperative_launch=" + (p.cooperative_launch ? "True" : "False") + ")";
      });
  m.def(
      "device_props",
      [](bool cuda, int index) {
        return device_props(cuda ? DeviceKind::kCUDA : DeviceKind::kCPU, index);
      },
      py::arg("cuda"), py::arg("index") = 0);
  register_overrides(m);
  register_plans(m);
}

}  // namespace moelora::bindings
