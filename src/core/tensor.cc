#include "moedist/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "moedist/error.h"

namespace moedist {

size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::kBFloat16:
    case DType::kFloat16: return 2;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
    case DType::kInt8:
    case DType::kBool: return 1;
  }
  return 0;
}

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kFloat32: return "float32";
    case DType::kInt8: return "int8";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kBool: return "bool";
  }
  return "?";
}

TensorView::TensorView(const void* d, DType dt, std::vector<int64_t> sh, std::vector<int64_t> st)
    : data(d), dtype(dt), shape(std::move(sh)), strides(std::move(st)) {}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

int64_t TensorView::stride(int64_t d) const {
  if (!strides.empty()) return strides.at(static_cast<size_t>(d));
  int64_t s = 1;
  for (size_t i = static_cast<size_t>(d) + 1; i < shape.size(); ++i) s *= shape[i];
  return s;
}

bool TensorView::is_contiguous() const {
  if (strides.empty()) return true;
  int64_t expect = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && strides[i] != expect) return false;
    expect *= shape[i];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream os;
  os << '(';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ',';
  os << ')';
  return os.str();
}

const void* TensorView::at(std::initializer_list<int64_t> idx) const {
  int64_t off = 0;
  int64_t d = 0;
  for (int64_t i : idx) off += i * stride(d++);
  return static_cast<const unsigned char*>(data) + off * static_cast<int64_t>(dtype_size(dtype));
}

Tensor::Tensor(DType dtype, std::vector<int64_t> shape) : dtype_(dtype), shape_(std::move(shape)) {
  // calloc: large buffers come as fresh zero pages, so rows that are never written cost nothing.
  size_t bytes = nbytes();
  void* p = std::calloc(bytes ? bytes : 1, 1);
  if (!p) throw Error(detail::str_cat("moedist: out of memory allocating ", bytes, " bytes"));
  storage_ = std::shared_ptr<unsigned char>(static_cast<unsigned char*>(p), [](unsigned char* q) { std::free(q); });
}

Tensor::Tensor(DType dtype, std::vector<int64_t> shape, std::shared_ptr<unsigned char> storage)
    : dtype_(dtype), shape_(std::move(shape)), storage_(std::move(storage)) {
  MOEDIST_ASSERT(storage_ != nullptr || nbytes() == 0, "tensor without storage");
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return n;
}

TensorView Tensor::view() const { return TensorView(data(), dtype_, shape_); }

namespace detail {
void internal_error(const char* file, int line, const char* cond, const std::string& msg) {
  throw Error(str_cat("moedist internal error, please report: ", cond, " failed at ", file, ":", line,
                      msg.empty() ? "" : ": ", msg));
}
}  // namespace detail

}  // namespace moedist
