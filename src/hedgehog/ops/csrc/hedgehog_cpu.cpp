// Fused causal Hedgehog attention and the sliding-window hybrid for the CPU (inference / prefill, float32).
//
// One pass over the sequence per (batch, key head) task. Per block of Tb tokens both feature maps are
// computed (one sgemm each, then a vectorised softmax over each half); per chunk of C tokens the scores,
// the readout and the state update follow. Everything a chunk touches (its features, its scores, the
// state of F x D floats) stays in the core's caches; only q, k, v are read and y written. The PyTorch
// path does the same arithmetic in ~40 ops per block whose temporaries go through memory. The sgemms are
// MKL's, single-threaded inside the parallel region (tasks run in parallel).
//
// Causal, per chunk of L <= C tokens starting at t (row-major, F = 2P, softmax2 = softmax over each half):
//   phi_k = softmax2(k[t:t+L] @ Wk + bk),  phi_q = softmax2(q_h[t:t+L] @ Wq_h + bq_h)
//   a     = tril(phi_q @ phi_k^T)
//   y_h   = [phi_q | a] @ [S; v[t:t+L]]  /  max(phi_q . z + rowsum(a), eps)
//   S += phi_k^T @ v[t:t+L],  z += colsum(phi_k)          (after every query head of the group read)
// The hybrid (hybrid_forward below) adds the softmax window to the same coefficient row.
//
// The Python side (hedgehog/ops/cpu_kernel.py) checks shapes/dtypes and falls back to the PyTorch
// path when this file cannot be compiled.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
extern "C" __m512 _ZGVeN16v_expf(__m512);  // glibc libmvec: 16-lane expf
#endif

extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);
extern "C" int mkl_set_num_threads_local_(const int*);  // MKL per-thread thread count, Fortran form (0: global)

namespace {

// Row-major C (M x N) = op(A) (M x K) @ op(B) (K x N) + beta * C, through column-major sgemm on the
// transposes: C^T = op(B)^T op(A)^T.
inline void gemm(bool ta, bool tb, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
                 float beta, float* C, int ldc) {
  const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N';
  const float one = 1.0f;
  sgemm_(&a, &b, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

// In place: each row of u (L rows of stride ld, 2P used) plus the bias becomes [softmax(first P), softmax(last P)].
void softmax_halves(float* u, int L, int ld, int P, const float* bias) {
  for (int i = 0; i < L; ++i) {
    for (int half = 0; half < 2; ++half) {
      float* p = u + static_cast<int64_t>(i) * ld + half * P;
      const float* b = bias ? bias + half * P : nullptr;
#if defined(__AVX512F__)
      if (P % 16 == 0) {
        __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int j = 0; j < P; j += 16) {
          __m512 x = _mm512_loadu_ps(p + j);
          if (b) x = _mm512_add_ps(x, _mm512_loadu_ps(b + j));
          _mm512_storeu_ps(p + j, x);
          mx = _mm512_max_ps(mx, x);
        }
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < P; j += 16) {
          const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_loadu_ps(p + j), m));
          _mm512_storeu_ps(p + j, e);
          sum = _mm512_add_ps(sum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int j = 0; j < P; j += 16) _mm512_storeu_ps(p + j, _mm512_mul_ps(_mm512_loadu_ps(p + j), inv));
        continue;
      }
#endif
      float m = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < P; ++j) {
        if (b) p[j] += b[j];
        m = std::max(m, p[j]);
      }
      float s = 0.0f;
      for (int j = 0; j < P; ++j) {
        p[j] = std::exp(p[j] - m);
        s += p[j];
      }
      const float inv = 1.0f / s;
      for (int j = 0; j < P; ++j) p[j] *= inv;
    }
  }
}

// Reductions over n floats: 16 lanes with a masked tail (AVX-512), else a plain loop.
#if defined(__AVX512F__)
inline __mmask16 tail_mask(int r) { return static_cast<__mmask16>((1u << r) - 1u); }
#endif

float vmax(const float* x, int n) {
#if defined(__AVX512F__)
  int j = 0;
  __m512 acc = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (; j + 16 <= n; j += 16) acc = _mm512_max_ps(acc, _mm512_loadu_ps(x + j));
  if (j < n) acc = _mm512_mask_max_ps(acc, tail_mask(n - j), acc, _mm512_maskz_loadu_ps(tail_mask(n - j), x + j));
  return _mm512_reduce_max_ps(acc);
#else
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
#endif
}

