// CUDA epilogue kernels of LLaVA's projector for the `cuda` backend (see projector.h). The GEMMs are
// cuBLAS (torch.addmm / torch.mm in regap_fast/_cuda_backend.py); each kernel here is the one
// memory-bound pass over [M, N] that follows a GEMM, with REGAP's extra work folded into it:
//
// forward   gelu_pool_block_kernel / gelu_pool_warp_kernel
//              h = GELU(pre), plus the per-sample sums of the valid rows of the stored h
//           sum_pieces_kernel<1>  (only when samples are cut into pieces) adds the pieces
// backward  dgelu_kernel
//              dpre = (dh + vec[sample] on valid rows) * GELU'(pre), plus its column sums
//           sum_pieces_kernel<8>  (when there is more than one row chunk) adds the chunks' sums
// both      mean_split_kernel  the fp32 [B, D] pooled mean (forward) or scaled gradient (backward) as
//              hi/lo rows of the compute dtype, for the small GEMM with W2
//
// Layout (as in gap_loss.cu): a block is 8 warps; a warp spans 32 * VEC consecutive columns (VEC
// elements per lane: 16-byte vectors when the rows allow it), so grid.x = column strips of 32 * VEC
// columns and grid.y = chunks of rows. Each thread keeps fp32 accumulators for its VEC columns and
// issues kUnroll row loads before it uses any. Sums are formed in a fixed order (rows in order
// within a warp, then the 8 warps in order through shared memory, then the pieces in order), so the
// results are bitwise reproducible. All offsets are int64.
//
// How the forward cuts its rows. Pooled sums must not mix samples, so chunks follow the samples:
//   - a sample longer than the rows a block should take is cut into `pieces` chunks; each chunk
//     writes its fp32 sum to a partial row and sum_pieces_kernel adds them. LLaVA-1.5-7B on an H100
//     (M = 32 x 576, N = 4096 bf16, 132 SMs x 3 blocks): 2 pieces of 288 rows per image, 64 chunks
//     x 16 column strips = 1024 blocks, and 64 partial rows (1 MB written, then read, by the finish);
//   - otherwise a chunk is `chunk_samples` whole samples and writes the pooled sums directly, with
//     no finish kernel. The 8 warps of a block then either share each sample's rows (interleaved,
//     summed through shared memory at the end of each sample) or, for samples of at most
//     kWarpSampleMaxRows rows, each warp owns whole samples (no block-level step per sample).
// Without pooling the forward is the same pass with one "sample" of all rows and nothing summed.
//
// GELU is the exact erf form in fp32, as PyTorch computes it (no fast-math: setup.py builds without
// --use_fast_math). Every launch uses programmatic dependent launch on sm_90+ (common.cuh).

#include <algorithm>

#include "common.cuh"
#include "projector.h"

namespace regap {
namespace {

// Rows whose loads are issued before any is used: kUnroll (common.cuh) = 4 in the forward (one
// tensor), 2 in the backward (two tensors: dh and pre), i.e. 64 bytes in flight per lane either way.
constexpr int kBwdUnroll = 2;
// Blocks per SM the row kernels are compiled for: a cap of 65536 / (256 * 3) = 85 -> 80 registers per
// thread. The exact-erf GELU (about 25 fp32 instructions an element; GELU' about 50) on 8 elements of
// kUnroll rows keeps many values live: at a 64-register cap (4 blocks) the 16-bit VEC = 8 kernels
// spill; at 80 none does (sm_80 and sm_90). 24 warps per SM x 64 bytes per lane in flight is ~48 KB
// per SM, well above what HBM needs.
constexpr int kMinBlocks = 3;
// Grid sizing: about this many times the blocks that fit on the GPU at once. More than one wave
// so that the blocks of a partly filled last wave are a small share of the work.
constexpr int kFwdWaves = 2;
constexpr int kBwdWaves = 2;
// Samples of at most this many rows are pooled one warp per sample (no shared-memory step).
constexpr int64_t kWarpSampleMaxRows = 64;

constexpr float kSqrt1_2 = 0.70710678118654752440f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)

// --------------------------------------------------------------------------------------------------
// math
// --------------------------------------------------------------------------------------------------

// GELU(x) = x * Phi(x), the exact (erf) form, in PyTorch's order of operations
__device__ __forceinline__ float gelu(float x) { return x * 0.5f * (1.0f + erff(x * kSqrt1_2)); }

// d GELU / dx = Phi(x) + x * phi(x)
__device__ __forceinline__ float gelu_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * kSqrt1_2));
  const float pdf = expf(-0.5f * x * x) * kInvSqrt2Pi;
  return cdf + x * pdf;
}

