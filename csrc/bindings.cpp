// regap_fast._C: thin pybind11 bindings of the CUDA kernels. The only file that includes torch
// headers (they dominate compile time); the kernel files take raw pointers and strides.
//
// Layout: helpers shared by every op, then one section per kernel file (gap_loss.cu, ...);
// PYBIND11_MODULE at the bottom exports them all. Python checks every input a user can get wrong,
// with the messages users see (regap_fast/_validation.py); the TORCH_CHECKs here keep only what
// protects memory from a direct caller of regap_fast._C (device, rank, sizes, dtypes).

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "gap_loss.h"
#include "projector.h"
#include "text_pool.h"

namespace {

// --------------------------------------------------------------------------------------------------
// shared helpers
// --------------------------------------------------------------------------------------------------

regap::DType kernel_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return regap::DType::kFloat32;
    case at::kHalf: return regap::DType::kFloat16;
    case at::kBFloat16: return regap::DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": the CUDA kernels support float32, float16 and bfloat16, got ", t);
  }
  return regap::DType::kFloat32;  // unreachable
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "regap_fast._C.", what, ": CUDA error: ", cudaGetErrorString(err));
}

void check_cuda_tensor(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but the other inputs are on ", device);
}

// A [B, N] bool (or uint8) mask, read as bytes: nonzero = the token counts.
void check_mask(const std::optional<at::Tensor>& mask, const char* name, int64_t batch, int64_t rows,
                const at::Device& device) {
  if (!mask.has_value()) return;
  check_cuda_tensor(*mask, name, device);
  TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte, name,
              " must be a bool tensor, got ", mask->scalar_type());
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == batch && mask->size(1) == rows, name, " must have shape [",
              batch, ", ", rows, "], got ", mask->sizes());
}

const uint8_t* mask_data(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? static_cast<const uint8_t*>(mask->data_ptr()) : nullptr;
}

// A [B, N, D] token tensor and its mask as the kernels see them (no copy: any strides work).
regap::TokenSide token_side(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  regap::TokenSide s;
  s.data = x.data_ptr();
  s.rows = x.size(1);
  s.stride_b = x.stride(0);
  s.stride_n = x.stride(1);
  s.stride_d = x.stride(2);
  s.mask = mask_data(mask);
  if (mask.has_value()) {
    s.mask_stride_b = mask->stride(0);
    s.mask_stride_n = mask->stride(1);
  }
  return s;
}

void check_tokens(const at::Tensor& x, const char* name, const at::Device& device) {
  check_cuda_tensor(x, name, device);
  TORCH_CHECK(x.dim() == 3, name, " must have shape [B, N, D], got ", x.sizes());
  TORCH_CHECK(x.size(0) > 0 && x.size(2) > 0, name, " must have a non-empty batch and feature size, got ",
              x.sizes());
  kernel_dtype(x.scalar_type(), name);
}

// An fp32 view of a per-sample scalar: a 0-d or one-element tensor broadcasts (stride 0), else [B].
std::pair<at::Tensor, int64_t> per_sample(const at::Tensor& t, const char* name, int64_t batch,
                                          const at::Device& device) {
  check_cuda_tensor(t, name, device);
  const at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  if (f.numel() == 1) return {f, 0};
  TORCH_CHECK(f.dim() == 1 && f.size(0) == batch, name, " must be a scalar or have shape [", batch, "], got ",
              f.sizes());
  return {f, f.stride(0)};
}

