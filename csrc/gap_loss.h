// Host API of the REGAP pooling / gap-loss kernels (gap_loss.cu). Raw pointers, element strides,
// no torch types: bindings.cpp turns tensors into these structs and allocates every buffer.
//
// Contracts are those of regap_fast/kernels/gap_loss.py (and regap_fast/reference.py):
//   gap_loss_forward   -> loss, direction = dgap/d(mu_a - mu_t) [B, D], stats [3, B]
//   masked_mean_forward -> mean [B, D], 1/n [B]
//   broadcast_rows     -> the backward: one vector per sample written to every valid row.
// Every function only enqueues work on `stream` and returns the first CUDA error it meets.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.h"

namespace regap {

// One [B, N, D] token tensor (strides in elements, any values) and its optional [B, N] mask.
struct TokenSide {
  const void* data = nullptr;
  int64_t rows = 0;  // N
  int64_t stride_b = 0, stride_n = 0, stride_d = 0;
  const uint8_t* mask = nullptr;  // nonzero byte = the token counts; nullptr = every token counts
  int64_t mask_stride_b = 0, mask_stride_n = 0;
};

// How the pooling pass splits the tokens into chunks. The caller allocates the fp32 partial sums
// [B, slots(), D] (contiguous) that the pass writes: chunks of side a first, then side t.
struct PoolPlan {
  int64_t chunk_rows = 0;
  int64_t chunks_a = 0, chunks_t = 0;
  int vec_a = 1, vec_t = 1;  // elements per vector load of each side (1 = scalar path)
  int64_t slots() const { return chunks_a + chunks_t; }
};

// `t` may be nullptr (masked_mean: one side only). Needs the current device (queries its SM count).
cudaError_t plan_pool(const TokenSide& a, const TokenSide* t, int64_t batch, int64_t dim, DType dtype,
                      PoolPlan* plan);

enum class Reduction : int { kNone = 0, kSum = 1, kMean = 2 };

// The gap loss forward. Outputs (fp32, contiguous): direction [B, D]; gaps [B]; stats [3, B] with
// rows 1/n_image, 1/n_text (0 for an empty side) and the per-sample weight of the backward (valid
// flag; valid / max(n_valid, 1) for kMean); loss: a scalar for kSum / kMean (unused for kNone,
// where `gaps` is the loss).
cudaError_t gap_loss_forward(const TokenSide& image, const TokenSide& text, int64_t batch, int64_t dim,
                             DType dtype, Reduction reduction, bool squared, const PoolPlan& plan,
                             float* partial, float* direction, float* gaps, float* stats, float* loss,
                             cudaStream_t stream);

// Masked mean over tokens: mean [B, D] and inv_count [B] (fp32, contiguous). Plan with t = nullptr.
cudaError_t masked_mean_forward(const TokenSide& x, int64_t batch, int64_t dim, DType dtype, const PoolPlan& plan,
                                float* partial, float* mean, float* inv_count, cudaStream_t stream);

// The per-sample vector of the backward and its per-sample scale factors (fp32; a stride of 0
// broadcasts one value over the batch).
struct BroadcastVector {
  const float* v = nullptr;  // [B, D]
  int64_t stride_b = 0, stride_d = 0;
  const float* g = nullptr;  // [B] incoming gradient
  int64_t g_stride = 0;
  const float* w = nullptr;  // [B] per-sample weight
  int64_t w_stride = 0;
};

// One output of broadcast_rows: a contiguous [B, rows, D] tensor of the output dtype.
struct BroadcastSide {
  void* out = nullptr;  // nullptr: this side is not needed and nothing is launched for it
  int64_t rows = 0;     // N with a mask, 1 without
  const uint8_t* mask = nullptr;  // [B, rows], or nullptr: every row gets the vector
  int64_t mask_stride_b = 0, mask_stride_n = 0;
  const float* inv = nullptr;  // [B] 1/n of this side
  int64_t inv_stride = 0;
  float sign = 1.0f;
};

// out[b, n, :] = sign * g[b] * w[b] * inv[b] * v[b, :] on rows whose mask is set, 0 on the others,
// for both sides in one launch.
cudaError_t broadcast_rows(const BroadcastVector& vec, const BroadcastSide& a, const BroadcastSide& t, int64_t batch,
                           int64_t dim, DType dtype, cudaStream_t stream);

}  // namespace regap
