// CUDA kernels of the REGAP gap loss and masked mean (the `cuda` backend). Same pass structure as
// the Triton kernels in kernels/gap_loss.py:
//
// forward   1. pool_partial_kernel  reads every valid token row of both sides once, fp32 partial
//                                    sums [B, S, D] (S token chunks per sample: small batches still
//                                    fill the GPU, and no atomics, so results are reproducible);
//           2. gap_finish_kernel    one block per sample: counts, means, gap, dgap/ddiff, stats;
//           3. gap_reduce_kernel    one block: sum / mean over valid samples in a fixed order.
// backward  broadcast_rows_kernel   writes coef[b] * v[b, :] to every valid row (0 to the others).
//
// Layout of the two row-streaming kernels: a block is 8 warps; a warp spans 32 * VEC consecutive
// columns (VEC elements per lane, 16-byte vectors when the rows allow it) and takes every 8th row
// of the block's token chunk. grid = (column blocks, chunks of side a + chunks of side t, batch).
// Masked-out rows are never loaded (padding may hold NaN). All offsets are int64. Every launch uses
// programmatic dependent launch on sm_90+ (common.cuh: launch()), so each kernel's start overlaps
// the previous kernel's tail.

#include <algorithm>

#include "common.cuh"
#include "gap_loss.h"

namespace regap {
namespace {

constexpr int kFinishThreads = 1024;  // one block per sample: D = 4096 is one float4 per thread
constexpr int kReduceThreads = 256;
constexpr int kMeanThreads = 256;
// Grid sizing: about this many times the blocks that fit on the GPU at once. Pooling: one wave.
// Each SM then has ~100 KB of loads in flight (6 blocks x 256 threads x 4 x 16 B), several times
// what saturates HBM, so bandwidth holds while the last blocks drain, and fewer chunks mean fewer
// fp32 partials. Measured on H100 at B=32, D=4096: 1 to 4 waves within 2%, 8 waves 3-5% slower.
// Broadcast: no partials to pay for, so finer chunks.
constexpr int kPoolWaves = 1;
constexpr int kBroadcastWaves = 4;
// A chunk adds one fp32 partial per column, written once and read back once: for a 64-row chunk of
// bf16 that is 1/16 of the bytes the chunk reads, so chunks are never shorter.
constexpr int64_t kMinPoolChunk = 64;
constexpr int64_t kMinBroadcastChunk = 32;

// ----------------------------------------------------------------------------------------------
// kernel arguments
// ----------------------------------------------------------------------------------------------

struct PoolSide {
  const void* data;
  const uint8_t* mask;  // nullptr: every row counts
  int64_t rows;
  int64_t stride_b, stride_n, stride_d;
  int64_t mask_stride_b, mask_stride_n;
  int64_t chunks;      // how many blockIdx.y values this side owns
  int64_t first_slot;  // where its chunks' partial sums go along S
};

struct MaskView {
  const uint8_t* mask;  // nullptr: all `rows` rows count
  int64_t rows;
  int64_t stride_b, stride_n;
};

struct RowsSide {
  void* out;  // contiguous [B, rows, D]
  const uint8_t* mask;
  int64_t rows;
  int64_t mask_stride_b, mask_stride_n;
  const float* inv;
  int64_t inv_stride;
  float sign;
  int64_t chunks;
};

// The valid rows among the next 32 that this warp handles (r0, r0 + 8, ..., r0 + 248), as a bit mask.
__device__ __forceinline__ unsigned valid_rows(int64_t r0, int64_t end, const uint8_t* mask_row,
                                               int64_t mask_stride_n) {
  return warp_valid_rows(r0, kRowGroups, ceil_div(end - r0, kRowGroups), mask_row, mask_stride_n);
}

// ----------------------------------------------------------------------------------------------
// 1. pooling: partial[b, slot, :] = sum of the valid rows of one token chunk
// ----------------------------------------------------------------------------------------------

template <typename T, int VEC>
__device__ __forceinline__ void pool_chunk(const PoolSide& s, int64_t b, int64_t chunk, int64_t chunk_rows,
                                           int64_t dim, int64_t num_slots, float* __restrict__ partial,
                                           float (*scratch)[kWarpSize * VEC]) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t col = (int64_t(blockIdx.x) * kWarpSize + lane) * VEC;
  const bool col_ok = col < dim;  // VEC > 1 only when dim % VEC == 0: a vector is all in or all out
  const T* x = static_cast<const T*>(s.data) + b * s.stride_b + (col_ok ? col : 0) * s.stride_d;
  const uint8_t* mask_row = s.mask == nullptr ? nullptr : s.mask + b * s.mask_stride_b;
  const int64_t begin = chunk * chunk_rows;
  const int64_t end = min(begin + chunk_rows, s.rows);

  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;

