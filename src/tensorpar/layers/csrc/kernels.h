// The fused CPU decode kernels (decode_cpu.cpp, linear_cpu.cpp) as C++ functions, for the
// decoder-layer stack (layer_cpu.cpp) to call without a trip through Python or the dispatcher.
#pragma once
#include <ATen/ATen.h>

namespace tensorpar {

// [..., n] -> normed [..., n]; with ``residual``, x += residual first, in place.
at::Tensor rms_norm(at::Tensor x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight, double eps,
                    double offset);
// [..., 2i] = [gate, up] -> act(gate) * up [..., i]; act 0: silu, 1: gelu (tanh).
at::Tensor glu(const at::Tensor& gate_up, int64_t act);
// qkv [B, (h + 2 kv) d] of one new token per row -> [B, h d], its key and value written to the paged cache.
at::Tensor decode_attention(const at::Tensor& qkv, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& blocks,
                            const at::Tensor& positions, const c10::optional<at::Tensor>& cos,
                            const c10::optional<at::Tensor>& sin, const c10::optional<at::Tensor>& q_norm,
                            const c10::optional<at::Tensor>& k_norm, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, double scale, int64_t window, double norm_eps, double norm_offset);
// x [T, K] -> x W^T + b [T, N], W [N, K] float32 or bfloat16.
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// x [T, K] -> x W^T [T, N], W as 8- or 4-bit codes in groups with float16 scale (and zero);
// ``quantize_x``: 4-bit codes meet x quantized to 8 bits per 32 values, on VNNI where the CPU has it.
at::Tensor codes_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const c10::optional<at::Tensor>& zero, int64_t group, int64_t bits, bool quantize_x);

}  // namespace tensorpar
