// moedist._C: the C++ API for Python, without libtorch.
//  - Inputs come as (data_ptr, dtype code, shape, strides) tuples (strides in elements, as torch's
//    Tensor.stride()); None is an absent optional tensor. The Python layer keeps the tensors alive.
//  - Outputs (owning moedist::Tensor) go out as DLPack capsules ("dltensor"): the DLManagedTensor owns
//    the moedist::Tensor and its deleter releases it, so memory carved from a shared-memory window stays
//    valid until torch drops the last reference.
//  - moedist's typed errors become Python exceptions: InvalidArgument -> moedist.InvalidArgument
//    (a ValueError), Unsupported -> moedist.Unsupported (NotImplementedError), TransportError ->
//    moedist.TransportError (RuntimeError), Timeout -> moedist.Timeout (a TransportError); messages kept.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <thread>
#include <type_traits>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "moedist/moedist.h"

namespace py = pybind11;

namespace {

// ---- DLPack (the public ABI, v0.8: DLManagedTensor, capsule name "dltensor") ----
extern "C" {
struct DLDevice {
  int32_t device_type;  // kDLCPU = 1
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4, kDLBool 6
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};
}

constexpr uint8_t kDLInt = 0, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6;

DLDataType dl_dtype(moedist::DType dt) {
  switch (dt) {
    case moedist::DType::kBFloat16: return {kDLBfloat, 16, 1};
    case moedist::DType::kFloat16: return {kDLFloat, 16, 1};
    case moedist::DType::kFloat32: return {kDLFloat, 32, 1};
    case moedist::DType::kInt8: return {kDLInt, 8, 1};
    case moedist::DType::kInt32: return {kDLInt, 32, 1};
    case moedist::DType::kInt64: return {kDLInt, 64, 1};
    case moedist::DType::kBool: return {kDLBool, 8, 1};
  }
  throw moedist::Error("moedist: unknown dtype");
}

struct Managed {
  moedist::Tensor tensor;
  std::vector<int64_t> shape, strides;
  DLManagedTensor dl{};
};

alignas(64) unsigned char g_empty[64];  // data pointer of tensors without elements (never read)

void managed_deleter(DLManagedTensor* self) { delete static_cast<Managed*>(self->manager_ctx); }

void capsule_destructor(PyObject* capsule) {
  // A consumer renames the capsule to "used_dltensor" and calls the deleter itself.
  if (PyCapsule_IsValid(capsule, "used_dltensor")) return;
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  if (m == nullptr) {
    PyErr_Clear();
    return;
  }
  m->deleter(m);
}

py::object to_dlpack(moedist::Tensor t) {
  auto* m = new Managed;
  m->tensor = std::move(t);
  m->shape = m->tensor.shape();
  m->strides.assign(m->shape.size(), 1);
  for (size_t i = m->shape.size(); i-- > 1;) m->strides[i - 1] = m->strides[i] * std::max<int64_t>(m->shape[i], 1);
  DLTensor& d = m->dl.dl_tensor;
  d.data = m->tensor.data() ? m->tensor.data() : g_empty;
  d.device = {1, 0};
  d.ndim = static_cast<int32_t>(m->shape.size());
  d.dtype = dl_dtype(m->tensor.dtype());
  d.shape = m->shape.data();
  d.strides = m->strides.data();
  d.byte_offset = 0;
  m->dl.manager_ctx = m;
  m->dl.deleter = managed_deleter;
  PyObject* cap = PyCapsule_New(&m->dl, "dltensor", capsule_destructor);
  if (cap == nullptr) {
    delete m;
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(cap);
}

// ---- inputs ----
moedist::DType dtype_from_code(int64_t code, const std::string& name) {
  if (code < 0 || code > static_cast<int64_t>(moedist::DType::kBool))
    throw moedist::InvalidArgument("moedist: " + name + " has an unknown dtype code " + std::to_string(code));
  return static_cast<moedist::DType>(code);
}

// (data_ptr, dtype code, shape, strides) or None.
moedist::TensorView to_view(const py::handle& h, const std::string& name) {
  if (h.is_none()) return {};
  auto t = h.cast<py::tuple>();
  if (t.size() != 4) throw moedist::InvalidArgument("moedist: " + name + ": expected (data_ptr, dtype, shape, strides)");
  const auto ptr = t[0].cast<uintptr_t>();
  const auto dt = dtype_from_code(t[1].cast<int64_t>(), name);
  auto shape = t[2].cast<std::vector<int64_t>>();
  auto strides = t[3].cast<std::vector<int64_t>>();
  if (!strides.empty() && strides.size() != shape.size())
    throw moedist::InvalidArgument("moedist: " + name + ": " + std::to_string(strides.size()) + " strides for " +
                                   std::to_string(shape.size()) + " dimensions");
  return moedist::TensorView(reinterpret_cast<const void*>(ptr), dt, std::move(shape), std::move(strides));
}

// Reads a dict of arguments; every key must be known (typos are errors, not silently defaults).
class Reader {
 public:
  Reader(py::dict d, const char* op) : d_(std::move(d)), op_(op) {}
  moedist::TensorView tensor(const char* key) {
    seen_.insert(key);
    return d_.contains(key) ? to_view(d_[key], key) : moedist::TensorView{};
  }
  template <typename T>
  void get(const char* key, T& out) {
    seen_.insert(key);
    if (d_.contains(key)) {
      py::object v = d_[key];
      if (v.is_none()) throw moedist::InvalidArgument(std::string(op_) + ": " + key + " is None");
      out = v.cast<T>();
    }
  }
  void finish() const {
    for (auto item : d_) {
      const auto k = item.first.cast<std::string>();
      if (!seen_.count(k)) throw moedist::InvalidArgument(std::string(op_) + ": unexpected argument '" + k + "'");
    }
  }

 private:
  py::dict d_;
  const char* op_;
  std::set<std::string> seen_;
};

moedist::DispatchArgs dispatch_args(const py::dict& d) {
  Reader r(d, "npu_moe_distribute_dispatch_v2");
  moedist::DispatchArgs a;
  a.x = r.tensor("x");
  a.expert_ids = r.tensor("expert_ids");
  r.get("group_ep", a.group_ep);
  r.get("ep_world_size", a.ep_world_size);
  r.get("ep_rank_id", a.ep_rank_id);
  r.get("moe_expert_num", a.moe_expert_num);
  a.scales = r.tensor("scales");
  a.x_active_mask = r.tensor("x_active_mask");
  a.expert_scales = r.tensor("expert_scales");
  a.elastic_info = r.tensor("elastic_info");
  a.performance_info = r.tensor("performance_info");
  r.get("group_tp", a.group_tp);
  r.get("tp_world_size", a.tp_world_size);
  r.get("tp_rank_id", a.tp_rank_id);
  r.get("expert_shard_type", a.expert_shard_type);
  r.get("shared_expert_num", a.shared_expert_num);
  r.get("shared_expert_rank_num", a.shared_expert_rank_num);
  r.get("quant_mode", a.quant_mode);
  r.get("global_bs", a.global_bs);
  r.get("expert_token_nums_type", a.expert_token_nums_type);
  r.get("comm_alg", a.comm_alg);
  r.get("zero_expert_num", a.zero_expert_num);
  r.get("copy_expert_num", a.copy_expert_num);
  r.get("const_expert_num", a.const_expert_num);
  r.get("profile", a.profile);
  r.finish();
  return a;
}

moedist::CombineArgs combine_args(const py::dict& d) {
  Reader r(d, "npu_moe_distribute_combine_v2");
  moedist::CombineArgs a;
  a.expand_x = r.tensor("expand_x");
  a.expert_ids = r.tensor("expert_ids");
  a.assist_info_for_combine = r.tensor("assist_info_for_combine");
  a.ep_send_counts = r.tensor("ep_send_counts");
  a.expert_scales = r.tensor("expert_scales");
  r.get("group_ep", a.group_ep);
  r.get("ep_world_size", a.ep_world_size);
  r.get("ep_rank_id", a.ep_rank_id);
  r.get("moe_expert_num", a.moe_expert_num);
  a.tp_send_counts = r.tensor("tp_send_counts");
  a.x_active_mask = r.tensor("x_active_mask");
  a.expand_scales = r.tensor("expand_scales");
  a.shared_expert_x = r.tensor("shared_expert_x");
  a.elastic_info = r.tensor("elastic_info");
  a.ori_x = r.tensor("ori_x");
  a.const_expert_alpha_1 = r.tensor("const_expert_alpha_1");
  a.const_expert_alpha_2 = r.tensor("const_expert_alpha_2");
  a.const_expert_v = r.tensor("const_expert_v");
  a.performance_info = r.tensor("performance_info");
  r.get("group_tp", a.group_tp);
  r.get("tp_world_size", a.tp_world_size);
  r.get("tp_rank_id", a.tp_rank_id);
  r.get("expert_shard_type", a.expert_shard_type);
  r.get("shared_expert_num", a.shared_expert_num);
  r.get("shared_expert_rank_num", a.shared_expert_rank_num);
  r.get("global_bs", a.global_bs);
  r.get("comm_quant_mode", a.comm_quant_mode);
  r.get("comm_alg", a.comm_alg);
  r.get("zero_expert_num", a.zero_expert_num);
  r.get("copy_expert_num", a.copy_expert_num);
  r.get("const_expert_num", a.const_expert_num);
  r.get("profile", a.profile);
  r.finish();
  return a;
}

py::tuple dispatch_result(moedist::DispatchResult&& r) {
  return py::make_tuple(to_dlpack(std::move(r.expand_x)), to_dlpack(std::move(r.dynamic_scales)),
                        to_dlpack(std::move(r.assist_info_for_combine)), to_dlpack(std::move(r.expert_token_nums)),
                        to_dlpack(std::move(r.ep_recv_counts)), to_dlpack(std::move(r.tp_recv_counts)),
                        to_dlpack(std::move(r.expand_scales)));
}

// The group fields of a dict of arguments, as far as they can be read (for telling peers of a rejection).
template <typename Args>
Args group_fields(const py::dict& d) {
  Args a;
  auto take = [&](const char* key, auto& out) {
    try {
      if (d.contains(key) && !d[key].is_none()) out = d[key].cast<std::decay_t<decltype(out)>>();
    } catch (...) {
    }
  };
  take("group_ep", a.group_ep);
  take("ep_world_size", a.ep_world_size);
  take("ep_rank_id", a.ep_rank_id);
  take("group_tp", a.group_tp);
  take("tp_world_size", a.tp_world_size);
  take("tp_rank_id", a.tp_rank_id);
  try {
    if (d.contains("elastic_info")) a.elastic_info = to_view(d["elastic_info"], "elastic_info");
  } catch (...) {
  }
  return a;
}

// Arguments that cannot be read are this rank's rejection of the call: its peers are told, then the
// error is raised here as InvalidArgument.
template <typename Args>
Args parse_or_reject(const py::dict& d, Args (*parse)(const py::dict&), void (*reject)(const Args&, const std::string&)) {
  try {
    return parse(d);
  } catch (const std::exception& e) {
    const Args g = group_fields<Args>(d);
    const std::string msg = e.what();
    {
      py::gil_scoped_release nogil;
      reject(g, msg);
    }
    if (dynamic_cast<const moedist::Error*>(&e)) throw;
    throw moedist::InvalidArgument(msg);
  }
}

// ---- the eager path: torch tensors read through the Python C API ----
// The public functions call dispatch_v2_eager / combine_v2_eager with their arguments in signature order
// (groups already resolved to names) when nothing is tracing or intercepting torch calls. The arguments
// are read here without building dicts or tuples: a tensor must be exactly a torch.Tensor on the CPU,
// strided, of a moedist dtype and not requiring grad; an int argument exactly an int that fits int64; a
// str argument exactly a str. Anything else returns None and the caller takes the checked path
// (torch.library operator, Python checks, rejection sent to the peers), which gives the same results
// and the same errors; errors of the core itself are raised from here as from there.
struct TorchRefs {
  PyObject* tensor_type = nullptr;         // torch.Tensor
  PyObject* dtypes[7] = {};                // torch dtypes in moedist::DType order
  PyObject* strided = nullptr;             // torch.strided
  PyObject* from_dlpack = nullptr;         // torch._C._from_dlpack
  PyObject *s_is_cpu, *s_layout, *s_requires_grad, *s_dtype, *s_shape, *s_stride, *s_data_ptr;
  // torch.Tensor's own descriptors of those attributes (getset descriptors of torch._C.TensorBase for the
  // five properties, method descriptors for stride and data_ptr), looked up once: the eager path takes only
  // exact torch.Tensor objects, so calling these is what the attribute access would do, without the lookup
  // through the type's bases on every read. nullptr where one is not of the expected kind (then the
  // attribute is read by name).
  PyObject* d_props[5] = {};  // is_cpu, layout, requires_grad, dtype, shape
  PyObject *d_stride = nullptr, *d_data_ptr = nullptr;
};
TorchRefs* g_torch = nullptr;  // set once by set_torch (never freed: torch outlives every call)

// false: not a tensor the eager path takes (the caller falls back to the checked path).
bool eager_view(PyObject* o, moedist::TensorView& out) {
  if (o == Py_None) {
    out = {};
    return true;
  }
  const TorchRefs& T = *g_torch;
  if (Py_TYPE(o) != reinterpret_cast<PyTypeObject*>(T.tensor_type)) return false;
  auto attr = [&](int i, PyObject* name) {
    PyObject* d = T.d_props[i];
    return py::reinterpret_steal<py::object>(d ? Py_TYPE(d)->tp_descr_get(d, o, T.tensor_type) : PyObject_GetAttr(o, name));
  };
  auto call = [&](PyObject* d, PyObject* name) {
    return py::reinterpret_steal<py::object>(d ? PyObject_Vectorcall(d, &o, 1, nullptr) : PyObject_CallMethodNoArgs(o, name));
  };
  py::object is_cpu = attr(0, T.s_is_cpu);
  if (is_cpu.ptr() != Py_True) return false;  // meta, an accelerator, or an error (cleared below)
  py::object layout = attr(1, T.s_layout);
  if (layout.ptr() != T.strided) return false;
  py::object rg = attr(2, T.s_requires_grad);
  if (rg.ptr() != Py_False) return false;
  py::object dt = attr(3, T.s_dtype);
  int code = -1;
  for (int i = 0; i < 7; ++i)
    if (dt.ptr() == T.dtypes[i]) code = i;
  if (code < 0) return false;
  py::object shape = attr(4, T.s_shape);
  py::object strides = call(T.d_stride, T.s_stride);
  py::object ptr = call(T.d_data_ptr, T.s_data_ptr);
  if (!shape || !strides || !ptr || !PyTuple_Check(shape.ptr()) || !PyTuple_Check(strides.ptr())) return false;
  const Py_ssize_t nd = PyTuple_GET_SIZE(shape.ptr());
  if (PyTuple_GET_SIZE(strides.ptr()) != nd) return false;
  std::vector<int64_t> sh(static_cast<size_t>(nd)), st(static_cast<size_t>(nd));
  for (Py_ssize_t i = 0; i < nd; ++i) {
    sh[static_cast<size_t>(i)] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), i));
    st[static_cast<size_t>(i)] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides.ptr(), i));
  }
  const unsigned long long p = PyLong_AsUnsignedLongLong(ptr.ptr());
  if (PyErr_Occurred()) return false;
  out = moedist::TensorView(reinterpret_cast<const void*>(static_cast<uintptr_t>(p)), static_cast<moedist::DType>(code),
                            std::move(sh), std::move(st));
  return true;
}