  for (int64_t r0 = begin + warp; r0 < end; r0 += kWarpSize * kRowGroups) {
    unsigned pending = valid_rows(r0, end, mask_row, s.mask_stride_n);
    while (pending != 0) {  // warp-uniform; kUnroll loads are issued before any is used
      RawVec<T, VEC> raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int k = __ffs(pending) - 1;  // -1 once the list is used up
        pending &= pending - 1;
        raw[u] = (k >= 0 && col_ok) ? load_stream<T, VEC>(x + (r0 + int64_t(k) * kRowGroups) * s.stride_n)
                                    : zero_raw<T, VEC>();
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) accumulate<T, VEC>(acc, raw[u]);
    }
  }

  // The 8 warps summed different rows of the same columns: add them in a fixed order.
#pragma unroll
  for (int i = 0; i < VEC; ++i) scratch[warp][lane * VEC + i] = acc[i];
  __syncthreads();
  float* out = partial + (b * num_slots + s.first_slot + chunk) * dim + int64_t(blockIdx.x) * kWarpSize * VEC;
  const int64_t cols_here = min(int64_t(kWarpSize * VEC), dim - int64_t(blockIdx.x) * kWarpSize * VEC);
  for (int c = threadIdx.x; c < cols_here; c += kRowThreads) {
    float sum = scratch[0][c];
#pragma unroll
    for (int w = 1; w < kRowGroups; ++w) sum += scratch[w][c];
    out[c] = sum;
  }
  __syncthreads();  // scratch is reused for the next sample of the batch loop
}

// 6 blocks per SM (at most 40 registers): ample loads in flight, and no spills on sm_80 either
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads, 6)
    pool_partial_kernel(PoolSide a, PoolSide t, int64_t batch, int64_t dim, int64_t chunk_rows, int64_t num_slots,
                        float* __restrict__ partial) {
  __shared__ float scratch[kRowGroups][kWarpSize * VEC];
  wait_for_previous_grid();
  // grid.z is capped at 65535: larger batches loop
  for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
    if (blockIdx.y < a.chunks)  // block-uniform: the barriers inside are safe
      pool_chunk<T, VEC>(a, b, blockIdx.y, chunk_rows, dim, num_slots, partial, scratch);
    else
      pool_chunk<T, VEC>(t, b, blockIdx.y - a.chunks, chunk_rows, dim, num_slots, partial, scratch);
  }
}

// ----------------------------------------------------------------------------------------------
// 2. per-sample finish
// ----------------------------------------------------------------------------------------------

// This thread's share of the valid rows of sample b, from row `first` on in steps of THREADS (0
// without a mask: the count is then m.rows).
template <int THREADS>
__device__ __forceinline__ unsigned long long thread_count(const MaskView& m, int64_t b, int64_t first) {
  unsigned long long count = 0;
  if (m.mask != nullptr) {
    const uint8_t* row = m.mask + b * m.stride_b;
    for (int64_t i = first; i < m.rows; i += THREADS) count += row[i * m.stride_n] != 0;
  }
  return count;
}

