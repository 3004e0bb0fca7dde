// Python module of the fasttrain extension and the schemas of its ops.
//
// The ops live in the `fasttrain` namespace next to the ones that Python code registers with
// torch.library.custom_op, hence TORCH_LIBRARY_FRAGMENT. Kernels are registered per dispatch
// key in the files that implement them (CPU: adamw/adamw_cpu.cpp, CUDA: adamw/adamw_cuda.cpp).
//
// The module also binds the CPU kernels directly (adamw_cpu_, sum_sq_cpu): same arguments as
// the ops, no dispatcher. torch.ops converts every tensor of every list to an IValue and back
// (~1 us per tensor for adamw_cpu_'s five lists); here the Python lists are read in place
// (~20 ns per tensor). Like the dispatcher, they bump the version counter of every tensor they
// write, so autograd still detects an in-place update of a tensor saved for backward. Use them
// for the eager optimizer step; the ops are what torch.compile, opcheck and the dispatcher see.
// grads_fit and data_ptrs are the optimizer's per-step checks that a bucket's grads still fit
// it and that its cached device table still points at the storage of its tensors.

// torch/csrc/autograd/python_variable.h reads tensors out of Python objects; torch/extension.h
// would add all of torch's C++ API to the build.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace fasttrain {
using TensorPtrs = c10::ArrayRef<const at::Tensor*>;
// Defined in adamw/adamw_cpu.cpp.
void adamw_cpu_refs(TensorPtrs params, TensorPtrs grads, TensorPtrs exp_avgs,
                    TensorPtrs exp_avg_sqs, TensorPtrs max_exp_avg_sqs, TensorPtrs masters,
                    TensorPtrs steps, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                    bool stochastic, int64_t seed, const at::Tensor* inv_scale,
                    const at::Tensor* found_inf, const at::Tensor* clip_coef);
at::Tensor sum_sq_cpu_refs(TensorPtrs tensors);
}  // namespace fasttrain

namespace {
namespace py = pybind11;

// A tensor subclass that keeps its data or metadata in Python (__torch_dispatch__, e.g. a
// wrapper subclass): no memory a kernel may read.
bool lives_in_python(const at::Tensor& t) { return t.key_set().has(c10::DispatchKey::Python); }

// The tensors of a Python list or tuple, as pointers into the Python objects. The objects are
// kept alive (a reference each) until this goes away, so the GIL can be released meanwhile.
class UnpackedTensors {
 public:
  // raw_memory: the tensors are for a kernel (refuse subclasses that live in Python)
  UnpackedTensors(py::handle seq, const char* what, bool raw_memory = true) {
    PyObject* fast = PySequence_Fast(seq.ptr(), "");
    if (fast == nullptr) {
      PyErr_Clear();
      throw py::type_error(std::string(what) + " must be a list or tuple of tensors");
    }
    seq_ = py::reinterpret_steal<py::object>(fast);
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject** items = PySequence_Fast_ITEMS(fast);
    ptrs_.reserve(static_cast<size_t>(n));
    owners_.reserve(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(items[i])) {
        throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] is not a tensor");
      }
      // (exact tensors are plain: their Python object alone tells)
      if (raw_memory && !THPVariable_CheckExact(items[i]) &&
          lives_in_python(THPVariable_Unpack(items[i]))) {
        throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] is a " +
                             Py_TYPE(items[i])->tp_name +
                             ", a tensor subclass with __torch_dispatch__: pass its plain "
                             "tensors, or use torch.ops.fasttrain, which dispatches it");
      }
      owners_.push_back(py::reinterpret_borrow<py::object>(items[i]));
      ptrs_.push_back(&THPVariable_Unpack(items[i]));
    }
  }
  fasttrain::TensorPtrs ptrs() const { return ptrs_; }

 private:
  py::object seq_;
  std::vector<py::object> owners_;
  std::vector<const at::Tensor*> ptrs_;
};

// Bumps the version counter of every tensor of the lists, as torch.autograd.graph.
// increment_version does (an inference tensor has none: skipped). In parallel: with thousands
// of tensors the counters, separate allocations and cold after a backward pass, take a good
// part of the step.
void bump_versions(c10::ArrayRef<const UnpackedTensors*> lists) {
  std::vector<const at::Tensor*> all;
  for (const UnpackedTensors* list : lists) {
    all.insert(all.end(), list->ptrs().begin(), list->ptrs().end());
  }
  at::parallel_for(0, static_cast<int64_t>(all.size()), 2048, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      if (!all[i]->is_inference()) {
        torch::autograd::impl::bump_version(*all[i]);
      }
    }
  });
}