// --------------------------------------------------------------------------------------------------
// gap_loss.cu: pooled gap loss, masked mean, broadcast-rows backward
// --------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> gap_loss_forward(const at::Tensor& image_embeds,
                                                                const at::Tensor& caption_embeds,
                                                                const std::optional<at::Tensor>& image_mask,
                                                                const std::optional<at::Tensor>& caption_mask,
                                                                int64_t reduction, bool squared) {
  const at::Device device = image_embeds.device();
  check_tokens(image_embeds, "image_embeds", device);
  check_tokens(caption_embeds, "caption_embeds", device);
  TORCH_CHECK(image_embeds.scalar_type() == caption_embeds.scalar_type(),
              "image_embeds and caption_embeds must have the same dtype");
  TORCH_CHECK(image_embeds.size(0) == caption_embeds.size(0) && image_embeds.size(2) == caption_embeds.size(2),
              "image_embeds ", image_embeds.sizes(), " and caption_embeds ", caption_embeds.sizes(),
              " must agree in B and D");
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction must be 0 (none), 1 (sum) or 2 (mean), got ", reduction);
  const int64_t batch = image_embeds.size(0), dim = image_embeds.size(2);
  check_mask(image_mask, "image_mask", batch, image_embeds.size(1), device);
  check_mask(caption_mask, "caption_mask", batch, caption_embeds.size(1), device);
  const regap::DType dtype = kernel_dtype(image_embeds.scalar_type(), "image_embeds");

  const c10::cuda::CUDAGuard guard(device);
  const regap::TokenSide image = token_side(image_embeds, image_mask);
  const regap::TokenSide caption = token_side(caption_embeds, caption_mask);
  regap::PoolPlan plan;
  check_launch(regap::plan_pool(image, &caption, batch, dim, dtype, &plan), "gap_loss_forward");

  const auto f32 = image_embeds.options().dtype(at::kFloat);
  // freed when this function returns: the caching allocator reuses it only after the kernels on
  // this stream are done with it
  at::Tensor partial = at::empty({batch, plan.slots(), dim}, f32);
  at::Tensor direction = at::empty({batch, dim}, f32);
  at::Tensor gaps = at::empty({batch}, f32);
  at::Tensor stats = at::empty({3, batch}, f32);
  at::Tensor loss = reduction == 0 ? gaps : at::empty({}, f32);
  check_launch(regap::gap_loss_forward(image, caption, batch, dim, dtype, static_cast<regap::Reduction>(reduction),
                                       squared, plan, partial.data_ptr<float>(), direction.data_ptr<float>(),
                                       gaps.data_ptr<float>(), stats.data_ptr<float>(), loss.data_ptr<float>(),
                                       at::cuda::getCurrentCUDAStream()),
               "gap_loss_forward");
  return {loss, direction, stats};
}

std::tuple<at::Tensor, at::Tensor> masked_mean_forward(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  const at::Device device = x.device();
  check_tokens(x, "x", device);
  const int64_t batch = x.size(0), dim = x.size(2);
  check_mask(mask, "mask", batch, x.size(1), device);
  const regap::DType dtype = kernel_dtype(x.scalar_type(), "x");

  const c10::cuda::CUDAGuard guard(device);
  const regap::TokenSide side = token_side(x, mask);
  regap::PoolPlan plan;
  check_launch(regap::plan_pool(side, nullptr, batch, dim, dtype, &plan), "masked_mean_forward");

  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({batch, plan.slots(), dim}, f32);
  at::Tensor mean = at::empty({batch, dim}, f32);
  at::Tensor inv_count = at::empty({batch}, f32);
  check_launch(regap::masked_mean_forward(side, batch, dim, dtype, plan, partial.data_ptr<float>(),
                                          mean.data_ptr<float>(), inv_count.data_ptr<float>(),
                                          at::cuda::getCurrentCUDAStream()),
               "masked_mean_forward");
  return {mean, inv_count};
}