// Row threadIdx.x of the mask (0 past the end, or without a mask): loaded early, counted late.
__device__ __forceinline__ uint8_t first_mask_byte(const MaskView& m, int64_t b) {
  return (m.mask != nullptr && threadIdx.x < m.rows) ? m.mask[b * m.stride_b + threadIdx.x * m.stride_n] : 0;
}

// The number of valid rows of sample b; the whole block calls it and every thread gets the value.
template <int THREADS>
__device__ __forceinline__ unsigned long long valid_count(const MaskView& m, int64_t b, unsigned long long* scratch) {
  if (m.mask == nullptr) return m.rows;
  return block_sum<THREADS>(thread_count<THREADS>(m, b, threadIdx.x), scratch);
}

// acc += the `count` partial-sum rows at p, p + dim, ... (VEC fp32 each, aligned to VEC * 4 bytes)
template <int VEC>
__device__ __forceinline__ void add_partials(float (&acc)[VEC], const float* p, int64_t count, int64_t dim) {
#pragma unroll 4
  for (int64_t s = 0; s < count; ++s) accumulate<float, VEC>(acc, load_stream<float, VEC>(p + s * dim));
}

// The partial sums of one column vector: sa over the first chunks_a slots (side a), st over the rest.
template <int VEC>
__device__ __forceinline__ void sum_partials(const float* part, int64_t c, int64_t num_slots, int64_t chunks_a,
                                             int64_t dim, float (&sa)[VEC], float (&st)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) sa[i] = st[i] = 0.0f;
  // one loop over the slots of both sides: their loads can all be in flight at once
#pragma unroll 4
  for (int64_t s = 0; s < num_slots; ++s) {
    const RawVec<float, VEC> r = load_stream<float, VEC>(part + s * dim + c);
    if (s < chunks_a)
      accumulate<float, VEC>(sa, r);
    else
      accumulate<float, VEC>(st, r);
  }
}

// mu_a - mu_t for one column vector, and its contribution to the squared norm
template <int VEC>
__device__ __forceinline__ void mean_difference(float (&sa)[VEC], const float (&st)[VEC], unsigned long long n_a,
                                                unsigned long long n_t, bool valid, float* sumsq) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    // two correctly rounded means: equal means give exactly 0 (a zero gap has zero gradient)
    sa[i] = valid ? __fsub_rn(mean_from_sum(sa[i], n_a), mean_from_sum(st[i], n_t)) : 0.0f;
    *sumsq += sa[i] * sa[i];
  }
}