float vdot(const float* x, const float* y, int n) {  // y == nullptr: the sum of x
#if defined(__AVX512F__)
  int j = 0;
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16)
    acc = y ? _mm512_fmadd_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(y + j), acc)
            : _mm512_add_ps(acc, _mm512_loadu_ps(x + j));
  if (j < n) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 xv = _mm512_maskz_loadu_ps(k, x + j);
    acc = y ? _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(k, y + j), acc) : _mm512_add_ps(acc, xv);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float s = 0.0f;
  for (int j = 0; j < n; ++j) s += y ? x[j] * y[j] : x[j];
  return s;
#endif
}

// In place: x[j] = g * exp(sc * (x[j] - m)) for j < n.
void scaled_exp(float* x, int n, float m, float sc, float g) {
#if defined(__AVX512F__)
  int j = 0;
  const __m512 vs = _mm512_set1_ps(sc), vms = _mm512_set1_ps(sc * m), vg = _mm512_set1_ps(g);
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(x + j, _mm512_mul_ps(vg, _ZGVeN16v_expf(_mm512_fmsub_ps(_mm512_loadu_ps(x + j), vs, vms))));
  if (j < n) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 e = _ZGVeN16v_expf(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, x + j), vs, vms));
    _mm512_mask_storeu_ps(x + j, k, _mm512_mul_ps(vg, e));
  }
#else
  for (int j = 0; j < n; ++j) x[j] = g * std::exp(sc * x[j] - sc * m);
#endif
}

// ---- output buffers -------------------------------------------------------------------------------------
// The kernels' outputs come from a small cache of freed buffers. glibc serves a large request with fresh
// mmap pages and returns them on free, so every fresh output (32 MB at B=1, H=8, N=16k, D=64) would page-fault
// once per 4 KB page on its first write: about a fifth of the kernel's time. A returned buffer keeps its pages,
// and the next call of the same size writes to memory already mapped, without a process-wide malloc setting.
// New buffers are 2 MB aligned and advised as transparent huge pages (one fault per 2 MB where THP is on).
// The cache holds at most HEDGEHOG_KERNEL_POOL_MB (default 1024) of idle buffers; beyond that frees go to the OS.
class BufferPool {
 public:
  static BufferPool& get() {
    static BufferPool* pool = new BufferPool();  // never destroyed: tensors may outlive static destruction
    return *pool;
  }
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = idle_.find(bytes);
      if (it != idle_.end()) {
        void* p = it->second;
        idle_.erase(it);
        held_ -= bytes;
        return p;
      }
    }
    const size_t align = size_t(2) << 20;
    void* p = std::aligned_alloc(align, (bytes + align - 1) / align * align);
    TORCH_CHECK(p != nullptr, "hedgehog kernel: out of memory for a ", bytes, "-byte output");
#if defined(MADV_HUGEPAGE)
    madvise(p, (bytes + align - 1) / align * align, MADV_HUGEPAGE);
#endif
    return p;
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + bytes <= cap_) {
        idle_.emplace(bytes, p);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }
  size_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& kv : idle_) std::free(kv.second);
    idle_.clear();
    held_ = 0;
  }

 private:
  BufferPool() {
    const char* env = std::getenv("HEDGEHOG_KERNEL_POOL_MB");
    cap_ = (env ? static_cast<size_t>(std::max(0L, std::atol(env))) : size_t(1024)) << 20;
  }
  std::mutex mu_;
  std::multimap<size_t, void*> idle_;
  size_t held_ = 0, cap_ = 0;
};

torch::Tensor pooled_empty(at::IntArrayRef sizes, const torch::TensorOptions& options) {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  const size_t bytes = std::max<size_t>(1, static_cast<size_t>(n) * sizeof(float));
  void* p = BufferPool::get().take(bytes);
  return torch::from_blob(p, sizes, [bytes](void* q) { BufferPool::get().give(q, bytes); }, options);
}

void check(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.dim() == dim,
              name, " must be a contiguous float32 CPU tensor with ", dim, " dims");
}