// One side of broadcast_rows as Python passes it: regap_fast._primitives.BroadcastSide, a NamedTuple
// (inv [B], rows, mask [B, rows] or None, sign); None: the side is not needed.
using SideArg = std::optional<std::tuple<at::Tensor, int64_t, std::optional<at::Tensor>, double>>;

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> broadcast_rows(
    const at::Tensor& v, const at::Tensor& g, const at::Tensor& w, const SideArg& side_a, const SideArg& side_t,
    at::ScalarType dtype) {
  const at::Device device = v.device();
  check_cuda_tensor(v, "v", device);
  TORCH_CHECK(v.dim() == 2 && v.size(0) > 0 && v.size(1) > 0, "v must have shape [B, D] with B, D > 0, got ",
              v.sizes());
  const int64_t batch = v.size(0), dim = v.size(1);
  const regap::DType out_dtype = kernel_dtype(dtype, "dtype");

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor vf = v.scalar_type() == at::kFloat ? v : v.to(at::kFloat);
  const auto [gf, g_stride] = per_sample(g, "g", batch, device);
  const auto [wf, w_stride] = per_sample(w, "w", batch, device);

  regap::BroadcastVector vec;
  vec.v = vf.data_ptr<float>();
  vec.stride_b = vf.stride(0);
  vec.stride_d = vf.stride(1);
  vec.g = gf.data_ptr<float>();
  vec.g_stride = g_stride;
  vec.w = wf.data_ptr<float>();
  vec.w_stride = w_stride;

  // Keeps the fp32 views of inv alive until the launch.
  std::optional<at::Tensor> inv_keep[2];
  auto side = [&](const SideArg& arg, const char* name, int which, std::optional<at::Tensor>* out) {
    regap::BroadcastSide s;
    if (!arg.has_value()) return s;
    const auto& [inv, rows, mask, sign] = *arg;
    TORCH_CHECK(rows >= 0, name, ".rows must be >= 0, got ", rows);
    check_mask(mask, name, batch, rows, device);
    *out = at::empty({batch, mask.has_value() ? rows : 1, dim}, v.options().dtype(dtype));
    const auto [invf, inv_stride] = per_sample(inv, name, batch, device);
    inv_keep[which] = invf;
    s.out = (*out)->data_ptr();
    s.rows = (*out)->size(1);
    s.mask = mask_data(mask);
    if (mask.has_value()) {
      s.mask_stride_b = mask->stride(0);
      s.mask_stride_n = mask->stride(1);
    }
    s.inv = invf.data_ptr<float>();
    s.inv_stride = inv_stride;
    s.sign = static_cast<float>(sign);
    return s;
  };
  std::optional<at::Tensor> out_a, out_t;
  const regap::BroadcastSide a = side(side_a, "side_a", 0, &out_a);
  const regap::BroadcastSide t = side(side_t, "side_t", 1, &out_t);
  check_launch(regap::broadcast_rows(vec, a, t, batch, dim, out_dtype, at::cuda::getCurrentCUDAStream()),
               "broadcast_rows");
  return {out_a, out_t};
}


// --------------------------------------------------------------------------------------------------
// projector.cu: the projector's GEMM epilogues (the GEMMs are cuBLAS, called from Python)
// --------------------------------------------------------------------------------------------------

// A [rows] bool (or uint8) mask of the flattened token rows, read as bytes; any stride.
void check_row_mask(const std::optional<at::Tensor>& mask, const char* name, int64_t rows,
                    const at::Device& device) {
  if (!mask.has_value()) return;
  check_cuda_tensor(*mask, name, device);
  TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte, name,
              " must be a bool tensor, got ", mask->scalar_type());
  TORCH_CHECK(mask->dim() == 1 && mask->size(0) == rows, name, " must have shape [", rows, "], got ",
              mask->sizes());
}