template <typename T, int VEC>
__device__ __forceinline__ RawVec<T, VEC> gelu_vec(const RawVec<T, VEC>& in) {
  const T* e = reinterpret_cast<const T*>(&in);
  float y[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) y[i] = gelu(to_float<T>(e[i]));
  return pack<T, VEC>(y);
}

// --------------------------------------------------------------------------------------------------
// small helpers
// --------------------------------------------------------------------------------------------------

template <int VEC>
__device__ __forceinline__ void zero(float (&acc)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
}

// Stores VEC fp32 values at p (aligned to min(VEC, 4) * 4 bytes): 16-byte stores where possible.
template <int VEC>
__device__ __forceinline__ void store_floats(float* p, const float (&v)[VEC]) {
  if constexpr (VEC >= 4) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4)
      *reinterpret_cast<float4*>(p + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  } else {
    *reinterpret_cast<RawVec<float, VEC>*>(p) = *reinterpret_cast<const RawVec<float, VEC>*>(v);
  }
}

// dst[c] = sum over the 8 warps (in order) of their acc, for the cols_here columns of this block's
// strip. The whole block calls it; the closing barrier lets `scratch` be reused at once.
template <int VEC>
__device__ __forceinline__ void block_column_sum(float (*scratch)[kWarpSize * VEC], const float (&acc)[VEC],
                                                 float* dst, int64_t cols_here) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int i = 0; i < VEC; ++i) scratch[warp][lane * VEC + i] = acc[i];
  __syncthreads();
  for (int c = threadIdx.x; c < cols_here; c += kRowThreads) {
    float s = scratch[0][c];
#pragma unroll
    for (int w = 1; w < kRowGroups; ++w) s += scratch[w][c];
    dst[c] = s;
  }
  __syncthreads();
}

// --------------------------------------------------------------------------------------------------
// forward kernel arguments
// --------------------------------------------------------------------------------------------------

struct FwdParams {
  const void* pre; int64_t pre_stride;
  void* h; int64_t h_stride;
  int64_t rows, cols;
  const uint8_t* mask; int64_t mask_stride;
  int64_t sample_rows;
  int64_t pool_samples;  // samples b < pool_samples are summed; 0: nothing is
  int64_t pieces, piece_rows, chunk_samples, chunks;
  float* pooled;   // [batch, cols]
  float* partial;  // [pool_samples * pieces, cols] when pieces > 1
};

// The column strip of this block and this lane's first column.
struct Strip {
  int64_t col0;  // first column of the block's strip
  int64_t col;   // this lane's first column
  bool col_ok;   // VEC > 1 only when cols % VEC == 0: a lane's vector is all in or all out
  int64_t cols_here;
};

template <int VEC>
__device__ __forceinline__ Strip strip(int64_t cols) {
  Strip s;
  s.col0 = int64_t(blockIdx.x) * kWarpSize * VEC;
  s.col = s.col0 + int64_t(threadIdx.x % kWarpSize) * VEC;
  s.col_ok = s.col < cols;
  s.cols_here = min(int64_t(kWarpSize * VEC), cols - s.col0);
  return s;
}

