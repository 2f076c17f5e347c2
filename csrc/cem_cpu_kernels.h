// CEM CPU kernels, written once and compiled once per instruction-set tier.
//
// cem_cpu.cpp includes this file several times, each time inside its own namespace and under its own
// `#pragma GCC target(...)`, and picks the best tier at run time. Every tier does the same arithmetic
// in the same order (fixed 64-byte lanes, fixed reduction tree, no FMA contraction: the extension is
// built with -ffp-contract=off), so results are bitwise identical across tiers and thread counts.
// The file has no include guard on purpose; it expects ATen (<torch/extension.h>, <ATen/Parallel.h>) and
// <algorithm>, <cstring>, <limits>, <type_traits>, <vector> included, and CEM_INLINE, CEM_TILE (centroids
// per distance tile, 1..4) and CEM_VEC_BYTES (the tier's native vector size: 16, 32 or 64) defined.

// Distances are summed in 64-byte lanes (16 floats or 8 doubles): lane l accumulates the elements
// d = l (mod 64 / sizeof(T)). A tier holds one lane set in 64 / CEM_VEC_BYTES native vectors.
template <typename T>
struct Lane {
  typedef T vec __attribute__((vector_size(CEM_VEC_BYTES)));  // one native vector
  static constexpr int per_vec = CEM_VEC_BYTES / sizeof(T);
  static constexpr int vecs = 64 / CEM_VEC_BYTES;             // native vectors per lane set
  static constexpr int width = 64 / sizeof(T);                // lanes
};

template <typename T>
CEM_INLINE typename Lane<T>::vec load_vec(const T* p) {
  typename Lane<T>::vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The low-precision input types are widened to float elementwise.
template <typename acc_t, typename scalar_t>
CEM_INLINE void widen(const scalar_t* src, acc_t* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<acc_t>(src[d]);
}

template <>
CEM_INLINE void widen<float, c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) {  // exact: bfloat16 is the top half of a float
    const uint32_t bits = static_cast<uint32_t>(src[d].x) << 16;
    std::memcpy(dst + d, &bits, sizeof(float));
  }
}