// A [M, N] matrix as the row kernels read it: unit stride along N (else a contiguous copy).
at::Tensor unit_column_stride(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

void check_matrix(const at::Tensor& t, const char* name, const at::Device& device) {
  check_cuda_tensor(t, name, device);
  TORCH_CHECK(t.dim() == 2, name, " must have shape [M, N], got ", t.sizes());
  kernel_dtype(t.scalar_type(), name);
}

std::tuple<at::Tensor, std::optional<at::Tensor>> gelu_pool_forward(const at::Tensor& pre_in,
                                                                    const std::optional<at::Tensor>& mask,
                                                                    int64_t rows_per_sample, int64_t batch,
                                                                    bool pool) {
  const at::Device device = pre_in.device();
  check_matrix(pre_in, "pre", device);
  const int64_t rows = pre_in.size(0), cols = pre_in.size(1);
  check_row_mask(mask, "mask_flat", rows, device);
  TORCH_CHECK(batch >= 0, "batch must be >= 0, got ", batch);
  TORCH_CHECK(!pool || rows == 0 || rows_per_sample >= 1, "rows_per_sample must be >= 1, got ", rows_per_sample);
  const regap::DType dtype = kernel_dtype(pre_in.scalar_type(), "pre");

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor pre = unit_column_stride(pre_in);
  at::Tensor h = at::empty({rows, cols}, pre.options());
  std::optional<at::Tensor> pooled;
  if (pool) pooled = at::empty({batch, cols}, pre.options().dtype(at::kFloat));

  regap::GeluPoolArgs a;
  a.pre = pre.data_ptr();
  a.pre_stride = pre.stride(0);
  a.h = h.data_ptr();
  a.h_stride = h.stride(0);
  a.rows = rows;
  a.cols = cols;
  a.mask = mask_data(mask);
  a.mask_stride = mask.has_value() ? mask->stride(0) : 0;
  a.rows_per_sample = rows_per_sample;
  a.batch = batch;
  a.pooled = pool && batch > 0 && cols > 0 ? pooled->data_ptr<float>() : nullptr;
  regap::GeluPoolPlan plan;
  check_launch(regap::plan_gelu_pool(a, dtype, &plan), "gelu_pool_forward");
  // freed on return: the caching allocator reuses it only after the kernels on this stream are done
  at::Tensor partial;
  if (plan.partial_rows() > 0) partial = at::empty({plan.partial_rows(), cols}, pre.options().dtype(at::kFloat));
  check_launch(regap::gelu_pool_forward(a, dtype, plan, partial.defined() ? partial.data_ptr<float>() : nullptr,
                                        at::cuda::getCurrentCUDAStream()),
               "gelu_pool_forward");
  return {h, pooled};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> dgelu_backward(const at::Tensor& dh_in, const at::Tensor& pre_in,
                                                                 const std::optional<at::Tensor>& mask,
                                                                 int64_t rows_per_sample,
                                                                 const std::optional<at::Tensor>& vec_in,
                                                                 bool need_dbias, bool overwrite_dh) {
  const at::Device device = pre_in.device();
  check_matrix(pre_in, "pre", device);
  check_matrix(dh_in, "dh", device);
  TORCH_CHECK(dh_in.sizes() == pre_in.sizes(), "dh ", dh_in.sizes(), " and pre ", pre_in.sizes(),
              " must have the same shape");
  TORCH_CHECK(dh_in.scalar_type() == pre_in.scalar_type(), "dh (", dh_in.scalar_type(), ") and pre (",
              pre_in.scalar_type(), ") must have the same dtype");
  const int64_t rows = pre_in.size(0), cols = pre_in.size(1);
  check_row_mask(mask, "mask_flat", rows, device);
  if (vec_in.has_value()) {
    check_cuda_tensor(*vec_in, "vec", device);
    TORCH_CHECK(vec_in->dim() == 2 && vec_in->size(1) == cols, "vec must have shape [B, ", cols, "], got ",
                vec_in->sizes());
    TORCH_CHECK(rows == 0 || rows_per_sample >= 1, "rows_per_sample must be >= 1, got ", rows_per_sample);
  }
  const regap::DType dtype = kernel_dtype(pre_in.scalar_type(), "pre");

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor pre = unit_column_stride(pre_in);
  const at::Tensor dh = unit_column_stride(dh_in);
  // in place only into a tensor whose elements are all distinct (an expanded dh would be a race)
  const at::Tensor dpre = overwrite_dh && dh.is_contiguous() ? dh : at::empty({rows, cols}, pre.options());
  std::optional<at::Tensor> vec;
  if (vec_in.has_value()) vec = vec_in->scalar_type() == at::kFloat ? *vec_in : vec_in->to(at::kFloat);
  std::optional<at::Tensor> dbias;
  if (need_dbias) dbias = at::empty({cols}, pre.options().dtype(at::kFloat));

  regap::DGeluArgs a;
  a.dh = dh.data_ptr();
  a.dh_stride = dh.stride(0);
  a.pre = pre.data_ptr();
  a.pre_stride = pre.stride(0);
  a.dpre = dpre.data_ptr();
  a.dpre_stride = dpre.stride(0);
  a.rows = rows;
  a.cols = cols;
  a.mask = mask_data(mask);
  a.mask_stride = mask.has_value() ? mask->stride(0) : 0;
  a.rows_per_sample = rows_per_sample;
  if (vec.has_value() && vec->numel() > 0) {
    a.vec = vec->data_ptr<float>();
    a.vec_rows = vec->size(0);
    a.vec_stride_b = vec->stride(0);
    a.vec_stride_n = vec->stride(1);
  }
  a.dbias = need_dbias && cols > 0 ? dbias->data_ptr<float>() : nullptr;
  regap::DGeluPlan plan;
  check_launch(regap::plan_dgelu(a, dtype, &plan), "dgelu_backward");
  at::Tensor partial;
  if (plan.partial_rows() > 0) partial = at::empty({plan.partial_rows(), cols}, pre.options().dtype(at::kFloat));
  check_launch(regap::dgelu_backward(a, dtype, plan, partial.defined() ? partial.data_ptr<float>() : nullptr,
                                     at::cuda::getCurrentCUDAStream()),
               "dgelu_backward");
  return {dpre, dbias};
}

at::Tensor mean_split(const at::Tensor& v, const std::optional<at::Tensor>& counts, at::ScalarType dtype) {
  const at::Device device = v.device();
  check_cuda_tensor(v, "v", device);
  TORCH_CHECK(v.dim() == 2 && v.scalar_type() == at::kFloat, "v must be a [B, N] float32 tensor, got ",
              v.scalar_type(), " ", v.sizes());
  const int64_t batch = v.size(0), cols = v.size(1);
  const regap::DType out_dtype = kernel_dtype(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(device);
  std::optional<std::pair<at::Tensor, int64_t>> n;
  if (counts.has_value()) n = per_sample(*counts, "counts", batch, device);
  const bool split = out_dtype != regap::DType::kFloat32;
  at::Tensor out = at::empty({(split ? 2 : 1) * batch, cols}, v.options().dtype(dtype));
  regap::MeanSplitArgs a;
  a.v = v.data_ptr<float>();
  a.v_stride_b = v.stride(0);
  a.v_stride_n = v.stride(1);
  if (n.has_value()) {
    a.counts = n->first.data_ptr<float>();
    a.counts_stride = n->second;
  }
  a.batch = batch;
  a.cols = cols;
  a.out = out.data_ptr();
  a.split = split;
  check_launch(regap::mean_split(a, out_dtype, at::cuda::getCurrentCUDAStream()), "mean_split");
  return out;
}


// --------------------------------------------------------------------------------------------------
// text_pool.cu: embedding-bag mean of the caption tokens
// --------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> gather_mean_forward(const at::Tensor& ids, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& mask) {
  const at::Device device = weight.device();
  check_cuda_tensor(weight, "weight", device);
  check_cuda_tensor(ids, "input_ids", device);
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "input_ids must be an int32 or int64 tensor, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2, "input_ids must have shape [B, T], got ", ids.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must have shape [V, D], got ", weight.sizes());
  const regap::DType dtype = kernel_dtype(weight.scalar_type(), "weight");
  const int64_t batch = ids.size(0), tokens = ids.size(1), dim = weight.size(1);
  check_mask(mask, "caption_mask", batch, tokens, device);

  const c10::cuda::CUDAGuard guard(device);
  const auto f32 = weight.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({batch, dim}, f32);
  at::Tensor inv_count = at::empty({batch}, f32);
  regap::GatherArgs a;
  a.ids = ids.data_ptr();
  a.ids_int64 = ids.scalar_type() == at::kLong;
  a.ids_stride_b = ids.stride(0);
  a.ids_stride_t = ids.stride(1);
  a.weight = weight.data_ptr();
  a.weight_rows = weight.size(0);
  a.weight_stride_v = weight.stride(0);
  a.weight_stride_d = weight.stride(1);
  a.batch = batch;
  a.tokens = tokens;
  a.dim = dim;
  a.mask = mask_data(mask);
  if (mask.has_value()) {
    a.mask_stride_b = mask->stride(0);
    a.mask_stride_t = mask->stride(1);
  }
  regap::GatherPlan plan;
  check_launch(regap::plan_gather_mean(a, dtype, &plan), "gather_mean_forward");
  at::Tensor partial, counts;
  if (plan.needs_partial()) {
    partial = at::empty({batch, plan.chunks, dim}, f32);
    counts = at::empty({batch, plan.chunks}, weight.options().dtype(at::kInt));
  }
  check_launch(regap::gather_mean_forward(a, dtype, plan, partial.defined() ? partial.data_ptr<float>() : nullptr,
                                          counts.defined() ? reinterpret_cast<unsigned*>(counts.data_ptr<int>())
                                                           : nullptr,
                                          mean.data_ptr<float>(), inv_count.data_ptr<float>(),
                                          at::cuda::getCurrentCUDAStream()),
               "gather_mean_forward");
  return {mean, inv_count};
}


}  // namespace