// Shapes, raw pointers and the task layout both kernels share.
// q (B, H, N, d); k (B, Hk, N, d); v (B, Hk, N, D); wq (H, d, 2P), bq (H, 2P) or empty; wk (Hk, d, 2P),
// bk (Hk, 2P) or empty; Sz (B, Hk, 2P, D + 1). Query head h reads key head h / (H / Hk).
// split_groups: one task per query head (each recomputes its group's key features and keeps its own
// copy of the state; for few key heads on more threads) instead of one task per key head.
struct Problem {
  int64_t B, H, N, d, Hk, D, F, P, D1, g, tasks, heads_per_task;
  int C, Tb, Fi, Di, di;
  const float *Q, *K, *V, *WQ, *WK, *BQ, *BK;
  const float *PHQ = nullptr, *PHK = nullptr;  // features given by the caller (any map) instead of computed

  // features_given: wq, wk are the features phi_q (B, H, N, F) and phi_k (B, Hk, N, F); bq, bk are unused.
  Problem(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& wq,
          const torch::Tensor& bq, const torch::Tensor& wk, const torch::Tensor& bk, const torch::Tensor& Sz,
          int64_t chunk, bool split_groups, const char* name, bool features_given = false) {
    check(q, "q", 4); check(k, "k", 4); check(v, "v", 4); check(Sz, "Sz", 4);
    B = q.size(0); H = q.size(1); N = q.size(2); d = q.size(3);
    Hk = k.size(1); D = v.size(3); D1 = D + 1;
    if (features_given) {
      check(wq, "phi_q", 4); check(wk, "phi_k", 4);
      F = wq.size(3);
      TORCH_CHECK(wq.size(0) == B && wq.size(1) == H && wq.size(2) == N && wk.size(0) == B && wk.size(1) == Hk &&
                      wk.size(2) == N && wk.size(3) == F, name, ": phi_q (B, H, N, F) and phi_k (B, Hk, N, F)");
    } else {
      check(wq, "wq", 3); check(wk, "wk", 3);
      F = wq.size(2);
      TORCH_CHECK(F % 2 == 0 && wq.size(0) == H && wq.size(1) == d && wk.size(0) == Hk && wk.size(1) == d &&
                      wk.size(2) == F, name, ": feature map weights do not fit");
    }
    P = F / 2;
    TORCH_CHECK(H % Hk == 0 && k.size(0) == B && k.size(2) == N && k.size(3) == d && v.size(0) == B &&
                    v.size(1) == Hk && v.size(2) == N && Sz.size(0) == B && Sz.size(1) == Hk && Sz.size(2) == F &&
                    Sz.size(3) == D1 && chunk >= 1,
                name, ": shapes do not fit");
    if (!features_given && bq.numel() > 0) {
      check(bq, "bq", 2); TORCH_CHECK(bq.size(0) == H && bq.size(1) == F, name, ": bq");
    }
    if (!features_given && bk.numel() > 0) {
      check(bk, "bk", 2); TORCH_CHECK(bk.size(0) == Hk && bk.size(1) == F, name, ": bk");
    }
    g = H / Hk;
    const bool split = split_groups && g > 1;
    tasks = split ? B * H : B * Hk;
    heads_per_task = split ? 1 : g;
    C = static_cast<int>(std::min<int64_t>(chunk, std::max<int64_t>(N, 1)));
    Tb = C * std::max(1, 256 / C);  // feature blocks: larger sgemms, the block's features stay in L2
    Fi = static_cast<int>(F); Di = static_cast<int>(D); di = static_cast<int>(d);
    Q = q.data_ptr<float>(); K = k.data_ptr<float>(); V = v.data_ptr<float>();
    if (features_given) {
      PHQ = wq.data_ptr<float>(); PHK = wk.data_ptr<float>();
      WQ = WK = BQ = BK = nullptr;
    } else {
      WQ = wq.data_ptr<float>(); WK = wk.data_ptr<float>();
      BQ = bq.numel() > 0 ? bq.data_ptr<float>() : nullptr;
      BK = bk.numel() > 0 ? bk.data_ptr<float>() : nullptr;
    }
  }

  bool split() const { return heads_per_task == 1 && g > 1; }

