// The RNN decode step of a whole model in one call (Python side: rwkvctl/model/cpu_fast.py:fused_step), every layer
// as rnn_step_layer computes it (rnn_step_layer.h) and then ln_out and the head:
//
//   StepPlan(params, q_aux, layer_sizes, q_bits, q_group, head, head_rows, head_bits, head_group, head_size_divisor)
//       what the layers and the head read, gathered once by Python and kept between tokens. params: every layer's
//       rnn_step_layer parameters one layer after another; q_aux: their packed projections' scale and min tiles;
//       layer_sizes: three entries per layer (parameter count, q_aux count, flags: 1 = ln0, 2 = gate); q_bits and
//       q_group: every layer's entries one after another (7, or 8 with the gate). head: empty (the caller runs the
//       head), [ln_out.w, ln_out.b, weight] for a plain fp32/bf16 head (head_bits 0) or [ln_out.w, ln_out.b, codes,
//       scale, min] for a packed one, head_rows (V) rows of C inputs. The plan holds the tensors (the same TensorImpls as the model's parameters,
//       so in-place updates and `.data` swaps are seen) and checks them again on every call.
//   rnn_step_model(x (B, C), att_shift (L, B, C), ffn_shift (L, B, C), wkv (L, B, H, N, N) fp32, plan)
//       -> (logits (B, V) fp32, or x (B, C) fp32 after the last layer when the plan has no head;
//           att_shift, ffn_shift in their dtypes, wkv: the new state, stacked)
//
// Against a call of rnn_step_layer per layer it saves what is not weight streaming: per layer the dispatch of ~25
// arguments, the Python that gathers and checks them, the working buffers, and afterwards stacking the new state
// (together ~0.6-1 ms a token on the 0.1b preset, measured with the weights streaming from memory, which evicts the
// interpreter's data between layers). The inputs are left untouched (callers keep snapshots of states).
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "rnn_step_layer.h"
#include "rnn_step_parts.h"

namespace rwkvctl {
namespace {

class StepPlan : public torch::CustomClassHolder {
 public:
  StepPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> q_aux, std::vector<int64_t> layer_sizes,
           std::vector<int64_t> q_bits, std::vector<int64_t> q_group, std::vector<at::Tensor> head, int64_t head_rows,
           int64_t head_bits, int64_t head_group, double head_size_divisor)
      : params_(std::move(params)),
        q_aux_(std::move(q_aux)),
        sizes_(std::move(layer_sizes)),
        q_bits_(std::move(q_bits)),
        q_group_(std::move(q_group)),
        head_(std::move(head)),
        head_rows_(head_rows),
        head_bits_(head_bits),
        head_group_(head_group),
        hsd_(head_size_divisor) {
    const char* op = "StepPlan";
    TORCH_CHECK(!sizes_.empty() && sizes_.size() % 3 == 0, op, ": layer_sizes must hold 3 entries per layer, got ",
                sizes_.size());
    size_t n_params = 0, n_aux = 0, n_proj = 0;
    for (size_t i = 0; i < sizes_.size(); i += 3) {
      TORCH_CHECK(sizes_[i] >= 0 && sizes_[i + 1] >= 0 && sizes_[i + 2] >= 0 && sizes_[i + 2] <= 3, op,
                  ": bad layer_sizes entry for layer ", i / 3);
      offsets_.push_back({n_params, n_aux, n_proj});
      n_params += sizes_[i];
      n_aux += sizes_[i + 1];
      n_proj += (sizes_[i + 2] & 2) ? 8 : 7;
    }
    TORCH_CHECK(n_params == params_.size() && n_aux == q_aux_.size(), op, ": layer_sizes count ", n_params,
                " parameters and ", n_aux, " q_aux tensors, got ", params_.size(), " and ", q_aux_.size());
    TORCH_CHECK(q_bits_.size() == n_proj && q_group_.size() == n_proj, op, ": expected ", n_proj,
                " entries in q_bits and q_group, got ", q_bits_.size(), " and ", q_group_.size());
    TORCH_CHECK(head_.empty() || (head_bits_ == 0 && head_.size() == 3) || (head_bits_ != 0 && head_.size() == 5), op,
                ": head must be empty, [ln_out.w, ln_out.b, weight] or [ln_out.w, ln_out.b, codes, scale, min]");
    for_each_tensor([this](const at::Tensor& t) { layouts_.emplace_back(t.scalar_type(), t.is_contiguous()); });
  }

