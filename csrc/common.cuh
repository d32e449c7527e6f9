// Helpers shared by the kernel files (.cu): vector loads/stores, dtype conversion, reductions,
// dtype/vector-width dispatch and device queries. No torch headers here (compile time).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common.h"

#define REGAP_RETURN_IF_ERROR(expr)             \
  do {                                          \
    const cudaError_t regap_err_ = (expr);      \
    if (regap_err_ != cudaSuccess) return regap_err_; \
  } while (0)

namespace regap {

constexpr int kWarpSize = 32;

// The row kernels of every file (pooling, broadcast, projector epilogues, caption gather) share one
// block shape: 8 warps, each on its own rows, issuing kUnroll independent row loads before it uses any.
constexpr int kRowGroups = 8;
constexpr int kRowThreads = kWarpSize * kRowGroups;  // 256 threads
constexpr int kUnroll = 4;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// --------------------------------------------------------------------------------------------------
// counts and means: one formula on every backend (regap_fast/reference.py mean_from_sum)
// --------------------------------------------------------------------------------------------------

// s / n, correctly rounded, 0 for n == 0. Not s * (1 / n): equal means over different counts must
// give bitwise-equal floats (21 * fl(1/7) != 3 in fp32), or a zero gap leaves a gradient.
__device__ __forceinline__ float mean_from_sum(float s, unsigned long long n) {
  return n > 0 ? __fdiv_rn(s, float(n)) : 0.0f;
}

// 1 / n, 0 for n == 0: the per-sample scale of the backward's broadcast vector.
__device__ __forceinline__ float inv_or_zero(unsigned long long n) { return n > 0 ? 1.0f / float(n) : 0.0f; }

// Which of the `count` rows first, first + step, ... (lane k tests row first + k * step) are valid,
// as a warp ballot; mask == nullptr: every row is.
__device__ __forceinline__ unsigned warp_valid_rows(int64_t first, int64_t step, int64_t count, const uint8_t* mask,
                                                    int64_t mask_stride) {
  const int lane = threadIdx.x % kWarpSize;
  bool ok = lane < count;
  if (ok && mask != nullptr) ok = mask[(first + int64_t(lane) * step) * mask_stride] != 0;
  return __ballot_sync(0xffffffffu, ok);
}

// --------------------------------------------------------------------------------------------------
// element conversion (all arithmetic is fp32)
// --------------------------------------------------------------------------------------------------

// Fp32<T>::to / ::from: T <-> float, round to nearest even; one line per element type
template <typename T>
struct Fp32;
// clang-format off
template <> struct Fp32<float> { __device__ static float to(float x) { return x; } __device__ static float from(float x) { return x; } };
template <> struct Fp32<__half> { __device__ static float to(__half x) { return __half2float(x); } __device__ static __half from(float x) { return __float2half_rn(x); } };
template <> struct Fp32<__nv_bfloat16> { __device__ static float to(__nv_bfloat16 x) { return __bfloat162float(x); } __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); } };
// clang-format on