bool eager_int(PyObject* o, int64_t& out) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  out = PyLong_AsLongLongAndOverflow(o, &overflow);
  return overflow == 0 && !(out == -1 && PyErr_Occurred());
}

bool eager_str(PyObject* o, std::string& out) {
  if (!PyUnicode_CheckExact(o)) return false;
  Py_ssize_t n = 0;
  const char* s = PyUnicode_AsUTF8AndSize(o, &n);
  if (s == nullptr) return false;
  out.assign(s, static_cast<size_t>(n));
  return true;
}

// One argument of the eager call: tensor, int or str slot.
struct EagerReader {
  PyObject* const* args;
  Py_ssize_t i = 0;
  bool ok = true;
  void tensor(moedist::TensorView& v) { ok = ok && eager_view(args[i++], v); }
  void integer(int64_t& v) { ok = ok && eager_int(args[i++], v); }
  void str(std::string& v) { ok = ok && eager_str(args[i++], v); }
};

constexpr Py_ssize_t kDispatchArgs = 23, kCombineArgs = 30;

bool eager_dispatch_args(PyObject* const* args, moedist::DispatchArgs& a) {
  EagerReader r{args};
  r.tensor(a.x);
  r.tensor(a.expert_ids);
  r.str(a.group_ep);
  r.integer(a.ep_world_size);
  r.integer(a.ep_rank_id);
  r.integer(a.moe_expert_num);
  r.tensor(a.scales);
  r.tensor(a.x_active_mask);
  r.tensor(a.expert_scales);
  r.tensor(a.elastic_info);
  r.str(a.group_tp);
  r.integer(a.tp_world_size);
  r.integer(a.tp_rank_id);
  r.integer(a.expert_shard_type);
  r.integer(a.shared_expert_num);
  r.integer(a.shared_expert_rank_num);
  r.integer(a.quant_mode);
  r.integer(a.global_bs);
  r.integer(a.expert_token_nums_type);
  r.str(a.comm_alg);
  r.integer(a.zero_expert_num);
  r.integer(a.copy_expert_num);
  r.integer(a.const_expert_num);
  return r.ok && r.i == kDispatchArgs;
}

