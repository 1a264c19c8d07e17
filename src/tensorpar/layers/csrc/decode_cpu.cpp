// Fused CPU kernels of a decode step (tensorpar.layers.fused): each op is one call and one
// parallel region, computing in float32 whatever the tensors' dtype (float32 or bfloat16).
// Their plain-torch twins are in tensorpar/layers/fused.py; tests run both on the same inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float load(const T* p, int64_t i) { return static_cast<float>(p[i]); }

template <typename T>
inline void store(T* p, int64_t i, float v) { p[i] = static_cast<T>(v); }

// y = x / sqrt(mean(x^2) + eps) * (w + offset) over n features, in float32.
template <typename T, typename W>
inline void rms_row(const T* x, const W* w, float* y, int64_t n, float eps, float offset) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    float v = load(x, i);
    ss += v * v;
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = load(x, i) * r * (load(w, i) + offset);
}

// out = x * cos + rotate_half(x) * signed_sin, rotate_half(x) = [x2, x1] with the sign in sin.
inline void rope_row(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t h = d / 2;
  float tmp[512];
  for (int64_t i = 0; i < d; ++i) tmp[i] = x[i];
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) x[i] = tmp[i] * cos[i] + tmp[i < h ? i + h : i - h] * sin[i];
}

template <typename T>
void rms_norm_impl(at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                   at::Tensor& out, double eps, double offset) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  T* xp = x.data_ptr<T>();
  const T* rp = residual.has_value() ? residual->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  auto run = [&](auto* wp) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> y(n);
      for (int64_t r = begin; r < end; ++r) {
        T* xr = xp + r * n;
        if (rp != nullptr) {
          for (int64_t i = 0; i < n; ++i) store(xr, i, load(xr, i) + load(rp + r * n, i));
        }
        rms_row(xr, wp, y.data(), n, static_cast<float>(eps), static_cast<float>(offset));
        for (int64_t i = 0; i < n; ++i) store(op + r * n, i, y[i]);
      }
    });
  };
  if (weight.scalar_type() == at::kFloat) run(weight.data_ptr<float>());
  else run(weight.data_ptr<c10::BFloat16>());
}

}  // namespace

namespace tensorpar {

// [..., n] -> normed [..., n]; with ``residual``, x += residual first, in place.
at::Tensor rms_norm(at::Tensor x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight, double eps,
                    double offset) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: contiguous tensors only");
  TORCH_CHECK(!residual.has_value() || (residual->is_contiguous() && residual->sizes() == x.sizes() &&
                                        residual->scalar_type() == x.scalar_type()),
              "rms_norm: the residual must match x");
  auto out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) rms_norm_impl<float>(x, residual, weight, out, eps, offset);
  else if (x.scalar_type() == at::kBFloat16) rms_norm_impl<c10::BFloat16>(x, residual, weight, out, eps, offset);
  else TORCH_CHECK(false, "rms_norm: float32 or bfloat16 only");
  return out;
}

}  // namespace tensorpar

namespace {

// [..., 2i] = [gate, up] -> act(gate) * up [..., i]; act 0: silu, 1: gelu (tanh approximation).
template <typename T>
void glu_impl(const at::Tensor& gate_up, at::Tensor& out, int64_t act) {
  const int64_t i2 = gate_up.size(-1), n = i2 / 2, rows = gate_up.numel() / i2;
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows * n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t r = j / n, c = j % n;
      const float g = load(gp, r * i2 + c), u = load(gp, r * i2 + n + c);
      float a;
      if (act == 0) {
        a = g / (1.f + std::exp(-g));
      } else {
        const float k = 0.7978845608028654f;  // sqrt(2 / pi)
        a = 0.5f * g * (1.f + std::tanh(k * (g + 0.044715f * g * g * g)));
      }
      store(op, j, a * u);
    }
  });
}

}  // namespace

namespace tensorpar {

// the gradient of glu: d[gate, up] [..., 2i] from grad [..., i], float32, element by element
// (scalar code: a value does not depend on where in a row, or on which thread, it falls)
at::Tensor glu_backward(const at::Tensor& gate_up, const at::Tensor& grad, int64_t act) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.scalar_type() == at::kFloat && gate_up.size(-1) % 2 == 0,
              "glu_backward: contiguous float32 [..., 2i]");
  const auto gc = grad.contiguous();
  TORCH_CHECK(gc.numel() * 2 == gate_up.numel() && gc.scalar_type() == at::kFloat, "glu_backward: grad [..., i]");
  const int64_t i2 = gate_up.size(-1), n = i2 / 2, rows = gate_up.numel() / i2;
  auto out = at::empty_like(gate_up);
  const float* gp = gate_up.data_ptr<float>();
  const float* dy = gc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows * n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t r = j / n, c = j % n;
      const float g = gp[r * i2 + c], u = gp[r * i2 + n + c];
      float a, da;
      if (act == 0) {  // silu: a = g s, a' = s (1 + g (1 - s)), s = sigmoid(g)
        const float s = 1.f / (1.f + std::exp(-g));
        a = g * s;
        da = s * (1.f + g * (1.f - s));
      } else {  // gelu, tanh approximation
        const float k = 0.7978845608028654f, t = std::tanh(k * (g + 0.044715f * g * g * g));
        a = 0.5f * g * (1.f + t);
        da = 0.5f * (1.f + t) + 0.5f * g * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * g * g);
      }
      op[r * i2 + c] = dy[j] * u * da;
      op[r * i2 + n + c] = dy[j] * a;
    }
  });
  return out;
}

