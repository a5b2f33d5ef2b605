// CPU (OpenMP) kernels of megarlhf.kernels.logprobs: per-row statistics of the tempered
// log-softmax over one vocabulary shard, and the gradient w.r.t. the logits.
//
// The Python side (kernels/logprobs.py) owns the vocab-parallel stages; these kernels compute
// the local pieces. Each row of logits is read once from memory: pass 1 (max) and pass 2
// (sum of exp) run over the same row while it sits in L2 (V = 32k fp32 is 128 KiB), and nothing
// of size [rows, V] is allocated in fp32; a bf16/fp16 row is widened into a per-thread buffer of V
// floats. The backward writes the gradient (logits' dtype) and allocates nothing else.
//
// Memory per call: forward reads N*V*b bytes (b = 2 or 4) and writes 16*N bytes; backward reads
// N*V*b and writes N*V*b.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace megarlhf {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Rows are handed out in small dynamic batches rather than one static slice per thread: on a busy
// machine a descheduled thread would otherwise hold the whole call up for its time slice; this way
// the running threads take its rows and it only owes the batch it is in.
constexpr int64_t kRowsPerTask = 16;

// Rows of a [B, T, V] view with unit stride along V: row n = b * T + t.
struct RowView {
  int64_t T, V, s0, s1;
  int64_t offset(int64_t n) const { return (n / T) * s0 + (n % T) * s1; }
};

RowView row_view(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 3, "logits must be viewed as [B, T, V], got ", logits.dim(), " dims");
  TORCH_CHECK(logits.stride(2) == 1, "logits must have unit stride along the vocabulary");
  return {logits.size(1), logits.size(2), logits.stride(0), logits.stride(1)};
}

// Pointer to row `n` as floats: fp32 rows are used in place, bf16/fp16 rows are widened into buf.
template <typename T>
const float* row_as_float(const T* base, const RowView& rv, int64_t n, float* buf) {
  const T* x = base + rv.offset(n);
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(x);
#pragma omp simd
    for (int64_t i = 0; i < rv.V; ++i) buf[i] = bf16_bits_to_float(h[i]);
    return buf;
  } else {
    for (int64_t i = 0; i < rv.V; ++i) buf[i] = static_cast<float>(x[i]);
    return buf;
  }
}

// Local statistics of one row of z = x * inv_temp: m = max z, s = sum exp(z - m),
// w = sum exp(z - m) * (z - m) (entropy numerator), zy = z[label] (0 when the label is elsewhere).
template <typename T>
void fwd_rows(const at::Tensor& logits, const int64_t* labels, float inv_temp, bool with_entropy,
              float* out_m, float* out_s, float* out_w, float* out_zy, int64_t N) {
  const RowView rv = row_view(logits);
  const T* base = logits.const_data_ptr<T>();
  const int nt = at::get_num_threads();
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : rv.V);
#pragma omp for schedule(dynamic, kRowsPerTask)
    for (int64_t n = 0; n < N; ++n) {
      const float* x = row_as_float(base, rv, n, buf.data());
      float xmax = kNegInf;
#pragma omp simd reduction(max : xmax)
      for (int64_t i = 0; i < rv.V; ++i) xmax = x[i] > xmax ? x[i] : xmax;
      // Scaling by inv_temp > 0 is monotone, so max(x) * inv_temp is max(x * inv_temp).
      const float m = xmax * inv_temp;
      float s = 0.f, w = 0.f;
      if (m > kNegInf) {  // a shard of only -inf columns contributes nothing (s = w = 0)
        if (with_entropy) {
#pragma omp simd reduction(+ : s, w)
          for (int64_t i = 0; i < rv.V; ++i) {
            const float d = x[i] * inv_temp - m;
            const float e = fast_exp(d);
            s += e;
            w += d > kExpUnderflow ? e * d : 0.f;  // 0 * -inf would be NaN
          }
        } else {
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < rv.V; ++i) s += fast_exp(x[i] * inv_temp - m);
        }
      }
      const int64_t y = labels[n];
      out_m[n] = m;
      out_s[n] = s;
      out_w[n] = w;
      out_zy[n] = (y >= 0 && y < rv.V) ? x[y] * inv_temp : 0.f;
    }
  }
}

at::Tensor logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels, double inv_temp,
                        bool with_entropy) {
  const int64_t N = logits.size(0) * logits.size(1);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == N,
              "labels must be a contiguous int64 tensor with one entry per row");
  at::Tensor stats = at::empty({4, N}, logits.options().dtype(at::kFloat));
  float* st = stats.data_ptr<float>();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const float it = static_cast<float>(inv_temp);
  switch (logits.scalar_type()) {
    case at::kFloat:
      fwd_rows<float>(logits, lab, it, with_entropy, st, st + N, st + 2 * N, st + 3 * N, N);
      break;
    case at::kBFloat16:
      fwd_rows<c10::BFloat16>(logits, lab, it, with_entropy, st, st + N, st + 2 * N, st + 3 * N,
                              N);
      break;
    case at::kHalf:
      fwd_rows<c10::Half>(logits, lab, it, with_entropy, st, st + N, st + 2 * N, st + 3 * N, N);
      break;
    default:
      TORCH_CHECK(false, "logprobs_fwd: unsupported dtype ", logits.scalar_type());
  }
  return stats;
}

