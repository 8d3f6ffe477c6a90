// Every op schema of the library, in one place. Implementations are registered per device in
// csrc/ops/*_ops.cpp, autograd in csrc/ops/autograd_ops.cpp (which pairs each forward op with its backward
// op by the argument names below: keep `grad_<name>` for gradients), fake (meta) implementations in
// python/rnnattn_ext/_ops.py.
//
// Conventions: time-major input (T, B, I); states (B, H); weights with torch.nn's shapes and gate
// order; `reverse` runs the layer from t = T-1 down to 0 (the second direction of a bidirectional
// layer); `training` keeps the activations backward needs in `workspace` (else it is empty; float32
// for a float16/bfloat16 input on the CPU, which computes in float32, else the input's dtype);
// `lengths` (B,) int64 on the input's device, values in [1, T], or None: variable lengths (SPEC:
// steps t >= lengths[b] leave row b's state unchanged and output zeros).
//
// Per cell: `<cell>_forward` / `<cell>_backward` (the base layer) and `<cell>_attn_forward` /
// `<cell>_attn_backward` (the attention-augmented cell of SPEC.md: self memory when `memory` is None,
// else external memory (S, B, M) with optional `memory_lengths` (B,); `window` None = unbounded;
// returns the context vectors (T, B, D) and, with `need_weights`, the attention weights
// (T, B, heads, slots), else an empty tensor). Streaming self memory: `past_keys`, `past_values`
// (P, B, D) are the keys and values of the P slots before the first step, oldest first (the
// previous chunk's last window - 1 states); their gradients are the backward's last outputs.
//
// LSTM only: `weight_hr` (P, H) or None, torch.nn's proj_size: the output and h (h0, h_n) are
// y_t = W_hr m_t (P wide), weight_hh and the attention's recurrent-side weights read them (P
// columns); its gradient is the backward's last output (empty without a projection).
#include <torch/library.h>

#include <string>
#include <vector>

namespace {

struct CellSignature {
  const char* name;
  std::vector<std::string> states;  // initial states; finals are "<s>_n", their gradients "grad_<s>_n"
  bool projection = false;          // takes weight_hr (torch.nn's proj_size)
};

std::string join(const std::vector<std::string>& parts, const std::string& prefix, const std::string& suffix) {
  std::string out;
  for (const auto& p : parts) out += prefix + p + suffix + ", ";
  return out;
}

std::vector<std::string> finals(const CellSignature& cell) {
  std::vector<std::string> out;
  for (const auto& s : cell.states) out.push_back(s.substr(0, 1) + "_n");
  return out;
}

}  // namespace

TORCH_LIBRARY(rnnattn, m) {
  const std::vector<CellSignature> cells{
      {"lstm", {"h0", "c0"}, true}, {"gru", {"h0"}}, {"rnn_tanh", {"h0"}}, {"rnn_relu", {"h0"}}};
  for (const auto& cell : cells) {
    const std::string name(cell.name), states = join(cell.states, "Tensor ", ""),
                      grad_states = join(cell.states, "Tensor grad_", ""), final_outputs = join(finals(cell), "Tensor ", ""),
                      grad_finals = join(finals(cell), "Tensor grad_", "");
    const std::string weight_hr = cell.projection ? "Tensor? weight_hr, " : "",
                      grad_weight_hr = cell.projection ? ", Tensor grad_weight_hr" : "";
    m.def((name + "_forward(Tensor input, " + states +
           "Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, " + weight_hr +
           "Tensor? lengths, bool reverse, bool training) "
           "-> (Tensor output, " + final_outputs + "Tensor workspace)")
              .c_str());
    m.def((name + "_backward(Tensor grad_output, " + grad_finals + "Tensor input, " + states +
           "Tensor weight_ih, Tensor weight_hh, " + weight_hr +
           "Tensor output, Tensor workspace, Tensor? lengths, bool reverse) "
           "-> (Tensor grad_input, " + grad_states +
           "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, Tensor grad_bias_hh" + grad_weight_hr +
           ")")
              .c_str());
    m.def((name + "_attn_forward(Tensor input, " + states +
           "Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, " + weight_hr +
           "Tensor weight_q, Tensor? bias_q, Tensor weight_k, Tensor? bias_k, Tensor weight_v, Tensor? bias_v, "
           "Tensor weight_c, Tensor? memory, Tensor? memory_lengths, Tensor? lengths, Tensor? past_keys, "
           "Tensor? past_values, int num_heads, int? window, bool reverse, bool training, bool need_weights) "
           "-> (Tensor output, " + final_outputs +
           "Tensor context, Tensor attention, Tensor workspace, Tensor attention_workspace)")
              .c_str());
    m.def((name + "_attn_backward(Tensor grad_output, " + grad_finals + "Tensor? grad_context, Tensor input, " +
           states +
           "Tensor weight_ih, Tensor weight_hh, " + weight_hr +
           "Tensor weight_q, Tensor weight_k, Tensor weight_v, Tensor weight_c, "
           "Tensor? memory, Tensor? memory_lengths, Tensor? lengths, Tensor? past_keys, Tensor? past_values, "
           "Tensor output, Tensor context, Tensor workspace, "
           "Tensor attention_workspace, int num_heads, int? window, bool reverse) -> (Tensor grad_input, " +
           grad_states +
           "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, Tensor grad_bias_hh, "
           "Tensor grad_weight_q, Tensor grad_bias_q, Tensor grad_weight_k, Tensor grad_bias_k, "
           "Tensor grad_weight_v, Tensor grad_bias_v, Tensor grad_weight_c, Tensor grad_memory, "
           "Tensor grad_past_keys, Tensor grad_past_values" + grad_weight_hr + ")")
              .c_str());
  }
}
