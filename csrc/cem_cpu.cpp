// CEM hot operations on the CPU (ATen + OpenMP through at::parallel_for), the contract of
// cem_fast/backends/torch_backend.py:
//   assign_stats(z, labels, centroids, m, class_conditional) -> (assign [B] int64, counts [K], sqdev [K, D])
//   scatter_grad(z, assign, centroids, coef) -> dz, dz[i] = coef[a_i] * (z_i - mu[a_i]) in z's dtype
// Deterministic without atomics: assignment is per row; the statistics come from a stable counting
// sort of the rows by cluster, each output element summed by one thread in row order, so the result
// does not depend on the thread count (and sqdev matches torch's index_add_ bit for bit).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#define CEM_INLINE inline __attribute__((always_inline))

// ----------------------------------------------------------------------------- instruction-set tiers
// The same kernels compiled for several x86 tiers (portable build flags, no -march=native), chosen at
// run time. Other compilers / architectures get the baseline tier only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CEM_X86_TIERS 1
#endif

namespace cem_base {
#define CEM_TILE 2
#define CEM_VEC_BYTES 16
#include "cem_cpu_kernels.h"
#undef CEM_VEC_BYTES
#undef CEM_TILE
}  // namespace cem_base

#ifdef CEM_X86_TIERS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace cem_avx2 {
#define CEM_TILE 4
#define CEM_VEC_BYTES 32
#include "cem_cpu_kernels.h"
#undef CEM_VEC_BYTES
#undef CEM_TILE
}  // namespace cem_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma,prefer-vector-width=512")
namespace cem_avx512 {
#define CEM_TILE 4
#define CEM_VEC_BYTES 64
#include "cem_cpu_kernels.h"
#undef CEM_VEC_BYTES
#undef CEM_TILE
}  // namespace cem_avx512
#pragma GCC pop_options
#endif

namespace {

enum class Tier { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
const char* kTierNames[] = {"base", "avx2", "avx512"};

Tier best_supported_tier() {
#ifdef CEM_X86_TIERS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Tier::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Tier::kAvx2;
#endif
  return Tier::kBase;
}

Tier& current_tier() {
  static Tier tier = best_supported_tier();
  return tier;
}

std::string cpu_tier() { return kTierNames[static_cast<int>(current_tier())]; }

// For tests and benchmarks: run a lower tier (all tiers give identical bits).
void set_cpu_tier(const std::string& name) {
  for (int t = 0; t <= static_cast<int>(best_supported_tier()); ++t) {
    if (name == kTierNames[t]) {
      current_tier() = static_cast<Tier>(t);
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "set_cpu_tier: tier must be one this CPU supports (up to '",
                    kTierNames[static_cast<int>(best_supported_tier())], "'), got '", name, "'");
}

#ifdef CEM_X86_TIERS
// Calls fn<scalar_t, acc_t>(...) of the current tier (inside AT_DISPATCH, where both types are defined).
#define CEM_TIER_CALL(fn, ...)                                                    \
  switch (current_tier()) {                                                       \
    case Tier::kAvx512: cem_avx512::fn<scalar_t, acc_t>(__VA_ARGS__); break;      \
    case Tier::kAvx2: cem_avx2::fn<scalar_t, acc_t>(__VA_ARGS__); break;          \
    default: cem_base::fn<scalar_t, acc_t>(__VA_ARGS__); break;                   \
  }
#else
#define CEM_TIER_CALL(fn, ...) cem_base::fn<scalar_t, acc_t>(__VA_ARGS__);
#endif

// ----------------------------------------------------------------------------- validation

// Names as Python spells them (torch.float32, ...), not ATen's (Float, ...).
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    default: return c10::toString(t);
  }
}

at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_z(const char* fn, const at::Tensor& z) {
  TORCH_CHECK_TYPE(z.device().is_cpu(), fn, ": z must be a CPU tensor, got device ", z.device());
  TORCH_CHECK_VALUE(z.dim() == 2, fn, ": z must be 2-D [B, D], got shape ", z.sizes());
  const auto t = z.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, fn,
                   ": z must be float32, float64, bfloat16 or float16, got ", dtype_name(t));
}