template <typename T>
void store_row(const float* g, T* out, int64_t V) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint16_t* h = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) h[i] = float_to_bf16_bits(g[i]);
  } else {
    for (int64_t i = 0; i < V; ++i) out[i] = static_cast<T>(g[i]);
  }
}

// d/dx_v of (g_lp * logp + g_ent * H) with p = exp(z - lse), t = z - lse:
//   inv_temp * (g_lp * [v == y] - p_v * (g_lp + g_ent * H + g_ent * t_v)).
template <typename T>
void bwd_rows(const at::Tensor& logits, const int64_t* labels, const float* lse, const float* ent,
              const float* g_lp, const float* g_ent, float inv_temp, T* grad, int64_t N) {
  const RowView rv = row_view(logits);
  const T* base = logits.const_data_ptr<T>();
  const int64_t V = rv.V;
  const int nt = at::get_num_threads();
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : V);
    std::vector<float> gbuf(std::is_same_v<T, float> ? 0 : V);
#pragma omp for schedule(dynamic, kRowsPerTask)
    for (int64_t n = 0; n < N; ++n) {
      T* out = grad + n * V;
      float* g = std::is_same_v<T, float> ? reinterpret_cast<float*>(out) : gbuf.data();
      const float gl = g_lp[n], ge = g_ent[n];
      if (gl == 0.f && ge == 0.f) {  // ignored rows: exactly zero, even for degenerate logits
#pragma omp simd
        for (int64_t i = 0; i < V; ++i) g[i] = 0.f;
      } else {
        const float* x = row_as_float(base, rv, n, buf.data());
        const float l = lse[n];
        const float a = gl + ge * ent[n];
#pragma omp simd
        for (int64_t i = 0; i < V; ++i) {
          const float t = x[i] * inv_temp - l;
          const float p = fast_exp(t);
          g[i] = t > kExpUnderflow ? -inv_temp * p * (a + ge * t) : 0.f;
        }
        const int64_t y = labels[n];
        if (y >= 0 && y < V) g[y] += inv_temp * gl;
      }
      if constexpr (!std::is_same_v<T, float>) store_row(g, out, V);
    }
  }
}

at::Tensor logprobs_bwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                        const at::Tensor& ent, const at::Tensor& g_lp, const at::Tensor& g_ent,
                        double inv_temp) {
  const int64_t N = logits.size(0) * logits.size(1);
  for (const at::Tensor* t : {&lse, &ent, &g_lp, &g_ent}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == N,
                "logprobs_bwd: per-row tensors must be contiguous fp32 with one entry per row");
  }
  const RowView rv = row_view(logits);
  at::Tensor grad = at::empty({logits.size(0), logits.size(1), rv.V}, logits.options());
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  const float* l = lse.const_data_ptr<float>();
  const float* h = ent.const_data_ptr<float>();
  const float* gl = g_lp.const_data_ptr<float>();
  const float* ge = g_ent.const_data_ptr<float>();
  const float it = static_cast<float>(inv_temp);
  switch (logits.scalar_type()) {
    case at::kFloat:
      bwd_rows<float>(logits, lab, l, h, gl, ge, it, grad.data_ptr<float>(), N);
      break;
    case at::kBFloat16:
      bwd_rows<c10::BFloat16>(logits, lab, l, h, gl, ge, it, grad.data_ptr<c10::BFloat16>(), N);
      break;
    case at::kHalf:
      bwd_rows<c10::Half>(logits, lab, l, h, gl, ge, it, grad.data_ptr<c10::Half>(), N);
      break;
    default:
      TORCH_CHECK(false, "logprobs_bwd: unsupported dtype ", logits.scalar_type());
  }
  return grad;
}

}  // namespace
}  // namespace megarlhf

TORCH_LIBRARY_FRAGMENT(megarlhf, m) {
  m.def("logprobs_fwd(Tensor logits, Tensor labels, float inv_temp, bool with_entropy) -> Tensor",
        &megarlhf::logprobs_fwd);
  m.def(
      "logprobs_bwd(Tensor logits, Tensor labels, Tensor lse, Tensor ent, Tensor g_lp, "
      "Tensor g_ent, float inv_temp) -> Tensor",
      &megarlhf::logprobs_bwd);
}