  // Whether every tensor still has the dtype and contiguity it had when the plan was made (model.to(dtype) and
  // `.data` assignments change them in place): the caller's cue to gather the arguments again, since a fresh
  // gather could then route a layer differently. A few ns a tensor, where the same check in Python cost ~0.1 ms a
  // token with the weights streaming through the caches.
  bool unchanged() const {
    size_t i = 0;
    bool same = true;
    for_each_tensor([&](const at::Tensor& t) {
      same = same && layouts_[i].first == t.scalar_type() && layouts_[i].second == t.is_contiguous();
      ++i;
    });
    return same;
  }

  int64_t layers() const { return static_cast<int64_t>(sizes_.size() / 3); }
  bool has_head() const { return !head_.empty(); }

  // Layer i's arguments, checked as rnn_step_layer checks them.
  LayerInputs layer(int64_t i, int64_t C) const {
    const auto [p0, a0, q0] = offsets_[i];
    const int64_t flags = sizes_[3 * i + 2];
    const size_t nq = (flags & 2) ? 8 : 7;
    return parse_layer("rnn_step_model", at::TensorList(params_.data() + p0, sizes_[3 * i]), C, flags & 1,
                       flags & 2, at::IntArrayRef(q_bits_.data() + q0, nq), at::IntArrayRef(q_group_.data() + q0, nq),
                       at::TensorList(q_aux_.data() + a0, sizes_[3 * i + 1]));
  }

  // ln_out and the head of the fp32 rows x (B, C) -> logits (B, V) fp32
  at::Tensor head(const float* x, int64_t B, int64_t C, int level) const {
    const char* op = "rnn_step_model";
    LayerVectors vecs;
    const float* g = vecs.get(op, "ln_out.weight", head_[0], C), *b = vecs.get(op, "ln_out.bias", head_[1], C);
    at::Tensor normed = at::empty({B, C}, at::TensorOptions().dtype(at::kFloat));
    float* xn = normed.data_ptr<float>();
    for (int64_t r = 0; r < B; ++r) layer_norm(x + r * C, g, b, xn + r * C, C, 1e-5f);
    Projection pr{&head_[2], head_bits_, head_group_};
    if (head_bits_ != 0) {
      pr.scale = &head_[3];
      pr.minimum = &head_[4];
    }
    pr.out = head_rows_;
    pr.in = C;
    check_projection(op, "head", pr);
    if (head_bits_ == 0 && head_[2].scalar_type() == at::kFloat && B > 16) {
      // many rows: (V, C) @ (C, B) streams the head once, where (B, C) @ (C, V) re-streams it every few rows
      return at::mm(head_[2], normed.t()).t().contiguous();  // (V, B) -> (B, V)
    }
    at::Tensor logits = at::empty({B, pr.out}, normed.options());
    project(pr, xn, logits.data_ptr<float>(), B, level);
    return logits;
  }

  double head_size_divisor() const { return hsd_; }

 private:
  template <typename Fn>
  void for_each_tensor(Fn&& fn) const {
    for (const auto* list : {&params_, &q_aux_, &head_})
      for (const at::Tensor& t : *list) fn(t);
  }