// GELU of rows first, first + step, ... (< end): `step` = 8 interleaves the block's warps, 1 gives a
// warp contiguous rows. Stores h and adds the valid rows of the stored h to acc.
template <typename T, int VEC, int STEP>
__device__ __forceinline__ void gelu_rows(const T* pre, int64_t pre_stride, T* h, int64_t h_stride, bool col_ok,
                                          const uint8_t* mask, int64_t mask_stride, bool pool, int64_t first,
                                          int64_t end, float (&acc)[VEC]) {
  for (int64_t r0 = first; r0 < end; r0 += int64_t(kWarpSize) * STEP) {
    const int here = int(min(int64_t(kWarpSize), ceil_div(end - r0, STEP)));  // rows of this group
    const unsigned valid = pool ? warp_valid_rows(r0, STEP, here, mask, mask_stride) : 0u;
    for (int k = 0; k < here; k += kUnroll) {  // warp-uniform
      RawVec<T, VEC> raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t r = r0 + int64_t(k + u) * STEP;
        raw[u] = (k + u < here && col_ok) ? load_stream<T, VEC>(pre + r * pre_stride) : zero_raw<T, VEC>();
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (k + u < here) {
          const int64_t r = r0 + int64_t(k + u) * STEP;
          const RawVec<T, VEC> y = gelu_vec<T, VEC>(raw[u]);
          if (col_ok) store_stream<T, VEC>(h + r * h_stride, y);
          if ((valid >> (k + u)) & 1u) accumulate<T, VEC>(acc, y);  // the rounded h, as stored
        }
      }
    }
  }
}

// --------------------------------------------------------------------------------------------------
// forward, the 8 warps of a block share each sample's rows
// --------------------------------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads, kMinBlocks) gelu_pool_block_kernel(FwdParams p) {
  __shared__ float scratch[kRowGroups][kWarpSize * VEC];
  wait_for_previous_grid();
  const int warp = threadIdx.x / kWarpSize;
  const Strip s = strip<VEC>(p.cols);
  const T* pre = static_cast<const T*>(p.pre) + (s.col_ok ? s.col : 0);
  T* h = static_cast<T*>(p.h) + (s.col_ok ? s.col : 0);

  for (int64_t c = blockIdx.y; c < p.chunks; c += gridDim.y) {
    // the chunk's rows [begin, end); every value here is block-uniform
    int64_t begin, end;
    if (p.pieces > 1) {
      const int64_t b = c / p.pieces;
      const int64_t sample_begin = b * p.sample_rows;
      begin = sample_begin + (c - b * p.pieces) * p.piece_rows;
      end = min(min(begin + p.piece_rows, sample_begin + p.sample_rows), p.rows);  // may be <= begin
    } else {
      begin = c * p.chunk_samples * p.sample_rows;
      end = min(begin + p.chunk_samples * p.sample_rows, p.rows);
    }
    // one segment per sample (a piece of a sample is one segment); runs at least once, so that an
    // empty piece still writes its (zero) partial row
    int64_t seg = begin;
    do {
      const int64_t b = seg / p.sample_rows;
      const int64_t seg_end = min(end, (b + 1) * p.sample_rows);
      const bool pool = b < p.pool_samples;
      float acc[VEC];
      zero<VEC>(acc);
      gelu_rows<T, VEC, kRowGroups>(pre, p.pre_stride, h, p.h_stride, s.col_ok, p.mask, p.mask_stride, pool,
                                    seg + warp, seg_end, acc);
      if (pool) {  // block-uniform: the barriers inside are safe
        float* dst = p.pieces > 1 ? p.partial + c * p.cols : p.pooled + b * p.cols;
        block_column_sum<VEC>(scratch, acc, dst + s.col0, s.cols_here);
      }
      seg = seg_end;
    } while (seg < end);
  }
}

