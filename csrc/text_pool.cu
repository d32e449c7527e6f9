// The caption side of REGAP from token ids (the `cuda` backend's text_pool family): an
// embedding-bag mean, mean[b] = sum over valid t of weight[ids[b, t]] / n_b (see text_pool.h).
//
// gather_pool_kernel    grid = (column strips, token chunks, batch). A block is 8 warps; a warp spans
//                       32 * VEC consecutive columns (16-byte vectors when the table's rows allow it)
//                       and takes every 8th token of the block's chunk. Lane k reads the id and mask
//                       byte of token t0 + 8k, a ballot lists the valid ones, and the warp then loads
//                       only those rows, kUnroll at a time (ids broadcast with a shuffle). The 8 warps'
//                       sums are added in a fixed order through shared memory. With one chunk per
//                       sample (the usual case: many captions, short ones) the block writes the mean
//                       and 1/n directly; otherwise fp32 partial sums and counts per chunk, and
//                       gather_finish_kernel adds them in chunk order. No atomics: reproducible.
//
// Table rows are read with ordinary (L2-cached) loads, not streaming ones: frequent tokens repeat
// across captions. Masked-out tokens are never read (neither their id nor their row).

#include <algorithm>

#include "common.cuh"
#include "text_pool.h"

namespace regap {
namespace {

// 4 blocks (32 warps) per SM, at most 64 registers: with that budget ptxas issues all kUnroll row
// loads before the first add (sm_90, CUDA 13.0); left free it aims at 64 warps, caps itself at 32
// registers and serialises the loads (one row in flight per warp).
// Grid sizing as in gap_loss.cu's pooling pass: about one wave (kWaves); a chunk is never shorter than
// kMinChunkTokens (each chunk costs an fp32 partial row).
constexpr int kMinBlocks = 4, kFinishThreads = 256, kWaves = 1;
constexpr int64_t kMinChunkTokens = 64;

struct GatherParams {
  const void* ids;
  int64_t ids_stride_b, ids_stride_t;
  const void* weight;
  int64_t weight_stride_v, weight_stride_d;
  int64_t batch, tokens, dim;
  const uint8_t* mask;
  int64_t mask_stride_b, mask_stride_t;
  int64_t chunk_tokens, chunks;
};

// VEC elements of a table row through the read-only path (normal caching)
template <typename T, int VEC>
__device__ __forceinline__ RawVec<T, VEC> load_row(const T* p) {
  return __ldg(reinterpret_cast<const RawVec<T, VEC>*>(p));
}

template <typename T, typename IdT, int VEC>
__global__ void __launch_bounds__(kRowThreads, kMinBlocks) gather_pool_kernel(GatherParams p, float* __restrict__ partial,
                                                               unsigned* __restrict__ counts, float* __restrict__ mean,
                                                               float* __restrict__ inv_count) {
  __shared__ float scratch[kRowGroups][kWarpSize * VEC];
  __shared__ unsigned count_scratch[kRowGroups];
  wait_for_previous_grid();
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t col0 = int64_t(blockIdx.x) * kWarpSize * VEC;
  const int64_t col = col0 + int64_t(lane) * VEC;
  const bool col_ok = col < p.dim;  // VEC > 1 only when dim % VEC == 0
  const int64_t cols_here = min(int64_t(kWarpSize * VEC), p.dim - col0);  // <= 0 only for dim == 0
  const T* w = static_cast<const T*>(p.weight) + (col_ok ? col : 0) * p.weight_stride_d;
  const int64_t chunk = blockIdx.y;
  const int64_t begin = chunk * p.chunk_tokens;
  const int64_t end = min(begin + p.chunk_tokens, p.tokens);

  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {  // grid.z is capped at 65535
    const IdT* ids = static_cast<const IdT*>(p.ids) + b * p.ids_stride_b;
    const uint8_t* mask = p.mask == nullptr ? nullptr : p.mask + b * p.mask_stride_b;
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
    unsigned count = 0;  // valid tokens seen by this warp (the same in every lane)

    for (int64_t t0 = begin + warp; t0 < end; t0 += int64_t(kWarpSize) * kRowGroups) {
      const int64_t t = t0 + int64_t(lane) * kRowGroups;
      const bool ok = t < end && (mask == nullptr || mask[t * p.mask_stride_t] != 0);
      const long long id = ok ? static_cast<long long>(ids[t * p.ids_stride_t]) : 0;
      unsigned pending = __ballot_sync(0xffffffffu, ok);
      count += __popc(pending);
      while (pending != 0) {  // warp-uniform; kUnroll row loads are issued before any is used
        RawVec<T, VEC> raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int k = __ffs(pending) - 1;  // -1 once the list is used up
          pending &= pending - 1;
          const long long row = __shfl_sync(0xffffffffu, id, k >= 0 ? k : 0);
          raw[u] = (k >= 0 && col_ok) ? load_row<T, VEC>(w + row * p.weight_stride_v) : zero_raw<T, VEC>();
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) accumulate<T, VEC>(acc, raw[u]);
      }
    }

    // the 8 warps' sums and counts, added in a fixed order
#pragma unroll
    for (int i = 0; i < VEC; ++i) scratch[warp][lane * VEC + i] = acc[i];
    if (lane == 0) count_scratch[warp] = count;
    __syncthreads();
    unsigned total = 0;
#pragma unroll
    for (int g = 0; g < kRowGroups; ++g) total += count_scratch[g];

    for (int64_t c = threadIdx.x; c < cols_here; c += kRowThreads) {
      float s = scratch[0][c];
#pragma unroll
      for (int g = 1; g < kRowGroups; ++g) s += scratch[g][c];
      if (p.chunks == 1)
        mean[b * p.dim + col0 + c] = mean_from_sum(s, total);
      else
        partial[(b * p.chunks + chunk) * p.dim + col0 + c] = s;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      if (p.chunks == 1)
        inv_count[b] = inv_or_zero(total);
      else
        counts[b * p.chunks + chunk] = total;
    }
    __syncthreads();  // scratch is reused for the next sample
  }
}

// mean[b, c] = (sum over chunks, in order, of partial[b, chunk, c]) / n_b
__global__ void __launch_bounds__(kFinishThreads)
    gather_finish_kernel(const float* __restrict__ partial, const unsigned* __restrict__ counts, int64_t chunks,
                         int64_t batch, int64_t dim, float* __restrict__ mean, float* __restrict__ inv_count) {
  __shared__ unsigned long long scratch[kFinishThreads / kWarpSize];
  wait_for_previous_grid();
  const int64_t c = int64_t(blockIdx.x) * kFinishThreads + threadIdx.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    unsigned long long n = 0;
    for (int64_t j = threadIdx.x; j < chunks; j += kFinishThreads) n += counts[b * chunks + j];
    n = block_sum<kFinishThreads>(n, scratch);
    if (c < dim) {
      const float* src = partial + b * chunks * dim + c;
      float s = 0.0f;
#pragma unroll 4
      for (int64_t j = 0; j < chunks; ++j) s += src[j * dim];
      mean[b * dim + c] = mean_from_sum(s, n);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) inv_count[b] = inv_or_zero(n);
  }
}