  std::vector<at::Tensor> params_, q_aux_;
  std::vector<int64_t> sizes_, q_bits_, q_group_;
  std::vector<std::array<size_t, 3>> offsets_;  // per layer: where its params, q_aux, q_bits entries start
  std::vector<at::Tensor> head_;
  int64_t head_rows_, head_bits_, head_group_;
  double hsd_;
  std::vector<std::pair<at::ScalarType, bool>> layouts_;  // every tensor's dtype and contiguity when made
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_step_model_cpu(
    const at::Tensor& x_in, const at::Tensor& att_shift, const at::Tensor& ffn_shift, const at::Tensor& wkv,
    const c10::intrusive_ptr<StepPlan>& plan) {
  const char* op = "rnn_step_model";
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), op, ": x must be (B, C) on the CPU, got ", x_in.sizes());
  const int64_t B = x_in.size(0), C = x_in.size(1), L = plan->layers();
  TORCH_CHECK(att_shift.dim() == 3 && att_shift.size(0) == L && att_shift.size(1) == B && att_shift.size(2) == C &&
                  ffn_shift.sizes() == att_shift.sizes(),
              op, ": shifts must be (L, B, C) = (", L, ", ", B, ", ", C, "), got ", att_shift.sizes(), ", ",
              ffn_shift.sizes());
  std::vector<LayerInputs> layers;
  layers.reserve(L);
  for (int64_t i = 0; i < L; ++i) layers.push_back(plan->layer(i, C));
  const int64_t H = layers[0].H, N = layers[0].N;
  int64_t A = 0, F = 0;
  for (const LayerInputs& layer : layers) {
    TORCH_CHECK(layer.H == H && layer.N == N, op, ": every layer must have the same heads and head size");
    A = std::max(A, layer.A);
    F = std::max(F, layer.F);
  }
  TORCH_CHECK(wkv.dim() == 5 && wkv.size(0) == L && wkv.size(1) == B && wkv.size(2) == H && wkv.size(3) == N &&
                  wkv.size(4) == N && wkv.scalar_type() == at::kFloat,
              op, ": wkv must be (L, B, H, N, N) = (", L, ", ", B, ", ", H, ", ", N, ", ", N, ") float32, got ",
              wkv.sizes(), " ", wkv.scalar_type());

  at::Tensor x = as_f32(x_in).clone();  // (B, C): the residual stream, updated in place
  const at::Tensor sa = as_f32(att_shift), sf = as_f32(ffn_shift);  // (L, B, C)
  const auto f32 = x.options();
  at::Tensor new_att = at::empty({L, B, C}, f32), new_ffn = at::empty({L, B, C}, f32);
  const at::Tensor wkv_in = wkv.contiguous();
  at::Tensor wkv_out = at::empty_like(wkv_in);  // (L, B, H, N, N): each layer writes its new state in place
  StepScratch scratch(B, C, A, F);
  const int level = step_isa_level();
  const int64_t rows = B * C, states = B * H * N * N;
  for (int64_t i = 0; i < L; ++i) {
    run_layer(op, layers[i], plan->head_size_divisor(), x.data_ptr<float>(), sa.data_ptr<float>() + i * rows,
              sf.data_ptr<float>() + i * rows, wkv_in.data_ptr<float>() + i * states,
              new_att.data_ptr<float>() + i * rows, new_ffn.data_ptr<float>() + i * rows,
              wkv_out.data_ptr<float>() + i * states, B, level, scratch);
  }
  at::Tensor out = plan->has_head() ? plan->head(x.data_ptr<float>(), B, C, level) : x;
  return {out, new_att.to(att_shift.scalar_type()), new_ffn.to(ffn_shift.scalar_type()), wkv_out};
}

}  // namespace
}  // namespace rwkvctl

TORCH_LIBRARY_FRAGMENT(rwkvctl, m) {
  m.class_<rwkvctl::StepPlan>("StepPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>,
                       std::vector<int64_t>, std::vector<at::Tensor>, int64_t, int64_t, int64_t, double>())
      .def("unchanged", &rwkvctl::StepPlan::unchanged);
  m.def(
      "rnn_step_model(Tensor x, Tensor att_shift, Tensor ffn_shift, Tensor wkv, "
      "__torch__.torch.classes.rwkvctl.StepPlan plan) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rwkvctl, CPU, m) { m.impl("rnn_step_model", &rwkvctl::rnn_step_model_cpu); }
