// Tensor views (non-owning, strided: inputs) and tensors (owning, contiguous: outputs).
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace moedist {

enum class DType : int { kBFloat16, kFloat16, kFloat32, kInt8, kInt32, kInt64, kBool };

size_t dtype_size(DType dt);
const char* dtype_name(DType dt);  // "bfloat16", "float16", "float32", "int8", "int32", "int64", "bool"

// A non-owning view of an n-dimensional array. Strides are in elements; an empty strides vector
// means contiguous (row-major). A view whose data is null is "absent" (Python None).
struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;

  TensorView() = default;
  TensorView(const void* data, DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides = {});

  bool defined() const { return data != nullptr || !shape.empty(); }
  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t size(int64_t d) const { return shape.at(static_cast<size_t>(d)); }
  int64_t numel() const;
  int64_t stride(int64_t d) const;  // effective stride (computed when strides is empty)
  bool is_contiguous() const;
  std::string shape_str() const;  // "(4, 7168)"
  // Address of the element at a multi-index.
  const void* at(std::initializer_list<int64_t> idx) const;
};

// An owning, contiguous tensor.
class Tensor {
 public:
  Tensor() = default;
  // Zero-initialised.
  Tensor(DType dtype, std::vector<int64_t> shape);
  // Over existing storage of at least numel * dtype_size bytes (contents as they are).
  Tensor(DType dtype, std::vector<int64_t> shape, std::shared_ptr<unsigned char> storage);

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t size(int64_t d) const { return shape_.at(static_cast<size_t>(d)); }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  bool defined() const { return storage_ != nullptr || numel() == 0; }

  void* data() { return storage_.get(); }
  const void* data() const { return storage_.get(); }
  template <typename T>
  T* data_as() { return static_cast<T*>(data()); }
  template <typename T>
  const T* data_as() const { return static_cast<const T*>(data()); }
  TensorView view() const;
  operator TensorView() const { return view(); }  // NOLINT: tensors pass where views are taken

 private:
  DType dtype_ = DType::kFloat32;
  std::vector<int64_t> shape_;
  std::shared_ptr<unsigned char> storage_;
};

}  // namespace moedist