  // task -> batch b, key head hk, first query head h0 (the task's heads are h0 .. h0 + heads_per_task - 1)
  void heads(int64_t task, int64_t& b, int64_t& hk, int64_t& h0) const {
    if (split()) { b = task / H; h0 = task % H; hk = h0 / g; }
    else { b = task / Hk; hk = task % Hk; h0 = hk * g; }
  }

  // features of tokens [t0, t0 + L) into rows of stride ld: key head hk, or query head h
  void key_features(int64_t b, int64_t hk, int64_t t0, int L, float* out, int ld) const {
    if (PHK) {  // given: copy the rows
      for (int i = 0; i < L; ++i) {
        const float* src = PHK + ((b * Hk + hk) * N + t0 + i) * F;
        std::copy(src, src + F, out + static_cast<int64_t>(i) * ld);
      }
      return;
    }
    gemm(false, false, L, Fi, di, K + ((b * Hk + hk) * N + t0) * d, di, WK + hk * d * F, Fi, 0.0f, out, ld);
    softmax_halves(out, L, ld, static_cast<int>(P), BK ? BK + hk * F : nullptr);
  }
  void query_features(int64_t b, int64_t h, int64_t t0, int L, float* out, int ld) const {
    if (PHQ) {
      for (int i = 0; i < L; ++i) {
        const float* src = PHQ + ((b * H + h) * N + t0 + i) * F;
        std::copy(src, src + F, out + static_cast<int64_t>(i) * ld);
      }
      return;
    }
    gemm(false, false, L, Fi, di, Q + ((b * H + h) * N + t0) * d, di, WQ + h * d * F, Fi, 0.0f, out, ld);
    softmax_halves(out, L, ld, static_cast<int>(P), BQ ? BQ + h * F : nullptr);
  }

  // [S, z] (F x (D + 1)) <-> S (F x D) and z (F) apart: every sgemm then has D columns (D = 64 fits the
  // 16-lane kernels; D + 1 costs a remainder pass per call)
  void unpack(const float* Sz, float* S, float* z) const {
    for (int64_t f = 0; f < F; ++f) {
      std::copy(Sz + f * D1, Sz + f * D1 + D, S + f * D);
      z[f] = Sz[f * D1 + D];
    }
  }
  void pack(const float* S, const float* z, float* Sz) const {
    for (int64_t f = 0; f < F; ++f) {
      std::copy(S + f * D, S + (f + 1) * D, Sz + f * D1);
      Sz[f * D1 + D] = z[f];
    }
  }

  // y rows /= max(den, eps); then the delayed/current keys enter the state: S += phi_k^T v, z += colsum
  void normalise(float* y, const float* den, int L, float eps) const {
    for (int i = 0; i < L; ++i) {
      const float inv = 1.0f / std::max(den[i], eps);
      float* yi = y + static_cast<int64_t>(i) * D;
#pragma omp simd
      for (int j = 0; j < Di; ++j) yi[j] *= inv;
    }
  }
  void update_state(const float* pk, const float* vrows, int L, float* S, float* z) const {
    gemm(true, false, Fi, Di, L, pk, Fi, vrows, Di, 1.0f, S, Di);
    for (int i = 0; i < L; ++i) {
      const float* ki = pk + static_cast<int64_t>(i) * F;
#pragma omp simd
      for (int f = 0; f < Fi; ++f) z[f] += ki[f];
    }
  }
};

// Runs fn(task, S, z, b, hk, h0) over the tasks in parallel, each with its state unpacked from and packed
// back into states (one (F, D + 1) block per task), MKL single-threaded per call.
template <typename Fn>
void run_tasks(const Problem& pb, float* states, Fn fn) {
  at::parallel_for(0, pb.tasks, 1, [&](int64_t begin, int64_t end) {
    const int one = 1;
    const int mkl_prev = mkl_set_num_threads_local_(&one);
    std::vector<float> S(pb.F * pb.D), z(pb.F);
    for (int64_t task = begin; task < end; ++task) {
      int64_t b, hk, h0;
      pb.heads(task, b, hk, h0);
      float* Sz = states + task * pb.F * pb.D1;
      pb.unpack(Sz, S.data(), z.data());
      fn(task, S.data(), z.data(), b, hk, h0);
      pb.pack(S.data(), z.data(), Sz);
    }
    mkl_set_num_threads_local_(&mkl_prev);
  });
}

}  // namespace

