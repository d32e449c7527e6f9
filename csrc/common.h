// Host-side types shared by every kernel file and by bindings.cpp.
// Plain C++ (no CUDA device code, no torch): bindings.cpp is compiled by the host compiler.
#pragma once

#include <cstdint>

namespace regap {

// The element types the kernels read and write; bindings.cpp maps torch dtypes onto these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int element_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace regap