// One block per sample. VEC = 4 when D % 4 == 0 (rows of our own fp32 buffers are then 16-byte
// aligned), else 1. GROUPS > 0 needs D <= GROUPS * kFinishThreads * VEC: each thread keeps its
// column vectors in registers from the partial sums to the direction (one pass over memory);
// GROUPS == 0 takes any D: the difference is parked in `direction` and rescaled in a second pass.
template <int VEC, int GROUPS>
__global__ void __launch_bounds__(kFinishThreads)
    gap_finish_kernel(const float* __restrict__ partial, int64_t num_slots, int64_t chunks_a, MaskView mask_a,
                      MaskView mask_t, int64_t batch, int64_t dim, bool squared, float* __restrict__ direction,
                      float* __restrict__ gaps, float* __restrict__ stats) {
  __shared__ unsigned long long count_scratch[kFinishThreads / kWarpSize];
  __shared__ float sum_scratch[kFinishThreads / kWarpSize];
  wait_for_previous_grid();
  const int64_t b = blockIdx.x;
  const float* part = partial + b * num_slots * dim;
  float* dir = direction + b * dim;
  auto column = [](int g) { return (int64_t(g) * kFinishThreads + threadIdx.x) * VEC; };

  // Latency chain, not bandwidth, sets this kernel's time: the first mask bytes and the partial
  // sums are loaded before anything waits on either.
  const uint8_t first_a = first_mask_byte(mask_a, b);
  const uint8_t first_t = first_mask_byte(mask_t, b);
  constexpr int kHeld = GROUPS > 0 ? GROUPS : 1;
  float sa[kHeld][VEC], st[kHeld][VEC];
  if constexpr (GROUPS > 0) {
#pragma unroll
    for (int g = 0; g < GROUPS; ++g)
      if (column(g) < dim) sum_partials<VEC>(part, column(g), num_slots, chunks_a, dim, sa[g], st[g]);
  }

  // both sides' valid-row counts in one block reduction, packed into the low and high 32 bits (the
  // host checks that a masked side has fewer than 2^32 rows)
  unsigned long long packed = (thread_count<kFinishThreads>(mask_a, b, threadIdx.x + kFinishThreads) + (first_a != 0)) |
                              ((thread_count<kFinishThreads>(mask_t, b, threadIdx.x + kFinishThreads) + (first_t != 0))
                               << 32);
  if (mask_a.mask != nullptr || mask_t.mask != nullptr) packed = block_sum<kFinishThreads>(packed, count_scratch);
  const unsigned long long n_a = mask_a.mask != nullptr ? packed & 0xffffffffull : (unsigned long long)mask_a.rows;
  const unsigned long long n_t = mask_t.mask != nullptr ? packed >> 32 : (unsigned long long)mask_t.rows;
  const bool valid = n_a > 0 && n_t > 0;

  float sumsq = 0.0f;
  if constexpr (GROUPS > 0) {
#pragma unroll
    for (int g = 0; g < GROUPS; ++g)
      if (column(g) < dim) mean_difference<VEC>(sa[g], st[g], n_a, n_t, valid, &sumsq);
  } else {
    for (int64_t c = column(0); c < dim; c += int64_t(kFinishThreads) * VEC) {
      sum_partials<VEC>(part, c, num_slots, chunks_a, dim, sa[0], st[0]);
      mean_difference<VEC>(sa[0], st[0], n_a, n_t, valid, &sumsq);
      *reinterpret_cast<RawVec<float, VEC>*>(dir + c) = pack<float, VEC>(sa[0]);
    }
  }
  const float sq = block_sum<kFinishThreads>(sumsq, sum_scratch);
  const float gap = squared ? sq : sqrtf(sq);
  // dgap/ddiff: 2 diff for the squared distance, diff / gap for the distance (0 at a zero gap)
  const float scale = squared ? 2.0f : (gap > 0.0f ? 1.0f / gap : 0.0f);
  if constexpr (GROUPS > 0) {
#pragma unroll
    for (int g = 0; g < GROUPS; ++g) {
      if (column(g) < dim) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) sa[g][i] *= scale;
        *reinterpret_cast<RawVec<float, VEC>*>(dir + column(g)) = pack<float, VEC>(sa[g]);
      }
    }
  } else {
    // each thread rescales the columns it wrote itself above: no barrier needed
    for (int64_t c = column(0); c < dim; c += int64_t(kFinishThreads) * VEC) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) dir[c + i] *= scale;
    }
  }
  if (threadIdx.x == 0) {
    gaps[b] = gap;
    stats[b] = inv_or_zero(n_a);
    stats[batch + b] = inv_or_zero(n_t);
    stats[2 * batch + b] = valid ? 1.0f : 0.0f;
  }
}

