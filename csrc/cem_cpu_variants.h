// The variants' math on the per-cluster statistics (cem_fast/variants/*.py, diagonal covariance) in one
// C++ call: thirty ATen calls from Python on these small tensors cost more than the kernels. Per-cluster
// scalars in double, elementwise work in ATen (vectorised), results in the statistics' dtype.
// Included by cem_cpu.cpp inside its anonymous namespace.
//   variant 0 official, 1 official-trained, 2 paper (diag): the Variant.code of cem_fast/variants/<name>.py
//   -> (loss [], coef [K, D] or [K, 1] = dL/dsqdev, pi_new like pi, variance_new like variance)

#include <cmath>

constexpr double kOfficialEps = 1e-6;        // cem_fast/variants/official.py OFFICIAL_EPS
constexpr double kTrainedGamma = 0.01;       // cem_fast/variants/official_trained.py TRAINED_GAMMA
constexpr double kTrainedLinearEps = 0.001;  // cem_fast/variants/official_trained.py TRAINED_LINEAR_EPS
constexpr double kTrainedLambdaScale = 10.0;
constexpr double kTrainedLambdaCap = 0.99;

struct VariantOptions {
  int64_t variant;
  int64_t m;
  bool class_conditional;
  double sigma;
  int64_t num_classes;
  double dataset_size;
  double trained_threshold;  // log(var_threshold * sigma^2 + 0.01) as the authors build it (float32)
  bool log_entropy;
  bool replicate_index_bug;
  bool mean_dim;
};