int64_t column_strips(int64_t dim, int vec) { return ceil_div(dim, int64_t(kWarpSize) * vec); }

// Calls f(IdT{}) with the ids' element type.
template <typename F>
cudaError_t dispatch_ids(bool int64_ids, F&& f) {
  if (int64_ids) return f(int64_t{});
  return f(int32_t{});
}

}  // namespace

cudaError_t plan_gather_mean(const GatherArgs& a, DType dtype, GatherPlan* plan) {
  *plan = GatherPlan{};
  if (a.batch < 0 || a.tokens < 0 || a.dim < 0) return cudaErrorInvalidValue;
  plan->vec = max_vector_width(a.weight, element_size(dtype), 1, a.weight_rows, a.dim, 0, a.weight_stride_v,
                               a.weight_stride_d);
  plan->chunk_tokens = std::max<int64_t>(a.tokens, 1);
  plan->chunks = 1;
  if (a.batch == 0 || a.tokens == 0 || a.dim == 0) return cudaSuccess;
  int sms = 0, resident = 0;
  REGAP_RETURN_IF_ERROR(current_sm_count(&sms));
  REGAP_RETURN_IF_ERROR(dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_ids(a.ids_int64, [&](auto id_tag) {
      using IdT = decltype(id_tag);
      return dispatch_vec<T>(plan->vec, [&](auto vec_c) {
        return resident_blocks<gather_pool_kernel<T, IdT, decltype(vec_c)::value>, kRowThreads>(&resident);
      });
    });
  }));
  const int64_t blocks_per_sample = std::max<int64_t>(1, a.batch * column_strips(a.dim, plan->vec));
  const int64_t per_sample = std::clamp<int64_t>(int64_t(sms) * resident * kWaves / blocks_per_sample, 1, 4096);
  const int64_t chunk = ceil_div(ceil_div(a.tokens, per_sample), kRowGroups) * kRowGroups;
  plan->chunk_tokens = std::max(chunk, kMinChunkTokens);
  plan->chunks = ceil_div(a.tokens, plan->chunk_tokens);
  return cudaSuccess;
}

cudaError_t gather_mean_forward(const GatherArgs& a, DType dtype, const GatherPlan& plan, float* partial,
                                unsigned* counts, float* mean, float* inv_count, cudaStream_t stream) {
  if (a.batch < 0 || a.tokens < 0 || a.dim < 0 || plan.chunks < 1 || plan.chunk_tokens < 1)
    return cudaErrorInvalidValue;
  if (a.tokens >= int64_t(UINT32_MAX)) return cudaErrorInvalidValue;  // counts are 32-bit
  if (plan.chunks > 1 && (partial == nullptr || counts == nullptr)) return cudaErrorInvalidValue;
  if (a.batch == 0) return cudaSuccess;
  const GatherParams p{a.ids,    a.ids_stride_b,  a.ids_stride_t,  a.weight,        a.weight_stride_v,
                       a.weight_stride_d, a.batch, a.tokens, a.dim, a.mask, a.mask_stride_b, a.mask_stride_t,
                       plan.chunk_tokens, plan.chunks};
  const unsigned grid_b = unsigned(std::min(a.batch, kMaxGridYZ));
  REGAP_RETURN_IF_ERROR(dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_ids(a.ids_int64, [&](auto id_tag) {
      using IdT = decltype(id_tag);
      return dispatch_vec<T>(plan.vec, [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        // at least one column block: with dim == 0 the kernel still writes inv_count
        const dim3 grid(unsigned(std::max<int64_t>(1, column_strips(a.dim, VEC))), unsigned(plan.chunks), grid_b);
        return launch(gather_pool_kernel<T, IdT, VEC>, grid, kRowThreads, stream, p, partial, counts, mean,
                      inv_count);
      });
    });
  }));
  if (plan.chunks == 1) return cudaSuccess;
  const dim3 grid(unsigned(std::max<int64_t>(1, ceil_div(a.dim, kFinishThreads))), grid_b);
  return launch(gather_finish_kernel, grid, kFinishThreads, stream, partial, counts, plan.chunks, a.batch, a.dim,
                mean, inv_count);
}

}  // namespace regap