// exp(x - shift) [N, V] for x [N, V] and shift [N], float32, element by element (scalar code)
at::Tensor exp_rows(const at::Tensor& x, const at::Tensor& shift) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && shift.numel() == x.size(0), "exp_rows: x [N, V], shift [N]");
  const auto xc = x.contiguous(), sc = shift.to(at::kFloat).contiguous();
  auto out = at::empty_like(xc);
  const int64_t V = x.size(1);
  const float *xp = xc.data_ptr<float>(), *sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, xc.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) op[j] = std::exp(xp[j] - sp[j / V]);
  });
  return out;
}

at::Tensor glu(const at::Tensor& gate_up, int64_t act) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0, "glu: contiguous [..., 2i] only");
  auto sizes = gate_up.sizes().vec();
  sizes.back() /= 2;
  auto out = at::empty(sizes, gate_up.options());
  if (gate_up.size(-1) == 0) return out;  // (a rank that holds none of an expert's rows)
  if (gate_up.scalar_type() == at::kFloat) glu_impl<float>(gate_up, out, act);
  else if (gate_up.scalar_type() == at::kBFloat16) glu_impl<c10::BFloat16>(gate_up, out, act);
  else TORCH_CHECK(false, "glu: float32 or bfloat16 only");
  return out;
}

}  // namespace tensorpar

namespace {

struct HeadNorm {
  const void* weight = nullptr;
  bool bf16 = false;
  float eps = 0.f, offset = 0.f;
};

// One head of qkv [d] into ``out`` [d] as float32: its RMSNorm (if any), then its rotation (if any).
template <typename T>
inline void prepare_head(const T* src, float* out, int64_t d, const HeadNorm& norm, const float* cos,
                         const float* sin) {
  if (norm.weight != nullptr) {
    if (norm.bf16) rms_row(src, static_cast<const c10::BFloat16*>(norm.weight), out, d, norm.eps, norm.offset);
    else rms_row(src, static_cast<const float*>(norm.weight), out, d, norm.eps, norm.offset);
  } else {
    for (int64_t i = 0; i < d; ++i) out[i] = load(src, i);
  }
  if (cos != nullptr) rope_row(out, cos, sin, d);
}

template <typename T>
void decode_attention_impl(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& blocks,
                           const at::Tensor& positions, const at::Tensor& cos_f, const at::Tensor& sin_f,
                           const HeadNorm& qn, const HeadNorm& kn, int64_t h, int64_t kv, int64_t d, float scale,
                           int64_t window, at::Tensor& out) {
  const int64_t B = qkv.size(0), width = qkv.size(1), bs = k_cache.size(1), n_blocks = blocks.size(1);
  const int64_t group = h / kv, slot = kv * d, block_stride = bs * slot;
  const T* qp = qkv.data_ptr<T>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  const float* cp = cos_f.defined() ? cos_f.data_ptr<float>() : nullptr;
  const float* sp = sin_f.defined() ? sin_f.data_ptr<float>() : nullptr;
  T* op = out.data_ptr<T>();
  // one task per (row, query head); the first query head of a group also writes its KV head's new
  // key and value; every task uses its own copy of the new key, so no task waits for another
  at::parallel_for(0, B * h, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(d), k(d), acc(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / h, head = task % h, g = head / group;
      const int64_t pos = pp[b];
      const T* row = qp + b * width;
      const float* cos = cp ? cp + b * d : nullptr;
      const float* sin = sp ? sp + b * d : nullptr;
      prepare_head(row + head * d, q.data(), d, qn, cos, sin);
      prepare_head(row + (h + g) * d, k.data(), d, kn, cos, sin);
      const T* v_new = row + (h + kv + g) * d;
      if (head % group == 0) {
        TORCH_CHECK(pos / bs < n_blocks, "decode_attention: position beyond the block table");
        const int64_t at = bp[b * n_blocks + pos / bs] * block_stride + (pos % bs) * slot + g * d;
        for (int64_t i = 0; i < d; ++i) {
          store(kc + at, i, k[i]);
          vc[at + i] = v_new[i];
        }
      }
      for (int64_t i = 0; i < d; ++i) q[i] *= scale;
      // online softmax over keys first..pos: the cached ones, then the new one
      const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      float m = -INFINITY, sum = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      auto attend = [&](float s, auto&& value) {
        if (s > m) {
          const float c = std::exp(m - s);
          sum *= c;
          for (int64_t i = 0; i < d; ++i) acc[i] *= c;
          m = s;
        }
        const float p = std::exp(s - m);
        sum += p;
        value(p);
      };
      for (int64_t l = first; l < pos; ++l) {
        const int64_t at = bp[b * n_blocks + l / bs] * block_stride + (l % bs) * slot + g * d;
        const T* kl = kc + at;
        const T* vl = vc + at;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < d; ++i) s += q[i] * load(kl, i);
        attend(s, [&](float p) {
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) acc[i] += p * load(vl, i);
        });
      }
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < d; ++i) s += q[i] * k[i];
      attend(s, [&](float p) {
        for (int64_t i = 0; i < d; ++i) acc[i] += p * load(v_new, i);
      });
      T* o = op + b * h * d + head * d;
      const float inv = 1.f / sum;
      for (int64_t i = 0; i < d; ++i) store(o, i, acc[i] * inv);
    }
  });
}