template <typename T>
__device__ __forceinline__ float to_float(T x) { return Fp32<T>::to(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x) { return Fp32<T>::from(x); }

// --------------------------------------------------------------------------------------------------
// VEC consecutive elements moved as one memory instruction (16 bytes at most)
// --------------------------------------------------------------------------------------------------

template <int BYTES> struct RawBits;
template <> struct RawBits<16> { using type = uint4; };
template <> struct RawBits<8> { using type = uint2; };
template <> struct RawBits<4> { using type = unsigned int; };
template <> struct RawBits<2> { using type = unsigned short; };

// The raw register image of VEC elements of T. The caller guarantees sizeof(T) * VEC alignment.
template <typename T, int VEC>
using RawVec = typename RawBits<int(sizeof(T)) * VEC>::type;

template <typename T, int VEC>
__device__ __forceinline__ RawVec<T, VEC> zero_raw() {
  RawVec<T, VEC> r;
  unsigned char* bytes = reinterpret_cast<unsigned char*>(&r);
#pragma unroll
  for (int i = 0; i < int(sizeof(r)); ++i) bytes[i] = 0;  // all-zero bits are +0.0 in every dtype
  return r;
}

// Streaming load (evict-first): tensors that are read once should not push reused data out of L2.
template <typename T, int VEC>
__device__ __forceinline__ RawVec<T, VEC> load_stream(const T* p) {
  return __ldcs(reinterpret_cast<const RawVec<T, VEC>*>(p));
}

// Streaming store: the written rows are consumed by a later kernel, not by this one.
template <typename T, int VEC>
__device__ __forceinline__ void store_stream(T* p, RawVec<T, VEC> r) {
  __stcs(reinterpret_cast<RawVec<T, VEC>*>(p), r);
}

// acc[i] += element i of r
template <typename T, int VEC>
__device__ __forceinline__ void accumulate(float (&acc)[VEC], const RawVec<T, VEC>& r) {
  const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] += to_float<T>(e[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ RawVec<T, VEC> pack(const float (&x)[VEC]) {
  RawVec<T, VEC> r;
  T* e = reinterpret_cast<T*>(&r);
#pragma unroll
  for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(x[i]);
  return r;
}

// --------------------------------------------------------------------------------------------------
// reductions; the order of additions depends only on the block size, so results are reproducible
// --------------------------------------------------------------------------------------------------

// Butterfly sum: a + b == b + a bitwise, so every lane ends with the identical value.
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a block of THREADS threads, returned to every thread. `scratch` holds THREADS / 32
// values in shared memory; the closing barrier lets the caller reuse it at once.
template <int THREADS, typename V>
__device__ __forceinline__ V block_sum(V v, V* scratch) {
  static_assert(THREADS % kWarpSize == 0 && THREADS <= 1024, "block size");
  v = warp_sum(v);
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  V total = scratch[0];
#pragma unroll
  for (int w = 1; w < THREADS / kWarpSize; ++w) total += scratch[w];  // same order in every thread
  __syncthreads();
  return total;
}

// --------------------------------------------------------------------------------------------------
// programmatic dependent launch (Hopper and later)
// --------------------------------------------------------------------------------------------------

// Every kernel started with launch() calls this before it touches global memory: with PDL the grid
// may be scheduled while the previous kernel on the stream is still draining, and this waits until
// that kernel has completed and its writes are visible. A no-op before sm_90 and without PDL.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// --------------------------------------------------------------------------------------------------
// host side: dispatch and device queries
// --------------------------------------------------------------------------------------------------

// Calls f(T{}) with T = float, __half or __nv_bfloat16.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(std::integral_constant<int, VEC>{}) for a vector width VEC of T (16 bytes at most).
template <typename T, typename F>
cudaError_t dispatch_vec(int vec, F&& f) {
  constexpr int kMax = 16 / int(sizeof(T));
  switch (vec) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8:
      if constexpr (kMax >= 8) return f(std::integral_constant<int, 8>{});  // 16-bit types only
      break;
  }
  return cudaErrorInvalidValue;
}

// The widest vector (elements, a power of two, 16 bytes at most) with which a [B, N, D] tensor can
// be read row by row: unit stride along D, and every row start aligned to the vector size.
inline int max_vector_width(const void* data, int elem_size, int64_t batch, int64_t rows, int64_t dim,
                            int64_t stride_b, int64_t stride_n, int64_t stride_d) {
  if (stride_d != 1 && dim > 1) return 1;
  int vec = 16 / elem_size;
  for (; vec > 1; vec /= 2) {
    const bool aligned = reinterpret_cast<uintptr_t>(data) % (uintptr_t(vec) * elem_size) == 0;
    // a stride along an axis of size 1 is never used, whatever its value
    const bool strides_ok = (rows <= 1 || stride_n % vec == 0) && (batch <= 1 || stride_b % vec == 0);
    if (aligned && strides_ok && dim % vec == 0) break;
  }
  return vec;
}

// Number of SMs of the current device (cached: the attribute query is not free).
inline cudaError_t current_sm_count(int* count) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  REGAP_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (device >= 0 && device < kMaxDevices && (*count = cache[device].load(std::memory_order_relaxed)) > 0)
    return cudaSuccess;
  REGAP_RETURN_IF_ERROR(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < kMaxDevices) cache[device].store(*count, std::memory_order_relaxed);
  return cudaSuccess;
}

// Blocks of THREADS threads that fit on one SM at once for `Kernel` (cached per kernel; it only
// sizes grids, so a device with a different answer in the same process merely gets a worse grid).
template <auto Kernel, int THREADS>
cudaError_t resident_blocks(int* blocks) {
  static std::atomic<int> cached{0};
  if ((*blocks = cached.load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  REGAP_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, Kernel, THREADS, 0));
  if (*blocks < 1) *blocks = 1;
  cached.store(*blocks, std::memory_order_relaxed);
  return cudaSuccess;
}

// Whether the current device can overlap a kernel's launch with the end of the previous one
// (programmatic dependent launch: compute capability 9.0 and later). Cached per device.
inline cudaError_t current_device_has_pdl(bool* has_pdl) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};  // 0 unknown, 1 no, 2 yes
  int device = 0;
  REGAP_RETURN_IF_ERROR(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < kMaxDevices;
  int state = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (state == 0) {
    int major = 0;
    REGAP_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    state = major >= 9 ? 2 : 1;
    if (cached) cache[device].store(state, std::memory_order_relaxed);
  }
  *has_pdl = state == 2;
  return cudaSuccess;
}

// kernel<<<grid, block, 0, stream>>>(args...), with programmatic dependent launch where the device
// has it: the grid's launch overlaps the tail of the previous kernel (about a microsecond per kernel
// boundary, which the small per-sample kernels feel). The kernel must call wait_for_previous_grid()
// first. Works under CUDA graph capture.
template <typename... KernelArgs, typename... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
  bool has_pdl = false;
  REGAP_RETURN_IF_ERROR(current_device_has_pdl(&has_pdl));
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = has_pdl ? 1 : 0;
  REGAP_RETURN_IF_ERROR(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  return cudaGetLastError();
}

// The largest grid.y / grid.z; kernels loop over the batch when it is larger.
constexpr int64_t kMaxGridYZ = 65535;

}  // namespace regap