void check_centroids(const char* fn, const at::Tensor& z, const at::Tensor& centroids) {
  TORCH_CHECK_TYPE(centroids.device().is_cpu(), fn, ": centroids must be a CPU tensor, got device ",
                   centroids.device());
  TORCH_CHECK_VALUE(centroids.dim() == 2 && centroids.size(1) == z.size(1), fn,
                    ": centroids must be [K, D] with D = z.size(1) = ", z.size(1), ", got shape ",
                    centroids.sizes());
  const auto acc = accumulation_dtype(z.scalar_type());
  TORCH_CHECK_TYPE(centroids.scalar_type() == acc, fn, ": centroids must have the accumulation dtype ",
                   dtype_name(acc), " of z (", dtype_name(z.scalar_type()), "), got ",
                   dtype_name(centroids.scalar_type()));
}

void check_index_vector(const char* fn, const char* name, const at::Tensor& t, int64_t B) {
  TORCH_CHECK_TYPE(t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, fn, ": ", name, " must be int64, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, fn, ": ", name, " must be 1-D of length B = ", B,
                    ", got shape ", t.sizes());
}

void check_range(const char* fn, const char* name, const int64_t* v, int64_t n, int64_t hi) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(v[i] >= 0 && v[i] < hi, fn, ": ", name, " must lie in [0, ", hi, "), got ", v[i],
                      " at index ", i);
  }
}

// ----------------------------------------------------------------------------- operations

// Below this many (row, centroid, dimension) terms one thread does it all: a fork/join costs more.
constexpr int64_t kSerialPairs = 1 << 17;

std::tuple<at::Tensor, at::Tensor, at::Tensor> assign_stats(const at::Tensor& z_in, const at::Tensor& labels_in,
                                                            const at::Tensor& centroids_in, int64_t m,
                                                            bool class_conditional) {
  const char* fn = "assign_stats";
  check_z(fn, z_in);
  check_centroids(fn, z_in, centroids_in);
  TORCH_CHECK_VALUE(m >= 1, fn, ": m (clusters per class) must be >= 1, got ", m);
  const int64_t B = z_in.size(0), D = z_in.size(1), K = centroids_in.size(0);
  const at::Tensor z = z_in.contiguous();
  const at::Tensor centroids = centroids_in.contiguous();
  at::Tensor labels;
  if (class_conditional) {
    check_index_vector(fn, "labels", labels_in, B);
    TORCH_CHECK_VALUE(K % m == 0, fn, ": K = centroids.size(0) = ", K, " must be num_classes * m with m = ", m);
    labels = labels_in.contiguous();
    check_range(fn, "labels", labels.data_ptr<int64_t>(), B, K / m);
  } else {
    TORCH_CHECK_VALUE(B == 0 || K >= 1, fn, ": centroids must have at least one row when B > 0");
  }

  const auto acc = centroids.scalar_type();
  at::Tensor assign = at::empty({B}, z.options().dtype(at::kLong));
  at::Tensor counts = at::zeros({K}, centroids.options());
  at::Tensor sqdev = at::zeros({K, D}, centroids.options());
  if (B == 0) return {assign, counts, sqdev};

  int64_t* a = assign.data_ptr<int64_t>();
  const int64_t* y = class_conditional ? labels.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "cem_assign_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == acc);
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const acc_t* mu = centroids.data_ptr<acc_t>();
    acc_t* sq = sqdev.data_ptr<acc_t>();
    const int64_t pairs = B * (class_conditional ? m : K) * std::max<int64_t>(D, 1);
    if (at::get_num_threads() == 1 || at::in_parallel_region() || pairs < kSerialPairs) {
      CEM_TIER_CALL(assign_sqdev_serial, zp, y, mu, B, D, K, m, a, sq);
    } else {
      CEM_TIER_CALL(assign_kernel, zp, y, mu, B, D, K, m, a);
      // Stable counting sort of the rows by cluster: members of cluster k in increasing row order.
      std::vector<int64_t> start(K + 1, 0), members(B);
      for (int64_t i = 0; i < B; ++i) ++start[a[i] + 1];
      for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
      std::vector<int64_t> next(start.begin(), start.end() - 1);
      for (int64_t i = 0; i < B; ++i) members[next[a[i]]++] = i;
      CEM_TIER_CALL(sqdev_kernel, zp, mu, members.data(), start.data(), D, K, sq);
    }
    std::vector<int64_t> n(K, 0);
    for (int64_t i = 0; i < B; ++i) ++n[a[i]];
    acc_t* cnt = counts.data_ptr<acc_t>();
    for (int64_t k = 0; k < K; ++k) cnt[k] = static_cast<acc_t>(n[k]);
  });
  return {assign, counts, sqdev};
}