// ----------------------------------------------------------------------------------------------
// 3. reduction over the batch (one block, fixed order)
// ----------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kReduceThreads)
    gap_reduce_kernel(const float* __restrict__ gaps, float* __restrict__ stats, float* __restrict__ loss,
                      int64_t batch, bool mean) {
  __shared__ float scratch[kReduceThreads / kWarpSize];
  wait_for_previous_grid();
  float total = 0.0f, count = 0.0f;
  for (int64_t i = threadIdx.x; i < batch; i += kReduceThreads) {
    total += gaps[i];                // 0 for samples that are not valid
    count += stats[2 * batch + i];  // the valid flags
  }
  total = block_sum<kReduceThreads>(total, scratch);
  if (!mean) {
    if (threadIdx.x == 0) *loss = total;
    return;
  }
  count = block_sum<kReduceThreads>(count, scratch);
  const float inv = 1.0f / fmaxf(count, 1.0f);
  if (threadIdx.x == 0) *loss = total * inv;
  // the weight of each sample in the backward: valid / n_valid (each thread rewrites what it read)
  for (int64_t i = threadIdx.x; i < batch; i += kReduceThreads) stats[2 * batch + i] *= inv;
}

// ----------------------------------------------------------------------------------------------
// masked_mean finish: out[b, :] = (sum of the partials) / n
// ----------------------------------------------------------------------------------------------

template <int VEC>
__global__ void __launch_bounds__(kMeanThreads)
    mean_finish_kernel(const float* __restrict__ partial, int64_t num_slots, MaskView mask, int64_t batch,
                       int64_t dim, float* __restrict__ out, float* __restrict__ inv_out) {
  __shared__ unsigned long long scratch[kMeanThreads / kWarpSize];
  wait_for_previous_grid();
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const unsigned long long n = valid_count<kMeanThreads>(mask, b, scratch);  // recounted per column block: N bytes
    const int64_t c = (int64_t(blockIdx.x) * kMeanThreads + threadIdx.x) * VEC;
    if (c < dim) {
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
      add_partials<VEC>(acc, partial + b * num_slots * dim + c, num_slots, dim);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = mean_from_sum(acc[i], n);
      *reinterpret_cast<RawVec<float, VEC>*>(out + b * dim + c) = pack<float, VEC>(acc);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) inv_out[b] = inv_or_zero(n);
  }
}

// ----------------------------------------------------------------------------------------------
// backward: out[b, n, :] = sign * g[b] * w[b] * inv[b] * v[b, :] on valid rows, 0 elsewhere
// ----------------------------------------------------------------------------------------------

