// CPU (OpenMP) generalized advantage estimation: one reverse scan per row, rows in parallel.
//
// Semantics (see kernels/gae.py): only positions with mask set take part. Scanning a row from the
// end, the value of the next valid position bootstraps the current one (0 after the last valid
// position), masked positions get advantage 0 and return 0 and leave the carried state unchanged:
//   delta_t = r_t + gamma * V_next - V_t,  A_t = delta_t + gamma * lam * A_next,  R_t = A_t + V_t.
//
// The recurrence is a chain of dependent multiply-adds (~4 cycles each), so a lone row runs at the
// FMA latency. Each thread scans kGroup rows in lockstep, giving the core kGroup independent
// chains to overlap; the selects keep the loop free of data-dependent branches (holes in the mask
// would otherwise mispredict). Memory: reads 9 bytes and writes 8 bytes per element.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace megarlhf {
namespace {

constexpr int64_t kGroup = 8;

template <int64_t K>
inline void scan_rows(const float* r, const float* v, const bool* m, float gamma, float gl,
                      float* adv, float* ret, int64_t b0, int64_t T) {
  float next_value[K], last_adv[K];
  for (int64_t k = 0; k < K; ++k) next_value[k] = last_adv[k] = 0.f;
  for (int64_t t = T - 1; t >= 0; --t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = (b0 + k) * T + t;
      const float vt = v[i];
      const bool mt = m[i];
      const float a = (r[i] + gamma * next_value[k] - vt) + gl * last_adv[k];
      adv[i] = mt ? a : 0.f;
      ret[i] = mt ? a + vt : 0.f;
      next_value[k] = mt ? vt : next_value[k];
      last_adv[k] = mt ? a : last_adv[k];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values,
                                       const at::Tensor& mask, double gamma, double lam) {
  TORCH_CHECK(rewards.dim() == 2, "gae: rewards must be [batch, T]");
  for (const at::Tensor* t : {&rewards, &values}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->sizes() == rewards.sizes(),
                "gae: rewards and values must be contiguous fp32 of one shape");
  }
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() &&
                  mask.sizes() == rewards.sizes(),
              "gae: mask must be a contiguous bool tensor shaped like rewards");
  const int64_t B = rewards.size(0), T = rewards.size(1);
  at::Tensor adv = at::empty({B, T}, rewards.options());
  at::Tensor ret = at::empty({B, T}, rewards.options());
  const float* r = rewards.const_data_ptr<float>();
  const float* v = values.const_data_ptr<float>();
  const bool* m = mask.const_data_ptr<bool>();
  float* a = adv.data_ptr<float>();
  float* rt = ret.data_ptr<float>();
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  const int64_t groups = (B + kGroup - 1) / kGroup;
  const int nt = at::get_num_threads();
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t grp = 0; grp < groups; ++grp) {
    const int64_t b0 = grp * kGroup;
    if (b0 + kGroup <= B) {
      scan_rows<kGroup>(r, v, m, g, gl, a, rt, b0, T);
    } else {
      for (int64_t b = b0; b < B; ++b) scan_rows<1>(r, v, m, g, gl, a, rt, b, T);
    }
  }
  return {adv, ret};
}

}  // namespace
}  // namespace megarlhf

TORCH_LIBRARY_FRAGMENT(megarlhf, m) {
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)",
        &megarlhf::gae);
}