at::Tensor scatter_grad(const at::Tensor& z_in, const at::Tensor& assign_in, const at::Tensor& centroids_in,
                        const at::Tensor& coef_in) {
  const char* fn = "scatter_grad";
  check_z(fn, z_in);
  check_centroids(fn, z_in, centroids_in);
  const int64_t B = z_in.size(0), D = z_in.size(1), K = centroids_in.size(0);
  check_index_vector(fn, "assign", assign_in, B);
  TORCH_CHECK_TYPE(coef_in.device().is_cpu(), fn, ": coef must be a CPU tensor, got device ", coef_in.device());
  TORCH_CHECK_TYPE(coef_in.scalar_type() == centroids_in.scalar_type(), fn,
                   ": coef must have the dtype of centroids (", dtype_name(centroids_in.scalar_type()), "), got ",
                   dtype_name(coef_in.scalar_type()));
  const bool per_dim = coef_in.dim() == 2 && coef_in.size(0) == K && coef_in.size(1) == D;
  const bool per_cluster = (coef_in.dim() == 2 && coef_in.size(0) == K && coef_in.size(1) == 1) ||
                           (coef_in.dim() == 1 && coef_in.size(0) == K);
  TORCH_CHECK_VALUE(per_dim || per_cluster, fn, ": coef must be [K, D] = [", K, ", ", D, "], [K, 1] or [K], got shape ",
                    coef_in.sizes());
  const at::Tensor z = z_in.contiguous();
  const at::Tensor assign = assign_in.contiguous();
  const at::Tensor centroids = centroids_in.contiguous();
  const at::Tensor coef = coef_in.contiguous();
  check_range(fn, "assign", assign.data_ptr<int64_t>(), B, K);

  at::Tensor dz = at::empty({B, D}, z.options());
  if (B == 0 || D == 0) return dz;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "cem_scatter_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t coef_row = per_dim ? D : 1;
    const int64_t coef_col = per_dim ? 1 : 0;
    CEM_TIER_CALL(scatter_grad_kernel, z.data_ptr<scalar_t>(), assign.data_ptr<int64_t>(),
                  centroids.data_ptr<acc_t>(), coef.data_ptr<acc_t>(), coef_row, coef_col, B, D,
                  dz.data_ptr<scalar_t>());
  });
  return dz;
}

#include "cem_cpu_variants.h"

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> variant_math(
    const at::Tensor& counts_in, const at::Tensor& sqdev_in, const at::Tensor& pi_in, const at::Tensor& variance_in,
    int64_t variant, int64_t m, bool class_conditional, double sigma, int64_t num_classes, double dataset_size,
    double trained_threshold, bool log_entropy, bool replicate_index_bug, bool mean_dim) {
  const char* fn = "variant_math";
  TORCH_CHECK_VALUE(variant >= 0 && variant <= 2, fn, ": variant must be 0 (official), 1 (official-trained) or 2 "
                    "(paper, diag), got ", variant);
  TORCH_CHECK_VALUE(sqdev_in.dim() == 2 && counts_in.dim() == 1 && counts_in.size(0) == sqdev_in.size(0), fn,
                    ": counts must be [K] and sqdev [K, D], got ", counts_in.sizes(), " and ", sqdev_in.sizes());
  const int64_t K = sqdev_in.size(0), D = sqdev_in.size(1);
  TORCH_CHECK_VALUE(m >= 1 && K % m == 0, fn, ": K = ", K, " must be a multiple of m = ", m);
  const auto acc = sqdev_in.scalar_type();
  TORCH_CHECK_TYPE(acc == at::kFloat || acc == at::kDouble, fn, ": sqdev must be float32 or float64, got ",
                   dtype_name(acc));
  for (const at::Tensor* t : {&counts_in, &sqdev_in, &pi_in, &variance_in}) {
    TORCH_CHECK_TYPE(t->device().is_cpu() && t->scalar_type() == acc, fn,
                     ": counts, sqdev, pi and variance must be CPU tensors of one dtype, got ",
                     dtype_name(t->scalar_type()), " on ", t->device(), " beside ", dtype_name(acc));
  }
  if (variant != 0) {
    TORCH_CHECK_VALUE(pi_in.numel() == K, fn, ": pi must hold K = ", K, " values, got shape ", pi_in.sizes());
    const int64_t want = variant == 1 ? K : K * D;
    TORCH_CHECK_VALUE(variance_in.numel() == want, fn, ": variance must hold ", want, " values, got shape ",
                      variance_in.sizes());
    TORCH_CHECK_VALUE(dataset_size > 0, fn, ": dataset_size must be > 0, got ", dataset_size);
  }
  const VariantOptions o{variant, m, class_conditional, sigma, num_classes, dataset_size, trained_threshold,
                         log_entropy, replicate_index_bug, mean_dim};
  const at::Tensor counts = counts_in.contiguous(), sqdev = sqdev_in.contiguous();
  const at::Tensor pi = pi_in.contiguous(), variance = variance_in.contiguous();
  if (acc == at::kDouble) return variant_math_impl<double>(counts, sqdev, pi, variance, o);
  return variant_math_impl<float>(counts, sqdev, pi, variance, o);
}

