// Host API of the projector epilogue kernels (projector.cu): the `cuda` backend's "cuBLAS GEMMs +
// fused CUDA epilogue" projector. The GEMMs run in Python (torch.addmm / torch.mm, i.e. cuBLAS);
// these kernels are the one memory-bound pass that follows each GEMM:
//
//   gelu_pool_forward  h = GELU(pre) (exact erf, fp32 math, stored in pre's dtype) and, in the same
//                      pass, the per-sample sums of the valid rows of the *stored* h (fp32):
//                      REGAP's pooled hidden state at no extra pass over [M, N].
//   dgelu_backward     dpre = (dh + vec[r / rows_per_sample] on valid rows) * GELU'(pre) (fp32 math,
//                      stored in pre's dtype) and, in the same pass, db = column sums of the stored
//                      dpre (fp32): REGAP's broadcast gradient and the bias gradient at no extra pass.
//   mean_split         x = v[b] / n[b] (fp32, correctly rounded) as hi = T(x) and lo = T(x - hi) rows:
//                      how an fp32 per-sample vector meets a 16-bit weight in a GEMM with fp32 output.
//
// Rows are the flattened B * Ni image tokens; row r belongs to sample r / rows_per_sample. All sums
// are deterministic (fixed-order partial sums and a small finish kernel; no atomics). Raw pointers,
// element strides, no torch types: bindings.cpp turns tensors into these structs and allocates
// every buffer. Every function only enqueues work on `stream` and returns the first CUDA error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.h"

namespace regap {

// --------------------------------------------------------------------------------------------------
// forward: h = GELU(pre) + pooled sums
// --------------------------------------------------------------------------------------------------

struct GeluPoolArgs {
  // [rows, cols] matrices with unit column stride; the row strides are free (any value).
  const void* pre = nullptr;
  int64_t pre_stride = 0;
  void* h = nullptr;  // output, same dtype as pre; must not overlap pre
  int64_t h_stride = 0;
  int64_t rows = 0, cols = 0;
  // [rows] bytes (nonzero = the row is pooled), any stride; nullptr: every row is pooled
  const uint8_t* mask = nullptr;
  int64_t mask_stride = 0;
  int64_t rows_per_sample = 1;  // >= 1 when pooled
  int64_t batch = 0;            // samples of `pooled`; rows of samples >= batch are not pooled
  // [batch, cols] fp32, contiguous, 16-byte aligned: every element is written (0 for a sample
  // with no valid row). nullptr: no pooling (h only).
  float* pooled = nullptr;
};

// How the pass is cut into work. The caller allocates partial_rows() * cols fp32 (contiguous,
// 16-byte aligned) for the fp32 partial sums when partial_rows() > 0.
struct GeluPoolPlan {
  int vec = 1;                // elements per vector load/store (1 = scalar path)
  bool warp_samples = false;  // few rows per sample: each warp owns whole samples
  int64_t sample_rows = 1;    // rows_per_sample, or `rows` without pooling (one "sample")
  int64_t samples = 0;        // samples that own rows: ceil(rows / sample_rows)
  int64_t pool_samples = 0;   // samples that get sums: min(batch, samples); 0 without pooling
  int64_t pieces = 1;         // > 1: each sample is cut into `pieces` chunks of piece_rows rows
  int64_t piece_rows = 0;
  int64_t chunk_samples = 1;  // pieces == 1: whole samples per chunk (a multiple of 8 with warp_samples)
  int64_t chunks = 0;         // chunks of rows (grid.y)
  int64_t partial_rows() const { return pieces > 1 ? pool_samples * pieces : 0; }
};

// Needs the current device (SM count, occupancy).
cudaError_t plan_gelu_pool(const GeluPoolArgs& args, DType dtype, GeluPoolPlan* plan);

cudaError_t gelu_pool_forward(const GeluPoolArgs& args, DType dtype, const GeluPoolPlan& plan, float* partial,
                              cudaStream_t stream);

// --------------------------------------------------------------------------------------------------
// backward: dpre = (dh + vec[sample]) * GELU'(pre) + db
// --------------------------------------------------------------------------------------------------

struct DGeluArgs {
  // [rows, cols], unit column stride, all three of one dtype. dpre may be dh itself (in place:
  // then with the same row stride); it must not overlap pre or dh otherwise.
  const void* dh = nullptr;
  int64_t dh_stride = 0;
  const void* pre = nullptr;
  int64_t pre_stride = 0;
  void* dpre = nullptr;
  int64_t dpre_stride = 0;
  int64_t rows = 0, cols = 0;
  const uint8_t* mask = nullptr;  // [rows] bytes, any stride; nullptr: every row is valid
  int64_t mask_stride = 0;
  int64_t rows_per_sample = 1;  // >= 1 when vec is given
  // [vec_rows, cols] fp32, any strides, or nullptr: added to the valid rows of each sample
  // (rows of samples >= vec_rows get nothing)
  const float* vec = nullptr;
  int64_t vec_rows = 0, vec_stride_b = 0, vec_stride_n = 0;
  float* dbias = nullptr;  // [cols] fp32 (contiguous) column sums of dpre, or nullptr
};

struct DGeluPlan {
  int vec = 1;
  int64_t chunk_rows = 0, chunks = 0;
  bool dbias = false;
  // fp32 [partial_rows(), cols] (contiguous) the caller allocates when > 0
  int64_t partial_rows() const { return dbias && chunks > 1 ? chunks : 0; }
};

cudaError_t plan_dgelu(const DGeluArgs& args, DType dtype, DGeluPlan* plan);

cudaError_t dgelu_backward(const DGeluArgs& args, DType dtype, const DGeluPlan& plan, float* partial,
                           cudaStream_t stream);

// --------------------------------------------------------------------------------------------------
// mean_split: out[b] = T(x), out[batch + b] = T(x - out[b]) with x = v[b] / counts[b]
// --------------------------------------------------------------------------------------------------

struct MeanSplitArgs {
  const float* v = nullptr;  // [batch, cols] fp32, any strides
  int64_t v_stride_b = 0, v_stride_n = 0;
  const float* counts = nullptr;  // [batch] fp32, any stride; nullptr: x = v (0 counts give x = 0)
  int64_t counts_stride = 0;
  int64_t batch = 0, cols = 0;
  void* out = nullptr;  // [(split ? 2 : 1) * batch, cols], contiguous, of the output dtype
  bool split = true;    // false (fp32 output): only out[b] = x
};

cudaError_t mean_split(const MeanSplitArgs& args, DType dtype, cudaStream_t stream);

}  // namespace regap