// --------------------------------------------------------------------------------------------------
// forward, each warp owns whole samples (short samples: no block-level step per sample)
// --------------------------------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads, kMinBlocks) gelu_pool_warp_kernel(FwdParams p) {
  wait_for_previous_grid();
  const int warp = threadIdx.x / kWarpSize;
  const Strip s = strip<VEC>(p.cols);
  const T* pre = static_cast<const T*>(p.pre) + (s.col_ok ? s.col : 0);
  T* h = static_cast<T*>(p.h) + (s.col_ok ? s.col : 0);
  const int64_t warp_samples = p.chunk_samples / kRowGroups;

  for (int64_t c = blockIdx.y; c < p.chunks; c += gridDim.y) {
    // this warp's samples [b, b + warp_samples) and their rows [begin, end); warp-uniform, and no
    // block barrier in this kernel, so a warp with nothing to do may skip ahead
    int64_t b = (c * kRowGroups + warp) * warp_samples;
    const int64_t begin = b * p.sample_rows;
    if (begin >= p.rows) continue;
    const int64_t end = min(begin + warp_samples * p.sample_rows, p.rows);
    int64_t sample_end = min(end, begin + p.sample_rows);
    float acc[VEC];
    zero<VEC>(acc);
    for (int64_t r0 = begin; r0 < end; r0 += kWarpSize) {
      const int here = int(min(int64_t(kWarpSize), end - r0));
      const unsigned valid = warp_valid_rows(r0, 1, here, p.mask, p.mask_stride);
      for (int k = 0; k < here; k += kUnroll) {
        RawVec<T, VEC> raw[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t r = r0 + k + u;
          raw[u] = (k + u < here && s.col_ok) ? load_stream<T, VEC>(pre + r * p.pre_stride) : zero_raw<T, VEC>();
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (k + u < here) {
            const int64_t r = r0 + k + u;
            const RawVec<T, VEC> y = gelu_vec<T, VEC>(raw[u]);
            if (s.col_ok) store_stream<T, VEC>(h + r * p.h_stride, y);
            if ((valid >> (k + u)) & 1u) accumulate<T, VEC>(acc, y);
            if (r + 1 == sample_end) {  // the last row of sample b: its sum is complete
              if (b < p.pool_samples && s.col_ok) store_floats<VEC>(p.pooled + b * p.cols + s.col, acc);
              zero<VEC>(acc);
              ++b;
              sample_end = min(end, sample_end + p.sample_rows);
            }
          }
        }
      }
    }
  }
}

// --------------------------------------------------------------------------------------------------
// backward
// --------------------------------------------------------------------------------------------------