// bump_versions of Python lists (the Triton/CUDA step's kernels write through raw pointers).
void bump_versions_py(py::args lists) {
  std::vector<UnpackedTensors> unpacked;
  unpacked.reserve(lists.size());
  for (py::handle list : lists) {
    unpacked.emplace_back(list, "tensors");
  }
  std::vector<const UnpackedTensors*> ptrs;
  for (const UnpackedTensors& u : unpacked) {
    ptrs.push_back(&u);
  }
  py::gil_scoped_release no_gil;
  bump_versions(ptrs);
}

// None or a tensor.
const at::Tensor* optional_tensor(py::handle obj, const char* what) {
  if (obj.is_none()) {
    return nullptr;
  }
  if (!THPVariable_Check(obj.ptr())) {
    throw py::type_error(std::string(what) + " must be a tensor or None");
  }
  return &THPVariable_Unpack(obj.ptr());
}

void adamw_cpu_direct(py::handle params, py::handle grads, py::handle exp_avgs,
                      py::handle exp_avg_sqs, py::handle max_exp_avg_sqs, py::handle masters,
                      py::handle steps, double lr, double beta1, double beta2, double eps,
                      double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                      bool stochastic, int64_t seed, py::object inv_scale, py::object found_inf,
                      py::object clip_coef) {
  const UnpackedTensors p(params, "params"), g(grads, "grads"), m(exp_avgs, "exp_avgs");
  const UnpackedTensors v(exp_avg_sqs, "exp_avg_sqs"), vmax(max_exp_avg_sqs, "max_exp_avg_sqs");
  const UnpackedTensors master(masters, "masters"), step(steps, "steps");
  const at::Tensor* inv = optional_tensor(inv_scale, "inv_scale");
  const at::Tensor* found = optional_tensor(found_inf, "found_inf");
  const at::Tensor* clip = optional_tensor(clip_coef, "clip_coef");
  py::gil_scoped_release no_gil;
  fasttrain::adamw_cpu_refs(p.ptrs(), g.ptrs(), m.ptrs(), v.ptrs(), vmax.ptrs(), master.ptrs(),
                            step.ptrs(), lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                            maximize, stochastic, seed, inv, found, clip);
  if (inv != nullptr) {  // the grads were written back unscaled
    bump_versions({&p, &g, &m, &v, &vmax, &master, &step});
  } else {
    bump_versions({&p, &m, &v, &vmax, &master, &step});
  }
}

// Whether every item of `grads` (a list or tuple) is a dense tensor of `dtype`, and, for a
// kernel, contiguous and not a subclass that lives in Python: the optimizer's per-step check
// that a bucket's grads still fit it, done here because reading three attributes of a tensor
// costs ~0.2 us in Python.
bool grads_fit(py::handle grads, py::handle dtype, bool kernel) {
  if (!THPDtype_Check(dtype.ptr())) {
    throw py::type_error("dtype must be a torch.dtype");
  }
  const at::ScalarType want = reinterpret_cast<THPDtype*>(dtype.ptr())->scalar_type;
  const UnpackedTensors g(grads, "grads", /*raw_memory=*/false);
  for (const at::Tensor* t : g.ptrs()) {
    if (t->scalar_type() != want || t->layout() != at::kStrided ||
        (kernel && (lives_in_python(*t) || !t->is_contiguous()))) {
      return false;
    }
  }
  return true;
}

// [p.grad for p in params] (~3x faster): the grad of each leaf Tensor or Parameter read in
// C++, as Python's .grad does; the others (subclasses, which may define .grad, and non-leaf
// tensors, whose .grad warns) through Python. Python code may change the list meanwhile: its
// items are read one at a time, as a Python loop over it would.
py::list grads_of(py::handle params) {
  PyObject* fast = PySequence_Fast(params.ptr(), "params must be a list or tuple");
  if (fast == nullptr) {
    throw py::error_already_set();
  }
  const py::object owner = py::reinterpret_steal<py::object>(fast);
  py::list out;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); ++i) {
    const py::object item =
        py::reinterpret_borrow<py::object>(PySequence_Fast_GET_ITEM(fast, i));
    PyObject* grad = nullptr;
    if (THPVariable_CheckExact(item.ptr()) && THPVariable_Unpack(item.ptr()).is_leaf()) {
      const at::Tensor& g = THPVariable_Unpack(item.ptr()).grad();
      grad = g.defined() ? THPVariable_Wrap(g) : Py_NewRef(Py_None);
    } else {
      grad = PyObject_GetAttrString(item.ptr(), "grad");
    }
    if (grad == nullptr) {
      throw py::error_already_set();
    }
    out.append(py::reinterpret_steal<py::object>(grad));
  }
  return out;
}