// out[c] = sum_d (z[d] - mu[c][d])^2 for C centroids, sharing each load of z.
// Whole lane sets first, the lanes folded by a fixed tree, then the tail elements in order.
template <int C, typename T>
CEM_INLINE void sqdist_tile(const T* z, const T* const* mu, int64_t D, T* out) {
  typedef Lane<T> L;
  typedef typename L::vec V;
  V acc[C][L::vecs];
  for (int c = 0; c < C; ++c)
    for (int v = 0; v < L::vecs; ++v) acc[c][v] = V{};
  int64_t d = 0;
  for (; d + L::width <= D; d += L::width) {
    for (int v = 0; v < L::vecs; ++v) {
      const V zv = load_vec(z + d + v * L::per_vec);
      for (int c = 0; c < C; ++c) {
        const V t = zv - load_vec(mu[c] + d + v * L::per_vec);
        acc[c][v] += t * t;
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    T r[L::width];
    std::memcpy(r, acc[c], sizeof(r));
    for (int w = L::width / 2; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) r[l] += r[l + w];
    T s = r[0];
    for (int64_t e = d; e < D; ++e) {
      const T t = z[e] - mu[c][e];
      s += t * t;
    }
    out[c] = s;
  }
}

// Torch's argmin order: the first NaN wins, else the first strict minimum (ties to the lowest index).
template <typename T>
CEM_INLINE bool better(T cand, T best) {
  return cand < best || (cand != cand && best == best);
}

// Distances from z to the C centroids mu[first .. first+C), folded into (best, best_k) in index order.
template <int C, typename T>
CEM_INLINE void nearest_tile(const T* z, const T* mu, int64_t first, int64_t D, T& best, int64_t& best_k) {
  const T* ptr[C];
  T dist[C];
  for (int c = 0; c < C; ++c) ptr[c] = mu + (first + c) * D;
  sqdist_tile<C>(z, ptr, D, dist);
  for (int c = 0; c < C; ++c)
    if (better(dist[c], best)) { best = dist[c]; best_k = first + c; }
}

// Nearest of the n centroids mu[first .. first+n) to the row z; updates (best, best_k).
// Tiles of CEM_TILE centroids, then one tile of the remainder (every pair gets the same arithmetic).
template <typename T>
CEM_INLINE void nearest_in_range(const T* z, const T* mu, int64_t first, int64_t n, int64_t D,
                                 T& best, int64_t& best_k) {
  static_assert(CEM_TILE >= 1 && CEM_TILE <= 4, "CEM_TILE must be 1..4");
  int64_t k = 0;
  for (; k + CEM_TILE <= n; k += CEM_TILE) nearest_tile<CEM_TILE>(z, mu, first + k, D, best, best_k);
  switch (n - k) {
    case 3: nearest_tile<3>(z, mu, first + k, D, best, best_k); break;
    case 2: nearest_tile<2>(z, mu, first + k, D, best, best_k); break;
    case 1: nearest_tile<1>(z, mu, first + k, D, best, best_k); break;
    default: break;
  }
}

// Rows handled together: when searching all K clusters, the block is reused from L2 while each tile
// of centroids stays in L1, so the centroids stream from memory once per block, not once per row.
constexpr int64_t kRowBlock = 16;

// Nearest cluster of each of the nb <= kRowBlock rows zb (in the accumulation type): among the m
// clusters of the row's class when labels is given (the rows' labels), else among all K.
template <typename T>
CEM_INLINE void assign_rows(const T* zb, int64_t nb, const int64_t* labels, const T* mu, int64_t D, int64_t K,
                            int64_t m, int64_t* out) {
  T best[kRowBlock];
  for (int64_t r = 0; r < nb; ++r) {
    best[r] = std::numeric_limits<T>::infinity();
    out[r] = labels ? labels[r] * m : 0;
  }
  if (labels) {
    for (int64_t r = 0; r < nb; ++r) nearest_in_range(zb + r * D, mu, labels[r] * m, m, D, best[r], out[r]);
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += CEM_TILE) {  // one centroid tile against every row of the block
    const int64_t n = std::min<int64_t>(CEM_TILE, K - k0);
    for (int64_t r = 0; r < nb; ++r) nearest_in_range(zb + r * D, mu, k0, n, D, best[r], out[r]);
  }
}

// Rows [i0, i0 + nb) of z in the accumulation type: a pointer into z, or widened into buf.
template <typename acc_t, typename scalar_t>
CEM_INLINE const acc_t* rows_as_acc(const scalar_t* z, int64_t i0, int64_t nb, int64_t D, std::vector<acc_t>& buf) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    return z + i0 * D;
  } else {
    buf.resize(kRowBlock * D);
    widen<acc_t>(z + i0 * D, buf.data(), nb * D);
    return buf.data();
  }
}

// Assignment of all rows, threads splitting the row blocks. labels: nullptr to search all K clusters.
template <typename scalar_t, typename acc_t>
void assign_kernel(const scalar_t* z, const int64_t* labels, const acc_t* mu, int64_t B, int64_t D, int64_t K,
                   int64_t m, int64_t* out) {
  const int64_t blocks = (B + kRowBlock - 1) / kRowBlock;
  const int64_t work = kRowBlock * (labels ? m : K) * std::max<int64_t>(D, 1);
  at::parallel_for(0, blocks, std::max<int64_t>(1, 65536 / work), [&](int64_t bbegin, int64_t bend) {
    std::vector<acc_t> buf;
    for (int64_t blk = bbegin; blk < bend; ++blk) {
      const int64_t i0 = blk * kRowBlock, nb = std::min(kRowBlock, B - i0);
      assign_rows(rows_as_acc<acc_t>(z, i0, nb, D, buf), nb, labels ? labels + i0 : nullptr, mu, D, K, m,
                  out + i0);
    }
  });
}

// sq[d] += (zi[d] - mu[d])^2 for d < n.
template <typename T>
CEM_INLINE void add_sqdiff(const T* zi, const T* mu, int64_t n, T* sq) {
  for (int64_t d = 0; d < n; ++d) {
    const T t = zi[d] - mu[d];
    sq[d] += t * t;
  }
}