struct BwdParams {
  const void* dh; int64_t dh_stride;  // may alias dpre (in place): neither is __restrict__
  const void* pre; int64_t pre_stride;
  void* dpre; int64_t dpre_stride;
  int64_t rows, cols;
  const uint8_t* mask; int64_t mask_stride;
  int64_t sample_rows;
  const float* vec;
  int64_t vec_rows, vec_stride_b, vec_stride_n;
  float* dbias;
  float* partial;  // [chunks, cols] when chunks > 1
  int64_t chunk_rows, chunks;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads, kMinBlocks) dgelu_kernel(BwdParams p) {
  __shared__ float scratch[kRowGroups][kWarpSize * VEC];
  wait_for_previous_grid();
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const Strip s = strip<VEC>(p.cols);
  const int64_t off = s.col_ok ? s.col : 0;
  const T* dh = static_cast<const T*>(p.dh) + off;
  const T* pre = static_cast<const T*>(p.pre) + off;
  T* dpre = static_cast<T*>(p.dpre) + off;
  const bool has_vec = p.vec != nullptr;
  const bool dbias = p.dbias != nullptr;

  for (int64_t c = blockIdx.y; c < p.chunks; c += gridDim.y) {
    const int64_t begin = c * p.chunk_rows;
    const int64_t end = min(begin + p.chunk_rows, p.rows);
    float colsum[VEC];
    zero<VEC>(colsum);
    float v[VEC];  // vec[cur] for this lane's columns
    zero<VEC>(v);
    int64_t cur = -1;
    for (int64_t r0 = begin + warp; r0 < end; r0 += int64_t(kWarpSize) * kRowGroups) {
      const int here = int(min(int64_t(kWarpSize), ceil_div(end - r0, kRowGroups)));
      // lane k: row r0 + 8k, its sample, and whether it gets the vector
      unsigned valid = 0;
      int64_t lane_sample = 0;
      if (has_vec) {
        const int64_t r = r0 + int64_t(lane) * kRowGroups;
        bool ok = lane < here && (p.mask == nullptr || p.mask[r * p.mask_stride] != 0);
        if (ok) lane_sample = r / p.sample_rows;
        ok = ok && lane_sample < p.vec_rows;
        valid = __ballot_sync(0xffffffffu, ok);
      }
      for (int k = 0; k < here; k += kBwdUnroll) {  // warp-uniform
        RawVec<T, VEC> g[kBwdUnroll], x[kBwdUnroll];
#pragma unroll
        for (int u = 0; u < kBwdUnroll; ++u) {
          const int64_t r = r0 + int64_t(k + u) * kRowGroups;
          const bool load = k + u < here && s.col_ok;
          g[u] = load ? load_stream<T, VEC>(dh + r * p.dh_stride) : zero_raw<T, VEC>();
          x[u] = load ? load_stream<T, VEC>(pre + r * p.pre_stride) : zero_raw<T, VEC>();
        }
#pragma unroll
        for (int u = 0; u < kBwdUnroll; ++u) {
          if (k + u < here) {
            const int64_t r = r0 + int64_t(k + u) * kRowGroups;
            float d[VEC];
            const T* ge = reinterpret_cast<const T*>(&g[u]);
#pragma unroll
            for (int i = 0; i < VEC; ++i) d[i] = to_float<T>(ge[i]);
            if ((valid >> (k + u)) & 1u) {  // warp-uniform
              const int64_t b = __shfl_sync(0xffffffffu, lane_sample, k + u);
              if (b != cur) {  // a new sample: its vector (fp32, read from L2)
                cur = b;
#pragma unroll
                for (int i = 0; i < VEC; ++i)
                  v[i] = s.col_ok ? p.vec[b * p.vec_stride_b + (s.col + i) * p.vec_stride_n] : 0.0f;
              }
#pragma unroll
              for (int i = 0; i < VEC; ++i) d[i] += v[i];
            }
            const T* xe = reinterpret_cast<const T*>(&x[u]);
#pragma unroll
            for (int i = 0; i < VEC; ++i) d[i] *= gelu_grad(to_float<T>(xe[i]));
            const RawVec<T, VEC> y = pack<T, VEC>(d);
            if (s.col_ok) store_stream<T, VEC>(dpre + r * p.dpre_stride, y);
            if (dbias) accumulate<T, VEC>(colsum, y);  // the rounded dpre, as stored
          }
        }
      }
    }
    if (dbias) {  // block-uniform
      float* dst = p.chunks > 1 ? p.partial + c * p.cols : p.dbias;
      block_column_sum<VEC>(scratch, colsum, dst + s.col0, s.cols_here);
    }
  }
}

// --------------------------------------------------------------------------------------------------
// finish: out[o, :] = sum over j < pieces (in order) of in[o * pieces + j, :]
// --------------------------------------------------------------------------------------------------

// GROUPS row groups of kRowThreads / GROUPS columns each: GROUPS = 1 for a few pieces per output,
// 8 for many (the bias gradient: one output, one piece per row chunk).
template <int GROUPS>
__global__ void __launch_bounds__(kRowThreads) sum_pieces_kernel(const float* __restrict__ in, int64_t pieces,
                                                              int64_t outputs, int64_t cols,
                                                              float* __restrict__ out) {
  constexpr int kCols = kRowThreads / GROUPS;
  __shared__ float scratch[GROUPS][kCols];
  wait_for_previous_grid();
  const int g = threadIdx.x / kCols;
  const int c = threadIdx.x % kCols;
  const int64_t col = int64_t(blockIdx.x) * kCols + c;
  for (int64_t o = blockIdx.y; o < outputs; o += gridDim.y) {
    float sum = 0.0f;
    if (col < cols) {
      const float* src = in + o * pieces * cols + col;
#pragma unroll 4
      for (int64_t j = g; j < pieces; j += GROUPS) sum += src[j * cols];
    }
    if constexpr (GROUPS == 1) {
      if (col < cols) out[o * cols + col] = sum;
    } else {
      scratch[g][c] = sum;
      __syncthreads();
      if (g == 0 && col < cols) {
        float t = scratch[0][c];
#pragma unroll
        for (int w = 1; w < GROUPS; ++w) t += scratch[w][c];
        out[o * cols + col] = t;
      }
      __syncthreads();
    }
  }
}

