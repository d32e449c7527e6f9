// Host API of the caption-side pooling kernel (text_pool.cu): an embedding-bag mean. For each
// sample b, the mean over its valid tokens t of the embedding rows weight[ids[b, t], :] in fp32,
// and 1 / (number of valid tokens) (0 and 0 for a sample with none), without materialising the
// [B, T, D] caption embeddings: each valid token's row is read once. Same contract as
// regap_fast/kernels/gap_loss.py `gather_mean_forward` and regap_fast/reference.py.
//
// Raw pointers and element strides, no torch types (bindings.cpp allocates every buffer). Ids are
// not range-checked (as nn.Embedding on the GPU): the caller guarantees 0 <= id < V.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.h"

namespace regap {

struct GatherArgs {
  const void* ids = nullptr;  // [batch, tokens] int32 or int64, any strides
  bool ids_int64 = true;
  int64_t ids_stride_b = 0, ids_stride_t = 0;
  const void* weight = nullptr;  // [V, dim], any strides
  int64_t weight_rows = 0;       // V (only used to choose the vector width)
  int64_t weight_stride_v = 0, weight_stride_d = 0;
  int64_t batch = 0, tokens = 0, dim = 0;
  const uint8_t* mask = nullptr;  // [batch, tokens] bytes (nonzero = the token counts), or nullptr
  int64_t mask_stride_b = 0, mask_stride_t = 0;
};

// Tokens are cut into `chunks` chunks per sample when the batch alone would not fill the GPU; then
// the caller allocates fp32 partial sums [batch, chunks, dim] and uint32 counts [batch, chunks]
// (both contiguous), which a small finish kernel adds up in a fixed order.
struct GatherPlan {
  int vec = 1;  // elements per vector load of a weight row (1 = scalar path)
  int64_t chunk_tokens = 0, chunks = 1;
  bool needs_partial() const { return chunks > 1; }
};

cudaError_t plan_gather_mean(const GatherArgs& args, DType dtype, GatherPlan* plan);

// mean [batch, dim] and inv_count [batch], fp32, contiguous.
cudaError_t gather_mean_forward(const GatherArgs& args, DType dtype, const GatherPlan& plan, float* partial,
                                unsigned* counts, float* mean, float* inv_count, cudaStream_t stream);

}  // namespace regap