// |P|: classes present (1 group when unconditional), at least 1.
double num_present(const std::vector<double>& n, int64_t m, bool class_conditional) {
  const int64_t K = static_cast<int64_t>(n.size());
  double present = 0.0, total = 0.0;
  for (int64_t c = 0; c < K / m; ++c) {
    double s = 0.0;
    for (int64_t j = 0; j < m; ++j) s += n[c * m + j];
    present += s > 0 ? 1.0 : 0.0;
    total += s;
  }
  if (!class_conditional) present = total > 0 ? 1.0 : 0.0;
  return std::max(present, 1.0);
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> variant_math_impl(
    const at::Tensor& counts_t, const at::Tensor& sqdev_t, const at::Tensor& pi_t, const at::Tensor& var_t,
    const VariantOptions& o) {
  const int64_t K = sqdev_t.size(0), D = sqdev_t.size(1), m = o.m;
  const acc_t* cnt = counts_t.data_ptr<acc_t>();
  const acc_t* sq = sqdev_t.data_ptr<acc_t>();
  std::vector<double> n(K);
  for (int64_t k = 0; k < K; ++k) n[k] = static_cast<double>(cnt[k]);
  const double num_p = num_present(n, m, o.class_conditional);
  const auto opts = sqdev_t.options();
  double loss = 0.0;
  at::Tensor pi_new = pi_t, var_new = var_t, coef;

  // Per-cluster scalars in double from plain loops; the elementwise [K, D] work (logs) in ATen's
  // vectorised kernels, in the statistics' dtype as cem_fast/variants/*.py do it.
  auto column = [&](const std::vector<double>& v) {  // [K, 1] in the statistics' dtype
    at::Tensor t = at::empty({K, 1}, opts);
    acc_t* p = t.data_ptr<acc_t>();
    for (int64_t k = 0; k < K; ++k) p[k] = static_cast<acc_t>(v[k]);
    return t;
  };
  std::vector<double> n_safe(K);
  for (int64_t k = 0; k < K; ++k) n_safe[k] = std::max(n[k], 1.0);

  if (o.variant == 0) {  // official: (1/|P|) sum_c sum_j (n_cj / n_c) mean_d log(v + sigma^2 + 1e-6)
    double total = 0.0;
    for (int64_t k = 0; k < K; ++k) total += n[k];
    std::vector<double> weight(K), g(K);
    for (int64_t k = 0; k < K; ++k) {
      double group = total;
      if (o.class_conditional) {
        group = 0.0;
        for (int64_t j = 0; j < m; ++j) group += n[(k / m) * m + j];
      }
      weight[k] = n[k] > 0 ? n[k] / std::max(group, 1.0) : 0.0;
      g[k] = weight[k] / (num_p * D * n_safe[k]);
    }
    const at::Tensor arg = (sqdev_t / column(n_safe)).add_(o.sigma * o.sigma + kOfficialEps);
    const at::Tensor log_mean = at::log(arg).mean(1);
    const acc_t* lm = log_mean.data_ptr<acc_t>();
    for (int64_t k = 0; k < K; ++k) loss += weight[k] * static_cast<double>(lm[k]);
    loss /= num_p;
    coef = column(g) / arg;
  } else if (o.variant == 1) {  // official-trained (the authors' training scripts): scalar variance per cluster, hinge on its log
    const acc_t* pi_in = pi_t.data_ptr<acc_t>();
    const acc_t* var_in = var_t.data_ptr<acc_t>();
    const int64_t C = K / m;
    std::vector<int64_t> row(C);
    for (int64_t c = 0; c < C; ++c) row[c] = c;
    if (o.replicate_index_bug) {  // official_trained.index_bug_rows
      std::vector<double> ends(C);
      double run = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t j = 0; j < m; ++j) run += n[c * m + j];
        ends[c] = run;
      }
      int64_t rank = -1;
      for (int64_t c = 0; c < C; ++c) {
        rank += ends[c] > (c ? ends[c - 1] : 0.0) ? 1 : 0;
        const double r = static_cast<double>(std::max<int64_t>(rank, 0));
        const int64_t src = std::upper_bound(ends.begin(), ends.end(), r) - ends.begin();
        row[c] = std::min<int64_t>(src, C - 1);
      }
    }
    coef = at::empty({K, 1}, opts);
    acc_t* cf = coef.data_ptr<acc_t>();
    const at::Tensor row_sums = sqdev_t.sum(1);
    const acc_t* rs = row_sums.data_ptr<acc_t>();
    const double per_class = o.dataset_size / static_cast<double>(o.num_classes);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t src = row[k / m] * m + k % m;
      const double pi = static_cast<double>(pi_in[src]), variance = static_cast<double>(var_in[src]);
      const bool present = n[k] > 0;
      const double s = static_cast<double>(rs[k]) / (n_safe[k] * D);
      double lam = kTrainedLambdaScale * n[k] / (pi * per_class);
      if (lam >= 1) lam = kTrainedLambdaCap;
      if (!present) lam = 0.0;
      const double v = lam * s + (1 - lam) * variance;
      double term, dterm;
      if (o.log_entropy) {
        const double arg = std::log(v + kTrainedGamma) - o.trained_threshold;
        term = pi * std::max(arg, 0.0);
        dterm = arg > 0 ? pi / (v + kTrainedGamma) : 0.0;
      } else {
        term = pi * (v + kTrainedLinearEps);
        dterm = pi;
      }
      if (present) loss += term;
      cf[k] = static_cast<acc_t>(present ? dterm * lam / (n_safe[k] * D) / num_p : 0.0);
    }
    loss /= num_p;
  } else {  // paper, diagonal covariance: Eq. 5-7
    const acc_t* pi_in = pi_t.data_ptr<acc_t>();
    const double N = o.dataset_size, s2 = o.sigma * o.sigma, scale = o.mean_dim ? 1.0 / D : 1.0;
    double batch = 0.0;
    for (int64_t k = 0; k < K; ++k) batch += n[k];
    std::vector<double> p(K), alpha(K), g(K);
    pi_new = at::empty_like(pi_t);
    acc_t* pn = pi_new.data_ptr<acc_t>();
    for (int64_t k = 0; k < K; ++k) {
      p[k] = (static_cast<double>(pi_in[k]) * (N - batch) + n[k]) / N;
      alpha[k] = n[k] > 0 ? std::min(std::max(n[k] / (p[k] * N), 0.0), 1.0) : 0.0;
      g[k] = scale * 0.5 * p[k] * alpha[k] / n_safe[k];
      pn[k] = static_cast<acc_t>(p[k]);
    }
    // alpha = 0 (an absent cluster) leaves the variance bit for bit: lerp(a, b, 0) = a.
    const at::Tensor var2d = var_t.reshape({K, D});
    const at::Tensor blended = at::lerp(var2d, sqdev_t / column(n_safe), column(alpha));
    var_new = blended.view(var_t.sizes());
    const at::Tensor half_logdet = at::log1p(blended / s2).sum(1);
    const acc_t* hl = half_logdet.data_ptr<acc_t>();
    for (int64_t k = 0; k < K; ++k) {
      const double neg_p_log_p = p[k] > 0 ? -p[k] * std::log(p[k]) : 0.0;
      loss += scale * (neg_p_log_p + p[k] * 0.5 * static_cast<double>(hl[k]));
    }
    coef = column(g) / (blended + s2);
  }
  return {at::scalar_tensor(loss, opts), coef, pi_new, var_new};
}