// The GPU code this module holds (setup.py / CMakeLists.txt pass it): "sm_80,sm_90,compute_90".
#ifndef REGAP_FAST_CUDA_ARCHS
#define REGAP_FAST_CUDA_ARCHS
#endif
#define REGAP_STRINGIFY_(...) #__VA_ARGS__
#define REGAP_STRINGIFY(...) REGAP_STRINGIFY_(__VA_ARGS__)

std::vector<std::string> cuda_archs() {
  std::vector<std::string> out;
  std::string all = REGAP_STRINGIFY(REGAP_FAST_CUDA_ARCHS);
  for (size_t start = 0; start < all.size();) {
    const size_t end = std::min(all.find(',', start), all.size());
    if (end > start) out.push_back(all.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

// Each function's contract is in its header (gap_loss.h, projector.h, text_pool.h) and in the Python
// backend that calls it (regap_fast/backends/cuda_backend.py, with the torch backend's docstrings).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "regap_fast CUDA kernels (the `cuda` backend); see regap_fast/backends/cuda_backend.py";
  m.def("cuda_archs", &cuda_archs, "The GPU architectures compiled in: SASS as sm_XY, PTX as compute_XY.");
  m.def("gap_loss_forward", &gap_loss_forward, "(loss, direction, stats): see gap_loss.h", py::arg("image_embeds"),
        py::arg("caption_embeds"), py::arg("image_mask"), py::arg("caption_mask"), py::arg("reduction"),
        py::arg("squared"));
  m.def("masked_mean_forward", &masked_mean_forward, "(mean, inv_count): see gap_loss.h", py::arg("x"),
        py::arg("mask"));
  m.def("broadcast_rows", &broadcast_rows, "(out_a, out_t): see gap_loss.h", py::arg("v"), py::arg("g"),
        py::arg("w"), py::arg("side_a"), py::arg("side_t"), py::arg("dtype"));
  m.def("gelu_pool_forward", &gelu_pool_forward, "(h, pooled_sum): see projector.h", py::arg("pre"),
        py::arg("mask_flat"), py::arg("rows_per_sample"), py::arg("batch"), py::arg("pool"));
  m.def("dgelu_backward", &dgelu_backward, "(dpre, db): see projector.h", py::arg("dh"), py::arg("pre"),
        py::arg("mask_flat"), py::arg("rows_per_sample"), py::arg("vec"), py::arg("need_dbias"),
        py::arg("overwrite_dh"));
  m.def("mean_split", &mean_split, "hi/lo rows of v / counts: see projector.h", py::arg("v"), py::arg("counts"),
        py::arg("dtype"));
  m.def("gather_mean_forward", &gather_mean_forward, "(mean, inv_count): see text_pool.h", py::arg("input_ids"),
        py::arg("weight"), py::arg("caption_mask"));
}