template <typename T, int VEC>
__device__ __forceinline__ void broadcast_chunk(const RowsSide& s, const BroadcastVector& p, int64_t b, int64_t chunk,
                                                int64_t chunk_rows, int64_t dim) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t col = (int64_t(blockIdx.x) * kWarpSize + lane) * VEC;
  const bool col_ok = col < dim;
  // the reference's order of roundings: (sign * (g * w)) * inv, then * v
  const float coef = s.sign * (p.g[b * p.g_stride] * p.w[b * p.w_stride]) * s.inv[b * s.inv_stride];
  float vals[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) vals[i] = col_ok ? p.v[b * p.stride_b + (col + i) * p.stride_d] * coef : 0.0f;
  const RawVec<T, VEC> filled = pack<T, VEC>(vals);
  const RawVec<T, VEC> zero = zero_raw<T, VEC>();

  T* out = static_cast<T*>(s.out) + b * s.rows * dim + (col_ok ? col : 0);
  const uint8_t* mask_row = s.mask == nullptr ? nullptr : s.mask + b * s.mask_stride_b;
  const int64_t begin = chunk * chunk_rows;
  const int64_t end = min(begin + chunk_rows, s.rows);
  for (int64_t r0 = begin + warp; r0 < end; r0 += kWarpSize * kRowGroups) {
    const unsigned valid = valid_rows(r0, end, mask_row, s.mask_stride_n);
    const int here = int(min(int64_t(kWarpSize), ceil_div(end - r0, kRowGroups)));  // rows of this group
    if (col_ok) {
#pragma unroll 4
      for (int k = 0; k < here; ++k)
        store_stream<T, VEC>(out + (r0 + int64_t(k) * kRowGroups) * dim, ((valid >> k) & 1u) ? filled : zero);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
    broadcast_rows_kernel(RowsSide a, RowsSide t, BroadcastVector p, int64_t batch, int64_t dim, int64_t chunk_rows) {
  wait_for_previous_grid();
  for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
    if (blockIdx.y < a.chunks)
      broadcast_chunk<T, VEC>(a, p, b, blockIdx.y, chunk_rows, dim);
    else
      broadcast_chunk<T, VEC>(t, p, b, blockIdx.y - a.chunks, chunk_rows, dim);
  }
}

// ----------------------------------------------------------------------------------------------
// host side
// ----------------------------------------------------------------------------------------------

// Token chunk length so that the row-streaming grid has about `target_blocks` blocks.
int64_t chunk_rows_for(int64_t target_blocks, int64_t batch, int64_t column_blocks, int64_t total_rows,
                       int64_t min_rows) {
  const int64_t per_sample = std::clamp<int64_t>(target_blocks / std::max<int64_t>(1, batch * column_blocks), 1, 4096);
  const int64_t chunk = ceil_div(ceil_div(std::max<int64_t>(total_rows, 1), per_sample), kRowGroups) * kRowGroups;
  return std::max(chunk, min_rows);
}

int64_t column_blocks(int64_t dim, int vec) { return ceil_div(dim, int64_t(kWarpSize) * vec); }

unsigned grid_batch(int64_t batch) { return unsigned(std::min(batch, kMaxGridYZ)); }

int token_vec(const TokenSide& s, int64_t batch, int64_t dim, DType dtype) {
  return max_vector_width(s.data, element_size(dtype), batch, s.rows, dim, s.stride_b, s.stride_n, s.stride_d);
}

PoolSide pool_side(const TokenSide& s, int64_t chunks, int64_t first_slot) {
  return PoolSide{s.data, s.mask, s.rows, s.stride_b, s.stride_n, s.stride_d,
                  s.mask_stride_b, s.mask_stride_n, chunks, first_slot};
}

MaskView mask_view(const TokenSide& s) { return MaskView{s.mask, s.rows, s.mask_stride_b, s.mask_stride_n}; }

template <typename T>
cudaError_t launch_pool(const PoolSide& a, const PoolSide& t, int vec, int64_t batch, int64_t dim, int64_t chunk_rows,
                        int64_t num_slots, float* partial, cudaStream_t stream) {
  if (a.chunks + t.chunks == 0) return cudaSuccess;
  return dispatch_vec<T>(vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    const dim3 grid(unsigned(column_blocks(dim, VEC)), unsigned(a.chunks + t.chunks), grid_batch(batch));
    return launch(pool_partial_kernel<T, VEC>, grid, kRowThreads, stream, a, t, batch, dim, chunk_rows, num_slots,
                  partial);
  });
}

// Pass 1 for one or two sides: one launch, or one per side when their vector widths differ
// (e.g. one side is a strided view and the other is contiguous).
cudaError_t pool_sides(const TokenSide& a, const TokenSide* t, int64_t batch, int64_t dim, DType dtype,
                       const PoolPlan& plan, float* partial, cudaStream_t stream) {
  const PoolSide none{};
  const PoolSide pa = pool_side(a, plan.chunks_a, 0);
  const PoolSide pt = t != nullptr ? pool_side(*t, plan.chunks_t, plan.chunks_a) : none;
  const int64_t slots = plan.slots();
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (plan.vec_a == plan.vec_t)
      return launch_pool<T>(pa, pt, plan.vec_a, batch, dim, plan.chunk_rows, slots, partial, stream);
    REGAP_RETURN_IF_ERROR(launch_pool<T>(pa, none, plan.vec_a, batch, dim, plan.chunk_rows, slots, partial, stream));
    return launch_pool<T>(pt, none, plan.vec_t, batch, dim, plan.chunk_rows, slots, partial, stream);
  });
}

