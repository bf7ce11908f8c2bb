// mblm._C.RuntimeModel: the C++ runtime's model (csrc/runtime/model.h) over a Python MBLM's
// config and state_dict tensors (referenced, not copied), for the cached decoding of
// MBLM.generate (mblm/model/runtime_decoding.py). The config arrives as
// MBLMModelConfig.model_dump(): the runtime's yaml-cpp reader is not part of this module.
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // casters of torch.Tensor and torch.Generator

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "model.h"

namespace py = pybind11;
namespace rt = mblm::runtime;

namespace {

template <typename T>
const char* python_type() {
  if constexpr (std::is_same_v<T, bool>) return "a bool";
  if constexpr (std::is_same_v<T, int64_t>) return "an int";
  if constexpr (std::is_same_v<T, std::string>) return "a str";
  if constexpr (std::is_same_v<T, std::vector<int64_t>>) return "a list of ints";
  return "a list of dicts";
}

// The field `key` of a config dict as T; throws std::invalid_argument naming it ("config.block[1]
// .d_state") when it is missing or of another type.
template <typename T>
T field(const py::dict& d, const char* key, const std::string& where) {
  const std::string name = where + "." + key;
  if (!d.contains(key)) throw std::invalid_argument(name + ": field required");
  const py::handle value = d[key];
  try {
    return value.cast<T>();
  } catch (const py::cast_error&) {
    throw std::invalid_argument(name + ": expected " + python_type<T>() + ", got " +
                                py::repr(value).cast<std::string>());
  }
}

template <typename T>
T field_or(const py::dict& d, const char* key, const std::string& where, T fallback) {
  return d.contains(key) && !d[key].is_none() ? field<T>(d, key, where) : fallback;
}

rt::PosEmbType pos_emb_type(const py::dict& block, const std::string& where) {
  const auto name = field_or<std::string>(block, "pos_emb_type", where, "");
  if (name.empty()) return rt::PosEmbType::kNone;
  if (name == "fixed") return rt::PosEmbType::kFixed;
  if (name == "rope") return rt::PosEmbType::kRope;
  throw std::invalid_argument(where + ".pos_emb_type: expected None, 'fixed' or 'rope', got '" +
                              name + "'");
}

// A causal MBLM stage: block_type 'transformer', 'mamba1' or 'mamba2'.
rt::StageBlockConfig stage_block(const py::dict& block, const std::string& where) {
  rt::StageBlockConfig out;
  out.block_type = field<std::string>(block, "block_type", where);
  out.pos_emb_type = pos_emb_type(block, where);
  if (out.block_type == "transformer") {
    rt::TransformerBlockConfig t;
    t.attn_head_dims = field<int64_t>(block, "attn_head_dims", where);
    t.attn_num_heads = field<int64_t>(block, "attn_num_heads", where);
    t.attn_use_rot_embs = field<bool>(block, "attn_use_rot_embs", where);
    t.ff_multiplier = field<int64_t>(block, "ff_multiplier", where);
    t.use_flash_attn = field_or<bool>(block, "use_flash_attn", where, false);
    out.block = t;
  } else if (out.block_type == "mamba1" || out.block_type == "mamba2") {
    rt::MambaBlockConfig m;
    m.d_state = field<int64_t>(block, "d_state", where);
    m.d_conv = field<int64_t>(block, "d_conv", where);
    m.expand = field<int64_t>(block, "expand", where);
    m.headdim = field<int64_t>(block, "headdim", where);
    m.mamba1 = out.block_type == "mamba1";
    out.block = m;
  } else {
    throw std::invalid_argument(where + ".block_type: the runtime decodes 'transformer', " +
                                "'mamba1' and 'mamba2' stages, got '" + out.block_type + "'");
  }
  return out;
}

rt::ModelConfig model_config(const py::dict& config) {
  const std::string where = "config";
  rt::ModelConfig c;
  c.num_tokens = field<int64_t>(config, "num_tokens", where);
  c.pad_token_id = field<int64_t>(config, "pad_token_id", where);
  c.hidden_dims = field<std::vector<int64_t>>(config, "hidden_dims", where);
  c.num_layers = field<std::vector<int64_t>>(config, "num_layers", where);
  c.seq_lens = field<std::vector<int64_t>>(config, "seq_lens", where);
  if (!config.contains("block")) throw std::invalid_argument(where + ".block: field required");
  const py::handle block = config["block"];
  if (py::isinstance<py::dict>(block)) {
    c.blocks.assign(c.hidden_dims.size(), stage_block(block.cast<py::dict>(), where + ".block"));
  } else {
    const auto blocks = field<std::vector<py::dict>>(config, "block", where);
    for (size_t k = 0; k < blocks.size(); ++k) {
      c.blocks.push_back(stage_block(blocks[k], where + ".block[" + std::to_string(k) + "]"));
    }
  }
  return c;
}

rt::Model make_model(const py::dict& config, std::map<std::string, at::Tensor> tensors) {
  const auto weights = rt::Weights::from_map(std::move(tensors));
  return rt::Model(model_config(config), weights);
}

std::vector<at::Tensor> generate(const rt::Model& model, const std::vector<at::Tensor>& prompts,
                                 const std::vector<int64_t>& steps, double temperature,
                                 double filter_thres, int64_t end_of_gen_token_id,
                                 const at::Generator& generator, const py::object& on_byte) {
  rt::SamplingOptions sampling;
  sampling.temperature = temperature;
  sampling.filter_thres = filter_thres;
  sampling.end_of_gen_token_id = end_of_gen_token_id;
  sampling.generator = generator;
  // Runs with the GIL held, once per byte: the Python callback, and Ctrl-C.
  const auto byte_done = [&on_byte](int64_t row, int64_t byte) {
    const py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (!on_byte.is_none()) on_byte(row, byte);
  };
  const py::gil_scoped_release no_gil;
  return model.generate(prompts, steps, sampling, byte_done);
}

}  // namespace

void register_runtime(py::module_& m) {
  // c10 errors (a failed TORCH_CHECK in a kernel) without their C++ backtrace.
  py::register_local_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  py::class_<rt::Model>(m, "RuntimeModel",
                        "The C++ runtime's MBLM (csrc/runtime): cached decoding without Python")
      .def(py::init(&make_model), py::arg("config"), py::arg("tensors"),
           "config: MBLMModelConfig.model_dump(); tensors: the model's state_dict (referenced). "
           "Raises ValueError for stage blocks the runtime does not run and for missing, "
           "unexpected or misshapen tensors.")
      .def("generate", &generate, py::arg("prompts"), py::arg("steps"), py::arg("temperature"),
           py::arg("filter_thres"), py::arg("end_of_gen_token_id"), py::arg("generator"),
           py::arg("on_byte") = py::none(),
           "Cached generation as MBLM.generate: steps[i] bytes after prompts[i] (1-D int64), "
           "noise drawn from `generator` (a CPU torch.Generator) as Python draws it, "
           "on_byte(row, byte) called for every byte as it is generated. Returns prompt + "
           "generated bytes per row. Releases the GIL while decoding.");
}