bool eager_combine_args(PyObject* const* args, moedist::CombineArgs& a) {
  EagerReader r{args};
  r.tensor(a.expand_x);
  r.tensor(a.expert_ids);
  r.tensor(a.assist_info_for_combine);
  r.tensor(a.ep_send_counts);
  r.tensor(a.expert_scales);
  r.str(a.group_ep);
  r.integer(a.ep_world_size);
  r.integer(a.ep_rank_id);
  r.integer(a.moe_expert_num);
  r.tensor(a.tp_send_counts);
  r.tensor(a.x_active_mask);
  r.tensor(a.expand_scales);
  r.tensor(a.shared_expert_x);
  r.tensor(a.elastic_info);
  r.tensor(a.ori_x);
  r.tensor(a.const_expert_alpha_1);
  r.tensor(a.const_expert_alpha_2);
  r.tensor(a.const_expert_v);
  r.str(a.group_tp);
  r.integer(a.tp_world_size);
  r.integer(a.tp_rank_id);
  r.integer(a.expert_shard_type);
  r.integer(a.shared_expert_num);
  r.integer(a.shared_expert_rank_num);
  r.integer(a.global_bs);
  r.integer(a.comm_quant_mode);
  r.str(a.comm_alg);
  r.integer(a.zero_expert_num);
  r.integer(a.copy_expert_num);
  r.integer(a.const_expert_num);
  return r.ok && r.i == kCombineArgs;
}