// fp32 rows of `dim` elements starting at each of these pointers can be read as float4
bool float4_rows(int64_t dim, std::initializer_list<const void*> ptrs) {
  if (dim % 4 != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace

cudaError_t plan_pool(const TokenSide& a, const TokenSide* t, int64_t batch, int64_t dim, DType dtype,
                      PoolPlan* plan) {
  plan->vec_a = token_vec(a, batch, dim, dtype);
  plan->vec_t = t != nullptr ? token_vec(*t, batch, dim, dtype) : plan->vec_a;
  const int vec = std::min(plan->vec_a, plan->vec_t);  // the narrower vector has more column blocks
  int sms = 0, resident = 0;
  REGAP_RETURN_IF_ERROR(current_sm_count(&sms));
  REGAP_RETURN_IF_ERROR(dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_vec<T>(vec, [&](auto vec_c) {
      return resident_blocks<pool_partial_kernel<T, decltype(vec_c)::value>, kRowThreads>(&resident);
    });
  }));
  const int64_t rows_t = t != nullptr ? t->rows : 0;
  plan->chunk_rows = chunk_rows_for(int64_t(sms) * resident * kPoolWaves, batch, column_blocks(dim, vec),
                                    a.rows + rows_t, kMinPoolChunk);
  // a side with no rows gets no chunk: its sums stay 0 and its count is 0
  plan->chunks_a = ceil_div(a.rows, plan->chunk_rows);
  plan->chunks_t = ceil_div(rows_t, plan->chunk_rows);
  return cudaSuccess;
}

cudaError_t gap_loss_forward(const TokenSide& image, const TokenSide& text, int64_t batch, int64_t dim, DType dtype,
                             Reduction reduction, bool squared, const PoolPlan& plan, float* partial,
                             float* direction, float* gaps, float* stats, float* loss, cudaStream_t stream) {
  if (batch <= 0 || dim <= 0 || batch > INT32_MAX) return cudaErrorInvalidValue;
  // the finish kernel packs the two valid-row counts into one 64-bit word
  if ((image.mask != nullptr && image.rows > UINT32_MAX) || (text.mask != nullptr && text.rows > UINT32_MAX))
    return cudaErrorInvalidValue;
  REGAP_RETURN_IF_ERROR(pool_sides(image, &text, batch, dim, dtype, plan, partial, stream));
  const MaskView ma = mask_view(image), mt = mask_view(text);
  const bool vec4 = float4_rows(dim, {partial, direction});
  const int64_t per_pass = int64_t(kFinishThreads) * (vec4 ? 4 : 1);  // columns covered by one pass of the block
  auto finish = [&](auto kernel) {
    return launch(kernel, dim3(unsigned(batch)), kFinishThreads, stream, partial, plan.slots(), plan.chunks_a, ma, mt,
                  batch, dim, squared, direction, gaps, stats);
  };
  if (vec4 && dim <= per_pass)
    REGAP_RETURN_IF_ERROR(finish(gap_finish_kernel<4, 1>));
  else if (vec4 && dim <= 2 * per_pass)
    REGAP_RETURN_IF_ERROR(finish(gap_finish_kernel<4, 2>));  // LLaVA-13B: D = 5120
  else if (vec4)
    REGAP_RETURN_IF_ERROR(finish(gap_finish_kernel<4, 0>));
  else if (dim <= per_pass)
    REGAP_RETURN_IF_ERROR(finish(gap_finish_kernel<1, 1>));
  else
    REGAP_RETURN_IF_ERROR(finish(gap_finish_kernel<1, 0>));
  if (reduction == Reduction::kNone) return cudaSuccess;
  return launch(gap_reduce_kernel, 1, kReduceThreads, stream, gaps, stats, loss, batch, reduction == Reduction::kMean);
}