// --------------------------------------------------------------------------------------------------
// mean_split: x = v[b] / n[b], then hi = T(x) (row b) and lo = T(x - hi) (row batch + b)
// --------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kRowThreads) mean_split_kernel(MeanSplitArgs a) {
  wait_for_previous_grid();
  T* out = static_cast<T*>(a.out);
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const float n = a.counts != nullptr ? a.counts[b * a.counts_stride] : 1.0f;
    for (int64_t c = int64_t(blockIdx.x) * kRowThreads + threadIdx.x; c < a.cols;
         c += int64_t(gridDim.x) * kRowThreads) {
      float x = a.v[b * a.v_stride_b + c * a.v_stride_n];
      if (a.counts != nullptr) x = n > 0.0f ? __fdiv_rn(x, n) : 0.0f;  // THE mean formula (common.cuh)
      const T hi = from_float<T>(x);
      out[b * a.cols + c] = hi;
      if (a.split) out[(a.batch + b) * a.cols + c] = from_float<T>(x - to_float<T>(hi));
    }
  }
}

// --------------------------------------------------------------------------------------------------
// host side
// --------------------------------------------------------------------------------------------------

int64_t column_strips(int64_t cols, int vec) { return ceil_div(cols, int64_t(kWarpSize) * vec); }

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

unsigned grid_y(int64_t n) { return unsigned(std::min(n, kMaxGridYZ)); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks of one kernel family that fit on an SM, for dtype T and vector width `vec`.
template <template <typename, int> class Family, typename T>
cudaError_t family_resident(int vec, int* blocks) {
  return dispatch_vec<T>(vec, [&](auto vec_c) {
    return resident_blocks<Family<T, decltype(vec_c)::value>::kernel, kRowThreads>(blocks);
  });
}

template <typename T, int VEC>
struct BlockFwd {
  static constexpr auto kernel = gelu_pool_block_kernel<T, VEC>;
};
template <typename T, int VEC>
struct WarpFwd {
  static constexpr auto kernel = gelu_pool_warp_kernel<T, VEC>;
};
template <typename T, int VEC>
struct Bwd {
  static constexpr auto kernel = dgelu_kernel<T, VEC>;
};

// Sums `pieces` consecutive fp32 rows per output row.
cudaError_t launch_sum_pieces(const float* in, int64_t pieces, int64_t outputs, int64_t cols, float* out,
                              cudaStream_t stream) {
  if (outputs <= 0 || cols <= 0) return cudaSuccess;
  if (pieces >= 16) {
    const dim3 grid(unsigned(ceil_div(cols, kRowThreads / 8)), grid_y(outputs));
    return launch(sum_pieces_kernel<8>, grid, kRowThreads, stream, in, pieces, outputs, cols, out);
  }
  const dim3 grid(unsigned(ceil_div(cols, kRowThreads)), grid_y(outputs));
  return launch(sum_pieces_kernel<1>, grid, kRowThreads, stream, in, pieces, outputs, cols, out);
}

}  // namespace