// A torch tensor owning the core's output (torch._C._from_dlpack of its capsule).
PyObject* to_torch(moedist::Tensor t) {
  py::object cap = to_dlpack(std::move(t));
  PyObject* out = PyObject_CallOneArg(g_torch->from_dlpack, cap.ptr());
  if (out == nullptr) throw py::error_already_set();
  return out;
}

py::object dispatch_v2_eager(const py::args& args) {
  if (g_torch == nullptr) throw moedist::Error("moedist._C.dispatch_v2_eager: set_torch was not called");
  if (args.size() != kDispatchArgs)
    throw moedist::InvalidArgument("moedist._C.dispatch_v2_eager: " + std::to_string(kDispatchArgs) + " arguments expected");
  moedist::DispatchArgs a;
  if (!eager_dispatch_args(&PyTuple_GET_ITEM(args.ptr(), 0), a)) {
    PyErr_Clear();
    return py::none();
  }
  moedist::DispatchResult r;
  {
    py::gil_scoped_release nogil;
    r = moedist::dispatch_v2(a);
  }
  moedist::Tensor* ts[7] = {&r.expand_x,       &r.dynamic_scales, &r.assist_info_for_combine, &r.expert_token_nums,
                            &r.ep_recv_counts, &r.tp_recv_counts, &r.expand_scales};
  py::tuple out(7);
  for (Py_ssize_t i = 0; i < 7; ++i) PyTuple_SET_ITEM(out.ptr(), i, to_torch(std::move(*ts[i])));
  return std::move(out);
}