// One thread, one pass over z: assign a block of rows, then add their squared deviations while they are
// in cache. Rows are added in increasing order, so the bits equal those of the parallel two-pass path.
template <typename scalar_t, typename acc_t>
void assign_sqdev_serial(const scalar_t* z, const int64_t* labels, const acc_t* mu, int64_t B, int64_t D,
                         int64_t K, int64_t m, int64_t* out, acc_t* sqdev) {
  std::vector<acc_t> buf;
  for (int64_t i0 = 0; i0 < B; i0 += kRowBlock) {
    const int64_t nb = std::min(kRowBlock, B - i0);
    const acc_t* zb = rows_as_acc<acc_t>(z, i0, nb, D, buf);
    assign_rows(zb, nb, labels ? labels + i0 : nullptr, mu, D, K, m, out + i0);
    for (int64_t r = 0; r < nb; ++r) add_sqdiff(zb + r * D, mu + out[i0 + r] * D, D, sqdev + out[i0 + r] * D);
  }
}

// sqdev[k, :] = sum over the members i of cluster k, in increasing i, of (z_i - mu_k)^2.
// members lists the rows sorted by cluster (stable), start[k] .. start[k+1] delimiting cluster k.
// Threads split the columns, so each output element is summed by one thread in sample order.
template <typename scalar_t, typename acc_t>
void sqdev_kernel(const scalar_t* z, const acc_t* mu, const int64_t* members, const int64_t* start,
                  int64_t D, int64_t K, acc_t* sqdev) {
  constexpr bool kWiden = !std::is_same<scalar_t, acc_t>::value;
  constexpr int64_t kCols = 64;  // column block: whole cache lines, so threads never share one
  const int64_t B = start[K];
  const int64_t nblocks = (D + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, B * kCols));
  at::parallel_for(0, nblocks, grain, [&](int64_t bbegin, int64_t bend) {
    const int64_t d0 = bbegin * kCols;
    const int64_t len = std::min(D, bend * kCols) - d0;
    std::vector<acc_t> row(kWiden ? len : 0);
    for (int64_t k = 0; k < K; ++k) {
      acc_t* out = sqdev + k * D + d0;
      const acc_t* muk = mu + k * D + d0;
      for (int64_t p = start[k]; p < start[k + 1]; ++p) {
        const acc_t* zi;
        if constexpr (kWiden) {
          widen<acc_t>(z + members[p] * D + d0, row.data(), len);
          zi = row.data();
        } else {
          zi = z + members[p] * D + d0;
        }
        add_sqdiff(zi, muk, len, out);
      }
    }
  });
}

// dz[i, :] = coef[a_i, :] * (z_i - mu[a_i]) (coef_stride 0: one coefficient per cluster), cast to z's dtype.
template <typename scalar_t, typename acc_t>
void scatter_grad_kernel(const scalar_t* z, const int64_t* assign, const acc_t* mu, const acc_t* coef,
                         int64_t coef_row, int64_t coef_col, int64_t B, int64_t D, scalar_t* dz) {
  constexpr bool kWiden = !std::is_same<scalar_t, acc_t>::value;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, D));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(kWiden ? 2 * D : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = assign[i];
      const acc_t* muk = mu + k * D;
      const acc_t* ck = coef + k * coef_row;
      if constexpr (kWiden) {
        acc_t* zi = row.data();
        acc_t* g = row.data() + D;
        widen<acc_t>(z + i * D, zi, D);
        if (coef_col) {
          for (int64_t d = 0; d < D; ++d) g[d] = ck[d] * (zi[d] - muk[d]);
        } else {
          const acc_t c = ck[0];
          for (int64_t d = 0; d < D; ++d) g[d] = c * (zi[d] - muk[d]);
        }
        scalar_t* o = dz + i * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(g[d]);
      } else {
        const acc_t* zi = z + i * D;
        acc_t* o = dz + i * D;
        if (coef_col) {
          for (int64_t d = 0; d < D; ++d) o[d] = ck[d] * (zi[d] - muk[d]);
        } else {
          const acc_t c = ck[0];
          for (int64_t d = 0; d < D; ++d) o[d] = c * (zi[d] - muk[d]);
        }
      }
    }
  });
}