cudaError_t masked_mean_forward(const TokenSide& x, int64_t batch, int64_t dim, DType dtype, const PoolPlan& plan,
                                float* partial, float* mean, float* inv_count, cudaStream_t stream) {
  if (batch <= 0 || dim <= 0) return cudaErrorInvalidValue;
  REGAP_RETURN_IF_ERROR(pool_sides(x, nullptr, batch, dim, dtype, plan, partial, stream));
  const MaskView m = mask_view(x);
  if (float4_rows(dim, {partial, mean})) {
    const dim3 grid(unsigned(ceil_div(dim, kMeanThreads * 4)), grid_batch(batch));
    return launch(mean_finish_kernel<4>, grid, kMeanThreads, stream, partial, plan.slots(), m, batch, dim, mean,
                  inv_count);
  } else {
    const dim3 grid(unsigned(ceil_div(dim, kMeanThreads)), grid_batch(batch));
    return launch(mean_finish_kernel<1>, grid, kMeanThreads, stream, partial, plan.slots(), m, batch, dim, mean,
                  inv_count);
  }
}

cudaError_t broadcast_rows(const BroadcastVector& vec, const BroadcastSide& a, const BroadcastSide& t, int64_t batch,
                           int64_t dim, DType dtype, cudaStream_t stream) {
  if (batch <= 0 || dim <= 0) return cudaErrorInvalidValue;
  const bool need_a = a.out != nullptr && a.rows > 0;
  const bool need_t = t.out != nullptr && t.rows > 0;
  if (!need_a && !need_t) return cudaSuccess;
  const int elem = element_size(dtype);
  // outputs are contiguous [B, rows, D]: only the base pointer and D decide the vector width
  const int vec_a = need_a ? max_vector_width(a.out, elem, batch, a.rows, dim, a.rows * dim, dim, 1) : 16;
  const int vec_t = need_t ? max_vector_width(t.out, elem, batch, t.rows, dim, t.rows * dim, dim, 1) : 16;
  const int narrow = std::min(vec_a, vec_t);  // the narrower vector has more column blocks

  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    int sms = 0, resident = 0;
    REGAP_RETURN_IF_ERROR(current_sm_count(&sms));
    REGAP_RETURN_IF_ERROR(dispatch_vec<T>(narrow, [&](auto vec_c) {
      return resident_blocks<broadcast_rows_kernel<T, decltype(vec_c)::value>, kRowThreads>(&resident);
    }));
    const int64_t rows = (need_a ? a.rows : 0) + (need_t ? t.rows : 0);
    const int64_t chunk_rows = chunk_rows_for(int64_t(sms) * resident * kBroadcastWaves, batch,
                                              column_blocks(dim, narrow), rows, kMinBroadcastChunk);
    auto side = [&](const BroadcastSide& s, bool needed) {
      return RowsSide{s.out, s.mask, s.rows, s.mask_stride_b, s.mask_stride_n, s.inv, s.inv_stride, s.sign,
                      needed ? ceil_div(s.rows, chunk_rows) : 0};
    };
    const RowsSide none{};
    const RowsSide ra = side(a, need_a), rt = side(t, need_t);
    auto broadcast = [&](const RowsSide& first, const RowsSide& second, int width) {
      return dispatch_vec<T>(width, [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        const dim3 grid(unsigned(column_blocks(dim, VEC)), unsigned(first.chunks + second.chunks), grid_batch(batch));
        return launch(broadcast_rows_kernel<T, VEC>, grid, kRowThreads, stream, first, second, vec, batch, dim,
                      chunk_rows);
      });
    };
    if (!need_t) return broadcast(ra, none, vec_a);
    if (!need_a) return broadcast(rt, none, vec_t);
    if (vec_a == vec_t) return broadcast(ra, rt, vec_a);
    REGAP_RETURN_IF_ERROR(broadcast(ra, none, vec_a));
    return broadcast(rt, none, vec_t);
  });
}

}  // namespace regap