py::object combine_v2_eager(const py::args& args) {
  if (g_torch == nullptr) throw moedist::Error("moedist._C.combine_v2_eager: set_torch was not called");
  if (args.size() != kCombineArgs)
    throw moedist::InvalidArgument("moedist._C.combine_v2_eager: " + std::to_string(kCombineArgs) + " arguments expected");
  moedist::CombineArgs a;
  if (!eager_combine_args(&PyTuple_GET_ITEM(args.ptr(), 0), a)) {
    PyErr_Clear();
    return py::none();
  }
  moedist::Tensor out;
  {
    py::gil_scoped_release nogil;
    out = moedist::combine_v2(a);
  }
  return py::reinterpret_steal<py::object>(to_torch(std::move(out)));
}

// The C++ op alone, for bench/python_calls.py: reads the eager path's arguments once, then calls the op
// `iters` times with the GIL released (outputs dropped, as a caller's are when it is done with them) and
// returns each call's nanoseconds. A call from Python minus these is what Python adds, measured in the
// same process, on the same arguments and communicator. The group must be one no other rank calls on
// (a 1-rank group): the op runs `iters` times here alone.
template <typename Args, typename Read, typename Op>
py::list timed_calls(int64_t iters, const py::args& args, Py_ssize_t n, Read read, Op op, const char* name) {
  if (g_torch == nullptr) throw moedist::Error(std::string("moedist._C.") + name + ": set_torch was not called");
  if (iters < 1) throw moedist::InvalidArgument(std::string("moedist._C.") + name + ": iters=" + std::to_string(iters) + " (must be >= 1)");
  Args a;
  if (static_cast<Py_ssize_t>(args.size()) != n || !read(&PyTuple_GET_ITEM(args.ptr(), 0), a)) {
    PyErr_Clear();
    throw moedist::InvalidArgument(std::string("moedist._C.") + name + ": the arguments are not ones the eager path takes");
  }
  std::vector<int64_t> ns(static_cast<size_t>(iters));
  {
    py::gil_scoped_release nogil;
    for (auto& v : ns) {
      const auto t0 = std::chrono::steady_clock::now();
      op(a);
      v = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    }
  }
  py::list out;
  for (int64_t v : ns) out.append(v);
  return out;
}

void set_torch(const py::handle& tensor_type, const py::sequence& dtypes, const py::handle& strided,
               const py::handle& from_dlpack) {
  if (dtypes.size() != 7) throw moedist::InvalidArgument("moedist._C.set_torch: 7 dtypes expected (moedist::DType order)");
  auto* t = new TorchRefs;
  auto keep = [](const py::handle& h) { return h.inc_ref().ptr(); };
  t->tensor_type = keep(tensor_type);
  for (size_t i = 0; i < 7; ++i) t->dtypes[i] = keep(dtypes[i]);
  t->strided = keep(strided);
  t->from_dlpack = keep(from_dlpack);
  t->s_is_cpu = PyUnicode_InternFromString("is_cpu");
  t->s_layout = PyUnicode_InternFromString("layout");
  t->s_requires_grad = PyUnicode_InternFromString("requires_grad");
  t->s_dtype = PyUnicode_InternFromString("dtype");
  t->s_shape = PyUnicode_InternFromString("shape");
  t->s_stride = PyUnicode_InternFromString("stride");
  t->s_data_ptr = PyUnicode_InternFromString("data_ptr");
  // The descriptors: what torch.Tensor's type lookup finds for each name (a getset descriptor, a data
  // descriptor that no instance attribute can shadow; a method descriptor callable with the tensor first).
  // (A descriptor read from the class is the descriptor itself.) Kept for good, like the rest.
  auto lookup = [&](PyObject* name, PyTypeObject* kind) -> PyObject* {
    PyObject* d = PyObject_GetAttr(t->tensor_type, name);
    if (d == nullptr) PyErr_Clear();
    if (d != nullptr && Py_TYPE(d) == kind) return d;
    Py_XDECREF(d);
    return nullptr;
  };
  PyObject* props[5] = {t->s_is_cpu, t->s_layout, t->s_requires_grad, t->s_dtype, t->s_shape};
  for (int i = 0; i < 5; ++i) t->d_props[i] = lookup(props[i], &PyGetSetDescr_Type);
  t->d_stride = lookup(t->s_stride, &PyMethodDescr_Type);
  t->d_data_ptr = lookup(t->s_data_ptr, &PyMethodDescr_Type);
  if (g_torch == nullptr) g_torch = t;  // once per process: the objects are kept for good
}

