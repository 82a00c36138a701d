// The element types the CUDA launchers accept (ops.cpp maps torch dtypes onto these).
#pragma once

namespace hrm {

enum class DType { kFloat32, kFloat16, kBFloat16 };

}  // namespace hrm
