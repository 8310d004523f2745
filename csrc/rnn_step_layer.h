// One layer of the RNN decode step on fp32 rows, shared by the per-layer op (rnn_step_cpu.cpp: rnn_step_layer) and
// the whole-model op (rnn_step_model_cpu.cpp: rnn_step_model), so both compute the same thing in the same order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace rwkvctl {

// cpu_isa_level() with level 2 lowered to 1 where AVX-512 BW is missing (the AVX-512 kernels' 16-bit masked loads)
int step_isa_level();

// One projection, `out` rows of `in` inputs: a plain weight (bits == 0: fp32 or bf16) or a packed group-affine
// weight in the tiles of qmm_cpu.cpp (weight = the codes, scale and minimum beside it).
struct Projection {
  const at::Tensor* weight = nullptr;
  int64_t bits = 0, group = 0;
  const at::Tensor* scale = nullptr;
  const at::Tensor* minimum = nullptr;
  int64_t out = 0, in = 0;
};

// Raises (naming `op` and `what`) unless the projection is something project() reads for out x in.
void check_projection(const char* op, const char* what, const Projection& pr);

// y (B, out) = x (B, in) @ W.T, fp32 rows, fp32 accumulation
void project(const Projection& pr, const float* x, float* y, int64_t B, int level);

// A layer's arguments as rnn_step_layer takes them (parameter order: rnn_step_cpu.cpp), checked once: the shapes,
// the projections in the order r, k, v, output, ffn key, ffn receptance, ffn value (, gate).
struct LayerInputs {
  at::TensorList p;
  bool has_ln0 = false, has_gate = false;
  std::vector<Projection> proj;
  int64_t C = 0, H = 0, N = 0, A = 0, F = 0;
};

LayerInputs parse_layer(const char* op, at::TensorList p, int64_t C, bool has_ln0, bool has_gate,
                        at::IntArrayRef q_bits, at::IntArrayRef q_group, at::TensorList q_aux);

// The working buffers of a step, allocated once and reused by every layer of a model.
struct StepScratch {
  std::vector<float> mixed, proj, y, out, hidden, rec;
  StepScratch(int64_t B, int64_t C, int64_t A, int64_t F);
};

// The layer's small vectors (norms, mixes, decay, bonus) as fp32 pointers without a tensor per vector: fp32
// contiguous vectors are read in place, bf16 ones widened into buffers owned here, anything else converted by torch.
class LayerVectors {
 public:
  const float* get(const char* op, const char* what, const at::Tensor& t, int64_t n);

 private:
  std::vector<std::vector<float>> owned_;
};

// Block.step for B fp32 rows: x (B, C) is updated in place (the residual stream); the previous shifts (B, C) and
// WKV state (B, H, N, N) are read, the new ones written to att_new, ffn_new and wkv_out (which must not alias the
// inputs, except wkv_out == wkv_in).
void run_layer(const char* op, const LayerInputs& layer, double head_size_divisor, float* x, const float* att_prev,
               const float* ffn_prev, const float* wkv_in, float* att_new, float* ffn_new, float* wkv_out, int64_t B,
               int level, StepScratch& scratch);

}  // namespace rwkvctl