// Causal linear attention of one Problem; Sz is the state entering the call, updated in place. y (B, H, N, D).
torch::Tensor causal_impl(const Problem& pb, torch::Tensor Sz, double eps, const torch::TensorOptions& options) {
  auto y = pooled_empty({pb.B, pb.H, pb.N, pb.D}, options);
  torch::Tensor states = pb.split() ? Sz.unsqueeze(2).expand({pb.B, pb.Hk, pb.g, pb.F, pb.D1}).contiguous() : Sz;
  float* Y = y.data_ptr<float>();
  const int C = pb.C, Tb = pb.Tb, Fi = pb.Fi, Di = pb.Di;
  const int64_t F = pb.F, D = pb.D, N = pb.N, H = pb.H;
  const int ld = Fi + C;  // query rows: [phi_q (F) | this chunk's scores a (C)]
  const float epsf = static_cast<float>(eps);
  run_tasks(pb, states.data_ptr<float>(), [&](int64_t, float* S, float* z, int64_t b, int64_t hk, int64_t h0) {
    // per-thread scratch, kept across calls (no allocation, no page faults after the first call)
    thread_local std::vector<float> pk, pq, den, sv;
    pk.resize(static_cast<size_t>(Tb) * F);
    pq.resize(static_cast<size_t>(pb.heads_per_task) * Tb * ld);
    den.resize(C);
    sv.resize(static_cast<size_t>(F + C) * D);  // [S; v of the chunk]
    std::copy(S, S + F * D, sv.data());
    float* Sv = sv.data();
    const float* vv = pb.V + (b * pb.Hk + hk) * N * D;
    for (int64_t t0 = 0; t0 < N; t0 += Tb) {
      const int Lb = static_cast<int>(std::min<int64_t>(Tb, N - t0));
      pb.key_features(b, hk, t0, Lb, pk.data(), Fi);
      for (int64_t r = 0; r < pb.heads_per_task; ++r)
        pb.query_features(b, h0 + r, t0, Lb, pq.data() + r * Tb * ld, ld);
      for (int c0 = 0; c0 < Lb; c0 += C) {
        const int L = std::min(C, Lb - c0);
        const float* pkc = pk.data() + c0 * F;
        const float* vc = vv + (t0 + c0) * D;
        std::copy(vc, vc + L * D, sv.data() + F * D);
        for (int64_t r = 0; r < pb.heads_per_task; ++r) {
          float* qa = pq.data() + r * Tb * ld + c0 * ld;  // L rows of [phi_q | a]
          gemm(false, true, L, L, Fi, qa, ld, pkc, Fi, 0.0f, qa + Fi, ld);
          for (int i = 0; i < L; ++i) {  // causal mask; denominator = phi_q . z + row sum of the masked a
            float* row = qa + i * ld;
            std::fill(row + Fi + i + 1, row + Fi + L, 0.0f);
            den[i] = vdot(row, z, Fi) + vdot(row + Fi, nullptr, i + 1);
          }
          float* yy = Y + ((b * H + h0 + r) * N + t0 + c0) * D;
          gemm(false, false, L, Di, Fi + L, qa, ld, sv.data(), Di, 0.0f, yy, Di);  // [phi_q | a] @ [S; v]
          pb.normalise(yy, den.data(), L, epsf);
        }
        pb.update_state(pkc, vc, L, Sv, z);
      }
    }
    std::copy(Sv, Sv + F * D, S);
  });
  if (states.data_ptr() != Sz.data_ptr()) Sz.copy_(states.select(2, 0));
  return y;
}

// Causal Hedgehog attention, feature maps computed here from their weights.
torch::Tensor causal_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor wq, torch::Tensor bq,
                             torch::Tensor wk, torch::Tensor bk, torch::Tensor Sz, int64_t chunk, double eps,
                             bool split_groups) {
  return causal_impl(Problem(q, k, v, wq, bq, wk, bk, Sz, chunk, split_groups, "causal_forward"), Sz, eps,
                     q.options());
}