cudaError_t plan_gelu_pool(const GeluPoolArgs& a, DType dtype, GeluPoolPlan* plan) {
  *plan = GeluPoolPlan{};
  if (a.rows < 0 || a.cols < 0 || a.batch < 0) return cudaErrorInvalidValue;
  const bool pool = a.pooled != nullptr && a.batch > 0;
  if (pool && a.rows > 0 && a.rows_per_sample < 1) return cudaErrorInvalidValue;
  const int elem = element_size(dtype);
  plan->vec = std::min(max_vector_width(a.pre, elem, 1, a.rows, a.cols, 0, a.pre_stride, 1),
                       max_vector_width(a.h, elem, 1, a.rows, a.cols, 0, a.h_stride, 1));
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;  // nothing to launch (chunks = 0)

  int sms = 0, resident = 0;
  REGAP_RETURN_IF_ERROR(current_sm_count(&sms));
  REGAP_RETURN_IF_ERROR(dispatch_dtype(dtype, [&](auto tag) {
    return family_resident<BlockFwd, decltype(tag)>(plan->vec, &resident);
  }));
  const int64_t strips = column_strips(a.cols, plan->vec);
  const int64_t want_chunks = std::max<int64_t>(1, int64_t(sms) * resident * kFwdWaves / strips);
  const int64_t target_rows = std::max<int64_t>(kRowGroups, ceil_div(a.rows, want_chunks));

  plan->sample_rows = pool ? a.rows_per_sample : a.rows;
  plan->samples = ceil_div(a.rows, plan->sample_rows);
  plan->pool_samples = pool ? std::min(a.batch, plan->samples) : 0;
  if (plan->sample_rows > target_rows) {
    // long samples: cut each into pieces of about target_rows rows (a multiple of 8: every warp of
    // the block gets the same number of rows)
    const int64_t k = ceil_div(plan->sample_rows, target_rows);
    plan->piece_rows = round_up(ceil_div(plan->sample_rows, k), kRowGroups);
    plan->pieces = ceil_div(plan->sample_rows, plan->piece_rows);
    if (plan->pieces > 1) {
      plan->chunks = plan->samples * plan->pieces;
      return cudaSuccess;
    }
    plan->piece_rows = 0;  // one piece per sample: whole samples, no finish
  }
  plan->pieces = 1;
  int64_t q = std::max<int64_t>(1, target_rows / plan->sample_rows);  // whole samples per chunk
  if (pool && plan->sample_rows <= kWarpSampleMaxRows) {
    plan->warp_samples = true;
    q = kRowGroups * std::max<int64_t>(1, q / kRowGroups);
  }
  plan->chunk_samples = q;
  plan->chunks = ceil_div(plan->samples, q);
  return cudaSuccess;
}

cudaError_t gelu_pool_forward(const GeluPoolArgs& a, DType dtype, const GeluPoolPlan& plan, float* partial,
                              cudaStream_t stream) {
  if (a.rows < 0 || a.cols < 0 || a.batch < 0) return cudaErrorInvalidValue;
  const bool pool = a.pooled != nullptr && a.batch > 0;
  if (pool && !aligned16(a.pooled)) return cudaErrorInvalidValue;
  if (plan.partial_rows() > 0 && (partial == nullptr || !aligned16(partial))) return cudaErrorInvalidValue;
  if (plan.pool_samples > a.batch || (plan.warp_samples && plan.chunk_samples % kRowGroups != 0))
    return cudaErrorInvalidValue;
  // samples that own no row (batch * rows_per_sample > rows): zero sums
  if (pool && a.cols > 0 && plan.pool_samples < a.batch)
    REGAP_RETURN_IF_ERROR(cudaMemsetAsync(a.pooled + plan.pool_samples * a.cols, 0,
                                          size_t(a.batch - plan.pool_samples) * size_t(a.cols) * sizeof(float),
                                          stream));
  if (a.rows == 0 || a.cols == 0 || plan.chunks == 0) return cudaSuccess;

  FwdParams p{a.pre,  a.pre_stride, a.h,          a.h_stride,          a.rows,         a.cols,
              a.mask, a.mask_stride, plan.sample_rows, plan.pool_samples, plan.pieces, plan.piece_rows,
              plan.chunk_samples, plan.chunks, a.pooled, partial};
  REGAP_RETURN_IF_ERROR(dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_vec<T>(plan.vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const dim3 grid(unsigned(column_strips(a.cols, VEC)), grid_y(plan.chunks));
      if (plan.warp_samples) return launch(gelu_pool_warp_kernel<T, VEC>, grid, kRowThreads, stream, p);
      return launch(gelu_pool_block_kernel<T, VEC>, grid, kRowThreads, stream, p);
    });
  }));
  if (plan.partial_rows() > 0)
    return launch_sum_pieces(partial, plan.pieces, plan.pool_samples, a.cols, a.pooled, stream);
  return cudaSuccess;
}