// Waits in the ops ask about every 20 ms whether to give up; in the main thread that runs Python's
// signal handlers, so Ctrl-C (or any handler that raises) ends the wait. The exception the handler
// raised is kept and raised in place of moedist's Interrupted.
std::thread::id g_main_thread;
thread_local PyObject* t_pending[3] = {nullptr, nullptr, nullptr};

bool python_interrupt_check() {
  if (std::this_thread::get_id() != g_main_thread || !Py_IsInitialized()) return false;
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() == 0) return false;
  PyErr_Fetch(&t_pending[0], &t_pending[1], &t_pending[2]);
  return true;
}

moedist::CombineAddRmsNormArgs add_rms_norm_args(const py::dict& combine, const py::handle& residual_x,
                                                 const py::handle& gamma, double norm_eps) {
  moedist::CombineAddRmsNormArgs a;
  a.combine = combine_args(combine);
  a.residual_x = to_view(residual_x, "residual_x");
  a.gamma = to_view(gamma, "gamma");
  a.norm_eps = norm_eps;
  return a;
}

py::tuple add_rms_norm_result(moedist::CombineAddRmsNormResult&& r) {
  return py::make_tuple(to_dlpack(std::move(r.y)), to_dlpack(std::move(r.rstd)), to_dlpack(std::move(r.x)));
}

