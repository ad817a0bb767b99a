// The Python module fastcgan._C. Loading it registers the fastcgan::instance_norm_act_native_*
// ops (static TORCH_LIBRARY_* initialisers in the other translation units); the functions here
// only describe the build. No torch headers: this file compiles in a second.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "build_info.h"
#include "instance_norm_act_kernels.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcgan native op library: instance_norm_act CPU (and CUDA) kernels as torch ops";
  m.def("cuda_built", [] { return FASTCGAN_CUDA_BUILT != 0; }, "True when the CUDA kernels were compiled in.");
  m.def("build_info", [] { return std::string(FASTCGAN_BUILD_INFO); },
        "Compiler, CUDA version/architectures, CPU ISAs and the torch version this library was built against.");
  m.def(
      "activations",
      [] {
        std::vector<std::string> names(fastcgan::kActivationNames,
                                       fastcgan::kActivationNames + fastcgan::kNumActivations);
        return names;
      },
      "The activation names the ops accept, indexed by their code (fastcgan::Activation).");
  m.def("cpu_isa", [] { return std::string(fastcgan::cpu_isa_active()); },
        "The CPU kernel variant the next call uses: 'avx2' or 'default'.");
  m.def(
      "set_cpu_isa",
      [](const std::string& isa) {
        if (isa == "auto") return fastcgan::set_cpu_isa_request(0);
        if (isa == "default") return fastcgan::set_cpu_isa_request(1);
        if (isa == "avx2") return fastcgan::set_cpu_isa_request(2);
        throw pybind11::value_error("set_cpu_isa: expected 'auto', 'default' or 'avx2', got '" + isa + "'");
      },
      pybind11::arg("isa"), "Force a CPU kernel variant (for tests and benchmarks).");
}
