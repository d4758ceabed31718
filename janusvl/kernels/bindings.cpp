// The Python module of janusvl's kernels (janusvl.kernels.load()).
#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace janusvl;
  m.def("half_linear", &half_linear, "y = x W^T, x float32 [M, K], W bfloat16/float16 [N, K]; float32 [M, N]");
  m.def("int8_linear", &int8_linear,
        "x float32 [M, K] times int8 weights [N, K] with row scales [N] (activations quantised in blocks of 32)");
  m.def("int4_linear", &int4_linear,
        "x float32 [M, K] times int4 weights (uint8 [N, K/2], bf16 scale and low [N, K/G])");
  m.def("int4_dequantize", &int4_dequantize, "the fp32 weights [N, K] of int4 operands");
  m.def("rms_norm", &rms_norm, "RMSNorm of bf16/fp16 rows as janusvl.models.llama.RMSNorm computes it");
  m.def("rope", &rope, "rotate-half rotary embedding of x [B, T, H, D]; contiguous [B, T, H, D]");
  m.def("decode_attention", &decode_attention, "one query per row over a bf16/fp16 KV cache; float32 [B, H, 1, D]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("valid") = py::none(), py::arg("scale"));
  // The step holds no Python object: other threads (the server's) run while it computes.
  m.def("decode_layers", &decode_layers,
        "one token per row through every decoder layer (janusvl.models.llama.LlamaModel's decode step)",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("layers"), py::arg("heads"), py::arg("kv_heads"),
        py::arg("eps"), py::arg("keys"), py::arg("values"), py::arg("valid"), py::arg("lengths"),
        py::call_guard<py::gil_scoped_release>());
}