// assign_stats then variant_math in one call: the whole forward of a diagonal-covariance CEM loss.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_diag(
    const at::Tensor& z, const at::Tensor& labels, const at::Tensor& centroids, const at::Tensor& pi,
    const at::Tensor& variance, int64_t variant, int64_t m, bool class_conditional, double sigma,
    int64_t num_classes, double dataset_size, double trained_threshold, bool log_entropy, bool replicate_index_bug,
    bool mean_dim) {
  auto [assign, counts, sqdev] = assign_stats(z, labels, centroids, m, class_conditional);
  auto [loss, coef, pi_new, var_new] = variant_math(counts, sqdev, pi, variance, variant, m, class_conditional,
                                                    sigma, num_classes, dataset_size, trained_threshold,
                                                    log_entropy, replicate_index_bug, mean_dim);
  return {loss, coef, pi_new, var_new, assign};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "cem_fast C++/OpenMP CPU kernels (see cem_fast/backends/torch_backend.py for the contract)";
  module.def("assign_stats", &assign_stats, "Nearest cluster per row of z, per-cluster counts and sum of squared deviations",
             pybind11::arg("z"), pybind11::arg("labels"), pybind11::arg("centroids"), pybind11::arg("m"),
             pybind11::arg("class_conditional"), pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("scatter_grad", &scatter_grad, "dz[i] = coef[assign[i]] * (z[i] - centroids[assign[i]]) in z's dtype",
             pybind11::arg("z"), pybind11::arg("assign"), pybind11::arg("centroids"), pybind11::arg("coef"),
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("variant_math", &variant_math,
             "A variant's loss, dL/dsqdev and new (pi, variance) from counts [K] and sqdev [K, D] (cem_fast/variants/)",
             pybind11::arg("counts"), pybind11::arg("sqdev"), pybind11::arg("pi"), pybind11::arg("variance"),
             pybind11::arg("variant"), pybind11::arg("m"), pybind11::arg("class_conditional"), pybind11::arg("sigma"),
             pybind11::arg("num_classes"), pybind11::arg("dataset_size"), pybind11::arg("trained_threshold"),
             pybind11::arg("log_entropy"), pybind11::arg("replicate_index_bug"), pybind11::arg("mean_dim"),
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("forward_diag", &forward_diag,
             "assign_stats then variant_math: (loss, coef, pi_new, variance_new, assign) in one call",
             pybind11::arg("z"), pybind11::arg("labels"), pybind11::arg("centroids"), pybind11::arg("pi"),
             pybind11::arg("variance"), pybind11::arg("variant"), pybind11::arg("m"),
             pybind11::arg("class_conditional"), pybind11::arg("sigma"), pybind11::arg("num_classes"),
             pybind11::arg("dataset_size"), pybind11::arg("trained_threshold"), pybind11::arg("log_entropy"),
             pybind11::arg("replicate_index_bug"), pybind11::arg("mean_dim"),
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("cpu_tier", &cpu_tier, "Instruction-set tier the kernels run with: 'base', 'avx2' or 'avx512'");
  module.def("set_cpu_tier", &set_cpu_tier, "Run a lower instruction-set tier (tests, benchmarks)", pybind11::arg("name"));
}