cudaError_t plan_dgelu(const DGeluArgs& a, DType dtype, DGeluPlan* plan) {
  *plan = DGeluPlan{};
  if (a.rows < 0 || a.cols < 0) return cudaErrorInvalidValue;
  const int elem = element_size(dtype);
  plan->vec = std::min({max_vector_width(a.dh, elem, 1, a.rows, a.cols, 0, a.dh_stride, 1),
                        max_vector_width(a.pre, elem, 1, a.rows, a.cols, 0, a.pre_stride, 1),
                        max_vector_width(a.dpre, elem, 1, a.rows, a.cols, 0, a.dpre_stride, 1)});
  plan->dbias = a.dbias != nullptr;
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  int sms = 0, resident = 0;
  REGAP_RETURN_IF_ERROR(current_sm_count(&sms));
  REGAP_RETURN_IF_ERROR(
      dispatch_dtype(dtype, [&](auto tag) { return family_resident<Bwd, decltype(tag)>(plan->vec, &resident); }));
  const int64_t strips = column_strips(a.cols, plan->vec);
  const int64_t want_chunks = std::max<int64_t>(1, int64_t(sms) * resident * kBwdWaves / strips);
  plan->chunk_rows = round_up(ceil_div(a.rows, want_chunks), kRowGroups);
  plan->chunks = ceil_div(a.rows, plan->chunk_rows);
  return cudaSuccess;
}

cudaError_t dgelu_backward(const DGeluArgs& a, DType dtype, const DGeluPlan& plan, float* partial,
                           cudaStream_t stream) {
  if (a.rows < 0 || a.cols < 0) return cudaErrorInvalidValue;
  if (a.vec != nullptr && a.rows > 0 && a.rows_per_sample < 1) return cudaErrorInvalidValue;
  if (a.dpre == a.dh && a.dpre_stride != a.dh_stride && a.rows > 1) return cudaErrorInvalidValue;
  if (plan.dbias != (a.dbias != nullptr)) return cudaErrorInvalidValue;
  if (plan.partial_rows() > 0 && partial == nullptr) return cudaErrorInvalidValue;
  if (a.dbias != nullptr && a.cols > 0 && (a.rows == 0 || plan.chunks == 0))  // no rows: a zero gradient
    return cudaMemsetAsync(a.dbias, 0, size_t(a.cols) * sizeof(float), stream);
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;

  BwdParams p{a.dh,   a.dh_stride, a.pre,      a.pre_stride,   a.dpre,          a.dpre_stride,
              a.rows, a.cols,      a.mask,     a.mask_stride,  a.rows_per_sample, a.vec,
              a.vec_rows, a.vec_stride_b, a.vec_stride_n, a.dbias, partial, plan.chunk_rows, plan.chunks};
  if (a.vec == nullptr) p.sample_rows = 1;  // unused; never a divisor of 0
  REGAP_RETURN_IF_ERROR(dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_vec<T>(plan.vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const dim3 grid(unsigned(column_strips(a.cols, VEC)), grid_y(plan.chunks));
      return launch(dgelu_kernel<T, VEC>, grid, kRowThreads, stream, p);
    });
  }));
  if (plan.partial_rows() > 0) return launch_sum_pieces(partial, plan.chunks, 1, a.cols, a.dbias, stream);
  return cudaSuccess;
}

cudaError_t mean_split(const MeanSplitArgs& a, DType dtype, cudaStream_t stream) {
  if (a.batch < 0 || a.cols < 0) return cudaErrorInvalidValue;
  if (a.batch == 0 || a.cols == 0) return cudaSuccess;
  const dim3 grid(unsigned(std::min<int64_t>(ceil_div(a.cols, kRowThreads), 1024)), grid_y(a.batch));
  return dispatch_dtype(dtype, [&](auto tag) {
    return launch(mean_split_kernel<decltype(tag)>, grid, kRowThreads, stream, a);
  });
}

}  // namespace regap