// Causal linear attention on precomputed features of any map: phi_q (B, H, N, F), phi_k (B, Hk, N, F).
torch::Tensor causal_forward_features(torch::Tensor phq, torch::Tensor phk, torch::Tensor v, torch::Tensor Sz,
                                      int64_t chunk, double eps, bool split_groups) {
  const auto none = torch::empty({0}, v.options());
  return causal_impl(Problem(phq, phk, v, phq, none, phk, none, Sz, chunk, split_groups, "causal_forward_features",
                             true), Sz, eps, v.options());
}

// The LoLCATs hybrid: query n sees keys n - w < i <= n through exact softmax (scores q.k * scale, c_n
// the window max, per-head factor gamma) and keys i <= n - w through the linear state, one normalisation:
//   y_n = [sum_win g e^(s - c_n) v_i + phi_q . S_{<=n-w}] / [sum_win g e^(s - c_n) + phi_q . z_{<=n-w}].
// Per chunk [t, t + L) the linear part is the causal kernel above on keys delayed by w (rows t - w ..
// t - w + L of the key features, kept in a buffer that slides with the blocks), and both parts share one
// coefficient row over the values t - w .. t + L - 1: [0, i] linear scores, (i, i + w] window weights.
//   y = [phi_q | coef] @ [S; v[t - w : t + L]] / (phi_q . z + sum coef)
// gamma (H); Sz (B, Hk, 2P, D + 1) receives the state of keys 0 .. N - w - 1 (it starts from zero).
torch::Tensor hybrid_impl(const Problem& pb, torch::Tensor gamma, torch::Tensor Sz, int64_t window, double scale,
                          double eps, const torch::TensorOptions& options) {
  check(gamma, "gamma", 1);
  TORCH_CHECK(window >= 1 && gamma.size(0) == pb.H, "hybrid_forward: window >= 1 and one gamma per query head");
  auto y = pooled_empty({pb.B, pb.H, pb.N, pb.D}, options);
  Sz.zero_();
  torch::Tensor states = pb.split() ? torch::zeros({pb.B, pb.Hk, pb.g, pb.F, pb.D1}, Sz.options()) : Sz;
  float* Y = y.data_ptr<float>();
  const float* GAM = gamma.data_ptr<float>();
  const int C = pb.C, Tb = pb.Tb, Fi = pb.Fi, Di = pb.Di, di = pb.di, W = static_cast<int>(window);
  const int64_t F = pb.F, D = pb.D, N = pb.N, H = pb.H, d = pb.d;
  const int ld = Fi + C + W;  // query rows: [phi_q (F) | coefficients over the chunk's L + w values]
  const float epsf = static_cast<float>(eps), sc = static_cast<float>(scale);
  run_tasks(pb, states.data_ptr<float>(), [&](int64_t, float* S, float* z, int64_t b, int64_t hk, int64_t h0) {
    // key features of positions [t0 - w, t0 + Tb): the delayed keys of the block's chunks
    thread_local std::vector<float> pk, pq, sv, den, a;  // per-thread scratch, kept across calls
    pk.assign(static_cast<size_t>(W + Tb) * F, 0.0f);  // rows before position 0 stay zero
    pq.resize(static_cast<size_t>(pb.heads_per_task) * Tb * ld);
    sv.resize(static_cast<size_t>(F + C + W) * D);
    den.resize(C);
    a.resize(static_cast<size_t>(C) * C);
    std::copy(S, S + F * D, sv.data());
    float* Sv = sv.data();
    const float* kk = pb.K + (b * pb.Hk + hk) * N * d;
    const float* vv = pb.V + (b * pb.Hk + hk) * N * D;
    for (int64_t t0 = 0; t0 < N; t0 += Tb) {
      const int Lb = static_cast<int>(std::min<int64_t>(Tb, N - t0));
      if (t0 > 0)  // slide: the previous block's last w key rows move to the front
        std::memmove(pk.data(), pk.data() + static_cast<size_t>(Tb) * F, static_cast<size_t>(W) * F * sizeof(float));
      pb.key_features(b, hk, t0, Lb, pk.data() + static_cast<size_t>(W) * F, Fi);
      for (int64_t r = 0; r < pb.heads_per_task; ++r)
        pb.query_features(b, h0 + r, t0, Lb, pq.data() + r * Tb * ld, ld);
      for (int c0 = 0; c0 < Lb; c0 += C) {
        const int L = std::min(C, Lb - c0);
        const int64_t t = t0 + c0;
        const int jmin = static_cast<int>(std::max<int64_t>(0, W - t));  // values t - w + j exist for j >= jmin
        const int nv = L + W - jmin;                                     // values t - w + jmin .. t + L - 1
        const float* pk_lag = pk.data() + static_cast<size_t>(c0) * F;   // key features of t - w .. t - w + L
        std::copy(vv + (t - W + jmin) * D, vv + (t + L) * D, sv.data() + F * D);
        for (int64_t r = 0; r < pb.heads_per_task; ++r) {
          const int64_t h = h0 + r;
          float* qa = pq.data() + r * Tb * ld + c0 * ld;
          float* coef = qa + Fi;  // column j <-> value t - w + jmin + j
          const float* qc = pb.Q + ((b * H + h) * N + t) * d;
          gemm(false, true, L, nv, di, qc, di, kk + (t - W + jmin) * d, di, 0.0f, coef, ld);  // raw scores
          if (jmin < L) gemm(false, true, L, L - jmin, Fi, qa, ld, pk_lag + jmin * F, Fi, 0.0f, a.data(), C);
          for (int i = 0; i < L; ++i) {
            float* row = coef + i * ld;
            const int lo = std::max(i + 1 - jmin, 0), hi = i + W - jmin;  // window columns [lo, hi]
            const float m = vmax(row + lo, hi - lo + 1);
            std::copy(a.data() + i * C, a.data() + i * C + lo, row);  // linear part: delayed keys <= t + i - w
            scaled_exp(row + lo, hi - lo + 1, m, sc, GAM[h]);
            std::fill(row + hi + 1, row + nv, 0.0f);
            den[i] = vdot(row, nullptr, hi + 1) + vdot(qa + i * ld, z, Fi);
          }
          float* yy = Y + ((b * H + h) * N + t) * D;
          gemm(false, false, L, Di, Fi + nv, qa, ld, sv.data(), Di, 0.0f, yy, Di);
          pb.normalise(yy, den.data(), L, epsf);
        }
        if (jmin < L)  // the delayed keys t - w + jmin .. t - w + L enter the state
          pb.update_state(pk_lag + jmin * F, sv.data() + F * D, L - jmin, Sv, z);
      }
    }
    std::copy(Sv, Sv + F * D, S);
  });
  if (states.data_ptr() != Sz.data_ptr()) Sz.copy_(states.select(2, 0));
  return y;
}

