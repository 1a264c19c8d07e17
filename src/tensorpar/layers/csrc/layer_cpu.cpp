// The decode step's decoder layers as one object (tensorpar.layers.decode_stack): each layer is two
// halves, attention and MLP, and a half is
//   join:  x += post_prev(delta)             (delta: the output of the half before, reduced over
//                                             the ranks; post_prev: that half's own output norm)
//   in:    h = norm(x), u = h W_in^T (+ b)
//   core:  attention (norms, rotation, paged KV write, softmax over the cache) or act(gate) * up
//   out:   partial = core W_out^T (+ b)      (the rank's share; the caller reduces it)
// Products of 4-bit codes take x quantized to 8 bits per 32 values where ``quantize_x`` (see
// codes_linear). run(begin, end) chains halves with no reduction between them (one rank), so a whole decode step
// of a single-rank model is one call; with several ranks the caller reduces between halves.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <vector>

#include "kernels.h"

namespace {

using OptTensor = c10::optional<at::Tensor>;

// y = x W^T (+ b): W float [N, K] (bits 0), or codes, scale and optional zero (bits 8 or 4)
struct Projection {
  std::vector<at::Tensor> weight;
  int64_t group = 0, bits = 0;
  OptTensor bias;

  at::Tensor operator()(const at::Tensor& x, bool quantize_x) const {
    RECORD_FUNCTION(bits == 0 ? "tensorpar::dense_linear" : "tensorpar::codes_linear", std::vector<c10::IValue>());
    if (bits == 0) return tensorpar::dense_linear(x, weight[0], bias);
    auto y = tensorpar::codes_linear(x, weight[0], weight[1], weight.size() > 2 ? OptTensor(weight[2]) : c10::nullopt,
                                     group, bits, quantize_x);
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
};

struct Half {
  bool attention = false;
  at::Tensor norm;     // the pre-norm of this half's input
  OptTensor post;      // the norm of this half's output before it joins x (sandwich norms), or none
  double eps = 0, offset = 0;
  Projection in, out;
  // attention
  OptTensor q_norm, k_norm;
  int64_t heads = 0, kv_heads = 0, head_dim = 0, window = 0, rope = -1, cache = 0;
  double scale = 1;
  // MLP
  int64_t act = 0;
};

// Lets other Python threads run (a server's event loop) while a call computes, where the caller
// holds the GIL; restored on every way out.
struct WithoutGIL {
  PyThreadState* state = nullptr;
  WithoutGIL() {
    if (Py_IsInitialized() && PyGILState_Check()) state = PyEval_SaveThread();
  }
  ~WithoutGIL() {
    if (state != nullptr) PyEval_RestoreThread(state);
  }
};

struct DecodeStack : torch::CustomClassHolder {
  std::vector<Half> halves;
  std::vector<at::Tensor> k_cache, v_cache;

  static Half base(at::Tensor norm, OptTensor post, double eps, double offset, std::vector<at::Tensor> in_w,
                   int64_t in_group, int64_t in_bits, OptTensor in_bias, std::vector<at::Tensor> out_w,
                   int64_t out_group, int64_t out_bits, OptTensor out_bias) {
    Half h;
    h.norm = norm.contiguous();
    h.post = post;
    h.eps = eps;
    h.offset = offset;
    h.in = Projection{std::move(in_w), in_group, in_bits, in_bias};
    h.out = Projection{std::move(out_w), out_group, out_bits, out_bias};
    return h;
  }

  void add_attention(at::Tensor norm, OptTensor post, double eps, double offset, std::vector<at::Tensor> in_w,
                     int64_t in_group, int64_t in_bits, OptTensor in_bias, std::vector<at::Tensor> out_w,
                     int64_t out_group, int64_t out_bits, OptTensor out_bias, OptTensor q_norm, OptTensor k_norm,
                     int64_t heads, int64_t kv_heads, int64_t head_dim, double scale, int64_t window, int64_t rope,
                     int64_t cache) {
    Half h = base(norm, post, eps, offset, std::move(in_w), in_group, in_bits, in_bias, std::move(out_w), out_group,
                  out_bits, out_bias);
    h.attention = true;
    h.q_norm = q_norm;
    h.k_norm = k_norm;
    h.heads = heads;
    h.kv_heads = kv_heads;
    h.head_dim = head_dim;
    h.scale = scale;
    h.window = window;
    h.rope = rope;
    h.cache = cache;
    halves.push_back(std::move(h));
  }

  void add_mlp(at::Tensor norm, OptTensor post, double eps, double offset, std::vector<at::Tensor> in_w,
               int64_t in_group, int64_t in_bits, OptTensor in_bias, std::vector<at::Tensor> out_w, int64_t out_group,
               int64_t out_bits, OptTensor out_bias, int64_t act) {
    Half h = base(norm, post, eps, offset, std::move(in_w), in_group, in_bits, in_bias, std::move(out_w), out_group,
                  out_bits, out_bias);
    h.act = act;
    halves.push_back(std::move(h));
  }

  void set_cache(std::vector<at::Tensor> k, std::vector<at::Tensor> v) {
    k_cache = std::move(k);
    v_cache = std::move(v);
  }

  int64_t size() const { return static_cast<int64_t>(halves.size()); }

  // x [B, hidden] (updated in place) -> the partial output [B, hidden] of half end - 1, after halves
  // begin .. end - 1 ran in turn; ``delta`` is the reduced output of half begin - 1 (none at 0).
  at::Tensor run(at::Tensor x, OptTensor delta, int64_t begin, int64_t end, at::Tensor blocks, at::Tensor positions,
                 std::vector<at::Tensor> cos, std::vector<at::Tensor> sin, bool quantize_x) {
    TORCH_CHECK(0 <= begin && begin < end && end <= size(), "DecodeStack.run: halves ", begin, "..", end, " of ",
                size());
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "DecodeStack.run: x must be [B, hidden], contiguous");
    WithoutGIL released;
    for (int64_t i = begin; i < end; ++i) {
      const Half& half = halves[i];
      if (delta.has_value() && i > 0 && halves[i - 1].post.has_value()) {
        const Half& prev = halves[i - 1];
        delta = tensorpar::rms_norm(*delta, c10::nullopt, *prev.post, prev.eps, prev.offset);
      }
      const at::Tensor h = tensorpar::rms_norm(x, delta, half.norm, half.eps, half.offset);  // x += delta first
      const at::Tensor u = half.in(h, quantize_x);
      at::Tensor core;
      if (half.attention) {
        TORCH_CHECK(half.cache < static_cast<int64_t>(k_cache.size()), "DecodeStack.run: no KV cache set");
        RECORD_FUNCTION("tensorpar::decode_attention", std::vector<c10::IValue>());  // (profiles see the parts)
        const bool rotate = half.rope >= 0;
        core = tensorpar::decode_attention(u, k_cache[half.cache], v_cache[half.cache], blocks, positions,
                                           rotate ? OptTensor(cos[half.rope]) : c10::nullopt,
                                           rotate ? OptTensor(sin[half.rope]) : c10::nullopt, half.q_norm, half.k_norm,
                                           half.heads, half.kv_heads, half.head_dim, half.scale, half.window, half.eps,
                                           half.offset);
      } else {
        core = tensorpar::glu(u, half.act);
      }
      delta = half.out(core, quantize_x);
    }
    return *delta;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(tensorpar, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<>())
      .def("add_attention", &DecodeStack::add_attention)
      .def("add_mlp", &DecodeStack::add_mlp)
      .def("set_cache", &DecodeStack::set_cache)
      .def("size", &DecodeStack::size)
      .def("run", &DecodeStack::run);
}
