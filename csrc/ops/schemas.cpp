// Every op schema of the library, in one place. Implementations are registered per device in
// csrc/ops/*_ops.cpp; fake (meta) and autograd implementations in python/rnnattn_ext/_ops.py.
//
// Conventions: time-major input (T, B, I); states (B, H); weights with torch.nn's shapes and gate
// order; `reverse` runs the layer from t = T-1 down to 0 (the second direction of a bidirectional
// layer); `training` keeps the activations backward needs in `workspace` (else it is empty).
#include <torch/library.h>

#include <string>

TORCH_LIBRARY(rnnattn, m) {
  // LSTM
  m.def(
      "lstm_forward(Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, bool reverse, bool training) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor workspace)");
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor h0, "
      "Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor workspace, bool reverse) "
      "-> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_weight_ih, Tensor grad_weight_hh, "
      "Tensor grad_bias_ih, Tensor grad_bias_hh)");

  // GRU and the Elman RNNs share one signature: a single state h.
  for (const char* cell : {"gru", "rnn_tanh", "rnn_relu"}) {
    const std::string name(cell);
    const std::string forward = name +
        "_forward(Tensor input, Tensor h0, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
        "Tensor? bias_hh, bool reverse, bool training) -> (Tensor output, Tensor h_n, Tensor workspace)";
    const std::string backward = name +
        "_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor h0, Tensor weight_ih, "
        "Tensor weight_hh, Tensor output, Tensor workspace, bool reverse) -> (Tensor grad_input, "
        "Tensor grad_h0, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, Tensor grad_bias_hh)";
    m.def(forward.c_str());
    m.def(backward.c_str());
  }
}