torch::Tensor hybrid_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor wq, torch::Tensor bq,
                             torch::Tensor wk, torch::Tensor bk, torch::Tensor gamma, torch::Tensor Sz,
                             int64_t window, int64_t chunk, double scale, double eps, bool split_groups) {
  return hybrid_impl(Problem(q, k, v, wq, bq, wk, bk, Sz, chunk, split_groups, "hybrid_forward"), gamma, Sz, window,
                     scale, eps, q.options());
}

// The hybrid on precomputed features of any map (q, k still give the window's softmax scores).
torch::Tensor hybrid_forward_features(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor phq,
                                      torch::Tensor phk, torch::Tensor gamma, torch::Tensor Sz, int64_t window,
                                      int64_t chunk, double scale, double eps, bool split_groups) {
  const auto none = torch::empty({0}, v.options());
  return hybrid_impl(Problem(q, k, v, phq, none, phk, none, Sz, chunk, split_groups, "hybrid_forward_features", true),
                     gamma, Sz, window, scale, eps, v.options());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#if defined(__AVX512F__)
  m.attr("avx512") = true;
#else
  m.attr("avx512") = false;
#endif
  m.def("causal_forward", &causal_forward, "fused causal Hedgehog attention (float32, no autograd)");
  m.def("hybrid_forward", &hybrid_forward, "fused sliding-window + Hedgehog hybrid attention (float32, no autograd)");
  m.def("causal_forward_features", &causal_forward_features,
        "causal linear attention on precomputed features (float32, no autograd)");
  m.def("hybrid_forward_features", &hybrid_forward_features,
        "sliding-window + linear hybrid on precomputed features (float32, no autograd)");
  m.def("pool_bytes", []() { return static_cast<int64_t>(BufferPool::get().held()); }, "idle bytes in the output cache");
  m.def("pool_clear", []() { BufferPool::get().clear(); }, "free the output cache's idle buffers");
}