moedist::GroupOptions group_options(int64_t timeout_ms, int ranks_per_server) {
  moedist::GroupOptions o;
  o.timeout = std::chrono::milliseconds(timeout_ms);
  o.ranks_per_server = ranks_per_server;
  return o;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moedist C++ core (dispatch_v2 / combine_v2, groups, reference); use the package moedist";
  m.attr("__version__") = MOEDIST_VERSION_STRING;

  // Base classes first: pybind11 tries the translators registered last first.
  auto& err = py::register_exception<moedist::Error>(m, "Error", PyExc_RuntimeError);
  (void)err;
  auto& transport = py::register_exception<moedist::TransportError>(m, "TransportError", PyExc_RuntimeError);
  py::register_exception<moedist::Timeout>(m, "Timeout", transport.ptr());
  py::register_exception<moedist::InvalidArgument>(m, "InvalidArgument", PyExc_ValueError);
  py::register_exception<moedist::Unsupported>(m, "Unsupported", PyExc_NotImplementedError);
  // Interrupted: the exception Python's signal handler raised (KeyboardInterrupt for Ctrl-C).
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const moedist::Interrupted& e) {
      if (t_pending[0]) {
        PyErr_Restore(t_pending[0], t_pending[1], t_pending[2]);
        t_pending[0] = t_pending[1] = t_pending[2] = nullptr;
      } else {
        PyErr_SetString(PyExc_KeyboardInterrupt, e.what());
      }
    }
  });
  g_main_thread = std::this_thread::get_id();  // the module is imported by the main thread
  moedist::set_interrupt_check(&python_interrupt_check);

  m.def(
      "dispatch_v2",
      [](const py::dict& args) {
        moedist::DispatchArgs a = parse_or_reject(args, &dispatch_args, &moedist::reject_dispatch_v2);
        moedist::DispatchResult r;
        {
          py::gil_scoped_release nogil;
          r = moedist::dispatch_v2(a);
        }
        return dispatch_result(std::move(r));
      },
      py::arg("args"), "dispatch_v2 over a registered group: dict of arguments -> 7 DLPack capsules");
  m.def(
      "combine_v2",
      [](const py::dict& args) {
        moedist::CombineArgs a = parse_or_reject(args, &combine_args, &moedist::reject_combine_v2);
        moedist::Tensor out;
        {
          py::gil_scoped_release nogil;
          out = moedist::combine_v2(a);
        }
        return to_dlpack(std::move(out));
      },
      py::arg("args"), "combine_v2 over a registered group: dict of arguments -> DLPack capsule");
  m.def("set_torch", &set_torch, py::arg("tensor_type"), py::arg("dtypes"), py::arg("strided"), py::arg("from_dlpack"),
        "The torch objects the eager entry points compare against (done by moedist._ops at import)");
  m.def("dispatch_v2_eager", &dispatch_v2_eager,
        "dispatch_v2 with the public function's 23 arguments in order (torch tensors, group names): a tuple of 7 "
        "torch tensors, or None when an argument is not one the eager path takes (the caller then takes the checked path)");
  m.def("combine_v2_eager", &combine_v2_eager,
        "combine_v2 with the public function's 30 arguments in order: a torch tensor, or None (see dispatch_v2_eager)");
  m.def(
      "dispatch_v2_timed",
      [](int64_t iters, const py::args& args) {
        return timed_calls<moedist::DispatchArgs>(iters, args, kDispatchArgs, eager_dispatch_args,
                                                  [](const moedist::DispatchArgs& a) { (void)moedist::dispatch_v2(a); }, "dispatch_v2_timed");
      },
      "dispatch_v2_timed(iters, *args): dispatch_v2_eager's arguments; the C++ op alone, iters times: a list of "
      "nanoseconds per call (bench/python_calls.py; on a group no other rank calls on)");
  m.def(
      "combine_v2_timed",
      [](int64_t iters, const py::args& args) {
        return timed_calls<moedist::CombineArgs>(iters, args, kCombineArgs, eager_combine_args,
                                                 [](const moedist::CombineArgs& a) { (void)moedist::combine_v2(a); }, "combine_v2_timed");
      },
      "combine_v2_timed(iters, *args): as dispatch_v2_timed, for combine_v2_eager's arguments");
  m.def(
      "reject_dispatch_v2",
      [](const py::dict& args, const std::string& message) {
        const auto a = group_fields<moedist::DispatchArgs>(args);
        py::gil_scoped_release nogil;
        moedist::reject_dispatch_v2(a, message);
      },
      py::arg("args"), py::arg("message"),
      "Tells the peers of a dispatch this rank rejected before calling it (group fields of args are read)");
  m.def(
      "reject_combine_v2",
      [](const py::dict& args, const std::string& message) {
        const auto a = group_fields<moedist::CombineArgs>(args);
        py::gil_scoped_release nogil;
        moedist::reject_combine_v2(a, message);
      },
      py::arg("args"), py::arg("message"), "Tells the peers of a combine this rank rejected before calling it");
  m.def(
      "dispatch_setup",
      [](const py::dict& args) {
        moedist::DispatchArgs a = dispatch_args(args);
        py::gil_scoped_release nogil;
        return moedist::dispatch_setup(a);
      },
      py::arg("args"), "dispatch_setup over a registered group: dict of arguments -> handle");
  m.def(
      "dispatch_teardown",
      [](uint64_t handle) {
        moedist::DispatchResult r;
        {
          py::gil_scoped_release nogil;
          r = moedist::dispatch_teardown(handle);
        }
        return dispatch_result(std::move(r));
      },
      py::arg("handle"), "dispatch_teardown: handle -> 7 DLPack capsules");
  m.def(
      "combine_setup",
      [](const py::dict& args) {
        moedist::CombineArgs a = combine_args(args);
        py::gil_scoped_release nogil;
        return moedist::combine_setup(a);
      },
      py::arg("args"), "combine_setup over a registered group: dict of arguments -> handle");
  m.def(
      "combine_teardown",
      [](uint64_t handle) {
        moedist::Tensor out;
        {
          py::gil_scoped_release nogil;
          out = moedist::combine_teardown(handle);
        }
        return to_dlpack(std::move(out));
      },
      py::arg("handle"), "combine_teardown: handle -> DLPack capsule");
  m.def(
      "combine_add_rms_norm",
      [](const py::dict& combine, const py::handle& residual_x, const py::handle& gamma, double norm_eps) {
        moedist::CombineAddRmsNormArgs a = add_rms_norm_args(combine, residual_x, gamma, norm_eps);
        moedist::CombineAddRmsNormResult r;
        {
          py::gil_scoped_release nogil;
          r = moedist::combine_add_rms_norm(a);
        }
        return add_rms_norm_result(std::move(r));
      },
      py::arg("combine"), py::arg("residual_x"), py::arg("gamma"), py::arg("norm_eps"),
      "combine_add_rms_norm over a registered group -> (y, rstd, x) DLPack capsules");
  m.def(
      "reference_combine_add_rms_norm",
      [](const py::list& calls, int ranks_per_server) {
        std::vector<moedist::CombineAddRmsNormArgs> a;
        for (auto c : calls) {
          auto t = c.cast<py::tuple>();
          a.push_back(add_rms_norm_args(t[0].cast<py::dict>(), t[1], t[2], t[3].cast<double>()));
        }
        std::vector<moedist::CombineAddRmsNormResult> r;
        {
          py::gil_scoped_release nogil;
          r = moedist::reference::combine_add_rms_norm(a, {ranks_per_server});
        }
        py::list out;
        for (auto& x : r) out.append(add_rms_norm_result(std::move(x)));
        return out;
      },
      py::arg("calls"), py::arg("ranks_per_server") = 0);
  m.def(
      "reference_dispatch_v2",
      [](const py::list& calls, int ranks_per_server) {
        std::vector<moedist::DispatchArgs> a;
        for (auto c : calls) a.push_back(dispatch_args(c.cast<py::dict>()));
        std::vector<moedist::DispatchResult> r;
        {
          py::gil_scoped_release nogil;
          r = moedist::reference::dispatch_v2(a, {ranks_per_server});
        }
        py::list out;
        for (auto& x : r) out.append(dispatch_result(std::move(x)));
        return out;
      },
      py::arg("calls"), py::arg("ranks_per_server") = 0);
  m.def(
      "reference_combine_v2",
      [](const py::list& calls, int ranks_per_server) {
        std::vector<moedist::CombineArgs> a;
        for (auto c : calls) a.push_back(combine_args(c.cast<py::dict>()));
        std::vector<moedist::Tensor> r;
        {
          py::gil_scoped_release nogil;
          r = moedist::reference::combine_v2(a, {ranks_per_server});
        }
        py::list out;
        for (auto& x : r) out.append(to_dlpack(std::move(x)));
        return out;
      },
      py::arg("calls"), py::arg("ranks_per_server") = 0);

  m.def(
      "init_shm_group",
      [](const std::string& name, int world_size, int rank, const std::string& job, int64_t timeout_ms, int ranks_per_server) {
        std::shared_ptr<moedist::Transport> t;
        {
          py::gil_scoped_release nogil;
          t = moedist::make_shm_group(name, world_size, rank, group_options(timeout_ms, ranks_per_server), job);
        }
        moedist::register_group(name, {t});
      },
      py::arg("name"), py::arg("world_size"), py::arg("rank"), py::arg("job"), py::arg("timeout_ms") = 0,
      py::arg("ranks_per_server") = 0,
      "Collective over `world_size` processes on this host: joins the shared-memory group and registers it as `name`");
  m.def(
      "init_ucx_group",
      [](const std::string& name, int world_size, int rank, const std::string& job, std::vector<int> host_of, py::function allgather,
         int64_t timeout_ms, int ranks_per_server) {
        moedist::UcxBootstrap b;
        b.rank = rank;
        b.world_size = world_size;
        b.host_of = std::move(host_of);
        b.job = job;
        // Called from the bootstrap (with the GIL released around it): bytes in, a list of bytes out.
        b.allgather = [&allgather](const std::string& mine) {
          py::gil_scoped_acquire gil;
          py::list got = allgather(py::bytes(mine));
          std::vector<std::string> all;
          for (const auto& x : got) all.push_back(x.cast<std::string>());
          return all;
        };
        std::shared_ptr<moedist::Transport> t;
        {
          py::gil_scoped_release nogil;
          t = moedist::make_ucx_group(b, group_options(timeout_ms, ranks_per_server));
        }
        moedist::register_group(name, {t});
      },
      py::arg("name"), py::arg("world_size"), py::arg("rank"), py::arg("job"), py::arg("host_of"), py::arg("allgather"),
      py::arg("timeout_ms") = 0, py::arg("ranks_per_server") = 0,
      "Collective over `world_size` processes on several hosts (host_of: every rank's host): shared memory inside a host, UCX "
      "between hosts; `allgather(bytes) -> list of every rank's bytes` bootstraps it. Registers it as `name`");
  m.def("ucx_available", &moedist::ucx_available);
  m.def(
      "init_thread_group",
      [](const std::string& name, int world_size, int64_t timeout_ms, int ranks_per_server) {
        moedist::register_group(name, moedist::make_thread_group(world_size, group_options(timeout_ms, ranks_per_server)));
      },
      py::arg("name"), py::arg("world_size"), py::arg("timeout_ms") = 0, py::arg("ranks_per_server") = 0,
      "Registers `name` for `world_size` ranks that are threads of this process");
  m.def("unregister_group", &moedist::unregister_group, py::arg("name"));
  m.def("group_registered", &moedist::group_registered, py::arg("name"));
  m.def("group_info", [](const std::string& name, int64_t rank) {
    auto t = moedist::resolve_group(name, rank, "group_info");
    return py::dict(py::arg("transport") = t->name(), py::arg("rank") = t->rank(), py::arg("world_size") = t->world_size(),
                    py::arg("ranks_per_server") = t->ranks_per_server(), py::arg("timeout_ms") = t->timeout().count());
  });
  m.def("launch_env", []() {
    moedist::LaunchEnv e = moedist::launch_env();
    return py::dict(py::arg("found") = e.found, py::arg("rank") = e.rank, py::arg("world_size") = e.world_size,
                    py::arg("local_rank") = e.local_rank, py::arg("job") = e.job, py::arg("launcher") = e.launcher);
  });
  // Failover (moedist/elastic.h).
  m.def(
      "recover_group",
      [](const std::string& name, int64_t rank) {
        moedist::RecoveryResult r;
        {
          py::gil_scoped_release nogil;
          r = moedist::recover_group(name, rank);
        }
        return py::make_tuple(r.failed, r.generation, r.calls_completed, r.newly_failed);
      },
      py::arg("name"), py::arg("rank"),
      "Collective among the surviving ranks after a failure: (failed, generation, calls_completed, newly_failed)");
  m.def("query_active_mask", &moedist::query_active_mask, py::arg("name"), py::arg("rank"),
        "The failed ranks agreed so far (1 = failed), read locally");
  m.def("make_elastic_info", &moedist::make_elastic_info, py::arg("failed"), py::arg("shared_expert_rank_num"),
        py::arg("local_expert_num"), py::arg("shared_expert_num") = 1);
  m.def("remap_expert_ids", &moedist::remap_expert_ids, py::arg("ids"), py::arg("failed"), py::arg("shared_expert_rank_num"),
        py::arg("local_expert_num"), py::arg("replacements") = std::map<int32_t, int32_t>{});
}