HeadNorm head_norm(const c10::optional<at::Tensor>& w, double eps, double offset) {
  HeadNorm n;
  if (w.has_value()) {
    TORCH_CHECK(w->is_contiguous(), "decode_attention: contiguous norm weights only");
    n.weight = w->data_ptr();
    n.bf16 = w->scalar_type() == at::kBFloat16;
    n.eps = static_cast<float>(eps);
    n.offset = static_cast<float>(offset);
  }
  return n;
}

}  // namespace

namespace tensorpar {

// One new token per row: qkv [B, (h + 2 kv) d] -> attention output [B, h d], writing each row's
// new key and value into the paged cache [blocks, block_size, kv, d] at ``positions`` [B] through
// its block table ``blocks`` [B, n]. Query and key heads are RMS-normed (q_norm / k_norm) and
// rotated (cos / signed sin [B, d]) first, where given; softmax(q k^T scale) v over keys
// max(0, pos - window + 1) .. pos (window 0: all of them).
at::Tensor decode_attention(const at::Tensor& qkv, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& blocks,
                            const at::Tensor& positions, const c10::optional<at::Tensor>& cos,
                            const c10::optional<at::Tensor>& sin, const c10::optional<at::Tensor>& q_norm,
                            const c10::optional<at::Tensor>& k_norm, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, double scale, int64_t window, double norm_eps, double norm_offset) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "decode_attention: qkv must be [B, (h + 2 kv) d], contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == qkv.scalar_type(),
              "decode_attention: contiguous caches of qkv's dtype only");
  TORCH_CHECK(num_heads % num_kv_heads == 0 && head_dim <= 512, "decode_attention: h % kv == 0, d <= 512");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && positions.scalar_type() == at::kLong, "decode_attention: int64 tables");
  auto blocks_c = blocks.contiguous();
  auto positions_c = positions.contiguous();
  at::Tensor cos_f, sin_f;
  if (cos.has_value()) {
    cos_f = cos->to(at::kFloat).contiguous();
    sin_f = sin->to(at::kFloat).contiguous();
  }
  auto out = at::empty({qkv.size(0), num_heads * head_dim}, qkv.options());
  const HeadNorm qn = head_norm(q_norm, norm_eps, norm_offset), kn = head_norm(k_norm, norm_eps, norm_offset);
  const float s = static_cast<float>(scale);
  if (qkv.scalar_type() == at::kFloat) {
    decode_attention_impl<float>(qkv, k_cache, v_cache, blocks_c, positions_c, cos_f, sin_f, qn, kn, num_heads,
                                 num_kv_heads, head_dim, s, window, out);
  } else if (qkv.scalar_type() == at::kBFloat16) {
    decode_attention_impl<c10::BFloat16>(qkv, k_cache, v_cache, blocks_c, positions_c, cos_f, sin_f, qn, kn,
                                         num_heads, num_kv_heads, head_dim, s, window, out);
  } else {
    TORCH_CHECK(false, "decode_attention: float32 or bfloat16 only");
  }
  return out;
}

}  // namespace tensorpar


TORCH_LIBRARY(tensorpar, m) {
  m.def("rms_norm(Tensor(a!) x, Tensor? residual, Tensor weight, float eps, float offset) -> Tensor");
  m.def("glu(Tensor gate_up, int act) -> Tensor");
  m.def("glu_backward(Tensor gate_up, Tensor grad, int act) -> Tensor");
  m.def("exp_rows(Tensor x, Tensor shift) -> Tensor");
  m.def("decode_attention(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor blocks, Tensor positions, "
        "Tensor? cos, Tensor? sin, Tensor? q_norm, Tensor? k_norm, int num_heads, int num_kv_heads, int head_dim, "
        "float scale, int window, float norm_eps, float norm_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(tensorpar, CPU, m) {
  m.impl("rms_norm", tensorpar::rms_norm);
  m.impl("glu", tensorpar::glu);
  m.impl("glu_backward", tensorpar::glu_backward);
  m.impl("exp_rows", tensorpar::exp_rows);
  m.impl("decode_attention", tensorpar::decode_attention);
}