// The data pointer and the size in bytes of each tensor of the given lists, in order, as the
// bytes of an array of uint64 (~25 ns a tensor, against ~70 for t.data_ptr() in Python). A
// tensor replaced under the same object (`t.data = ...`) shows a new pointer or a new size
// (a view of the same memory has the old pointer).
py::bytes data_ptrs(py::args lists) {
  std::vector<uint64_t> out;
  for (py::handle list : lists) {
    const UnpackedTensors t(list, "tensors");
    for (const at::Tensor* tensor : t.ptrs()) {
      out.push_back(reinterpret_cast<uint64_t>(tensor->data_ptr()));
      out.push_back(static_cast<uint64_t>(tensor->nbytes()));
    }
  }
  return py::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(uint64_t));
}

py::object sum_sq_cpu_direct(py::handle tensors) {
  const UnpackedTensors t(tensors, "tensors");
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    out = fasttrain::sum_sq_cpu_refs(t.ptrs());
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
}
}  // namespace

#ifndef FASTTRAIN_TORCH_BUILD
#define FASTTRAIN_TORCH_BUILD ""
#endif
#ifndef FASTTRAIN_SOURCES_KEY
#define FASTTRAIN_SOURCES_KEY ""
#endif

TORCH_LIBRARY_FRAGMENT(fasttrain, m) {
  m.def(
      "adamw_cpu_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] masters, "
      "Tensor(g!)[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled, bool amsgrad, bool maximize, bool stochastic, int seed, "
      "Tensor? inv_scale, Tensor? found_inf, Tensor? clip_coef) -> ()");
  m.def("sum_sq_cpu(Tensor[] tensors) -> Tensor");
  m.def(
      "adamw_cuda_(Tensor table, int n_tensors, int n_chunks, int chunk, float lr, "
      "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, "
      "ScalarType param_dtype, ScalarType grad_dtype, ScalarType state_dtype, bool decoupled, "
      "bool amsgrad, bool maximize, bool has_master, Tensor? inv_scale, Tensor? found_inf, "
      "Tensor? clip_coef) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasttrain C++/CUDA kernels; the ops are under torch.ops.fasttrain";
  m.def(
      "has_cuda",
      []() {
#ifdef FASTTRAIN_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled in.");
  m.def(
      "torch_version", []() { return std::string(TORCH_VERSION); },
      "The torch version (major.minor.patch) this module was built against.");
  m.def(
      "torch_build", []() { return std::string(FASTTRAIN_TORCH_BUILD); },
      "torch.__version__ at build time (with the local tag, e.g. +cpu), if the build recorded it.");
  m.def(
      "sources_key", []() { return std::string(FASTTRAIN_SOURCES_KEY); },
      "The fingerprint of the sources, flags and machine of an ahead-of-time build (JIT: empty).");
  using pybind11::arg;
  m.def("adamw_cpu_", &adamw_cpu_direct,
        "torch.ops.fasttrain.adamw_cpu_ without the dispatcher (same arguments).", arg("params"),
        arg("grads"), arg("exp_avgs"), arg("exp_avg_sqs"), arg("max_exp_avg_sqs"),
        arg("masters"), arg("steps"), arg("lr"), arg("beta1"), arg("beta2"), arg("eps"),
        arg("weight_decay"), arg("decoupled"), arg("amsgrad"), arg("maximize"),
        arg("stochastic"), arg("seed"), arg("inv_scale").none(true),
        arg("found_inf").none(true), arg("clip_coef").none(true));
  m.def("sum_sq_cpu", &sum_sq_cpu_direct, "torch.ops.fasttrain.sum_sq_cpu without the dispatcher.",
        arg("tensors"));
  m.def("grads_fit", &grads_fit,
        "Whether every tensor of grads is dense, of dtype, and fit for a kernel if asked.",
        arg("grads"), arg("dtype"), arg("kernel"));
  m.def("bump_versions", &bump_versions_py,
        "torch.autograd.graph.increment_version of every tensor of the given lists, on all "
        "threads.");
  m.def("grads_of", &grads_of, "[p.grad for p in params], faster.", arg("params"));
  m.def("data_ptrs", &data_ptrs,
        "The data pointers of the tensors of the given lists, as the bytes of a uint64 array.");
}
