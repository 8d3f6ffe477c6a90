#include "engine/recurrent_engine.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <type_traits>

#include "cells/all_cells.h"
#include "engine/cpu/pointwise_cpu.h"
#include "engine/step_args.h"

#ifdef RNNATTN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "engine/cuda/pointwise_cuda.h"
#endif

namespace rnnattn {
namespace {

using at::Tensor;

// The raw element type the pointwise code sees for each torch dtype.
template <typename scalar_t>
struct Storage {
  using type = scalar_t;
};
template <>
struct Storage<at::Half> {
  using type = f16_t;
};
template <>
struct Storage<at::BFloat16> {
  using type = bf16_t;
};

template <typename T>
T* ptr(const Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename T>
constexpr bool kCpuType = std::is_same_v<T, float> || std::is_same_v<T, double>;

// Below this many units a step's pointwise pass is not worth splitting across threads.
constexpr int64_t kCpuGrainUnits = 8192;

template <class Cell, typename T>
void run_forward_step(const Tensor& like, const ForwardStepArgs<T>& args) {
  const int64_t units = args.batch * args.hidden;
  if (like.is_cpu()) {
    if constexpr (kCpuType<T>) {
      const auto fn = cpu::forward_range_fn<Cell, T>();
      at::parallel_for(0, units, kCpuGrainUnits, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
      return;
    }
    TORCH_CHECK_TYPE(false, "rnnattn: dtype ", like.scalar_type(), " is not supported on the CPU");
  }
#ifdef RNNATTN_WITH_CUDA
  const cudaError_t err = cuda::launch_forward_step<Cell, T>(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rnnattn: ", Cell::kName, " forward kernel failed: ", cudaGetErrorString(err));
#else
  TORCH_CHECK(false, "rnnattn: built without CUDA, cannot run on ", like.device());
#endif
}

template <class Cell, typename T>
void run_backward_step(const Tensor& like, const BackwardStepArgs<T>& args) {
  const int64_t units = args.batch * args.hidden;
  if (like.is_cpu()) {
    if constexpr (kCpuType<T>) {
      const auto fn = cpu::backward_range_fn<Cell, T>();
      at::parallel_for(0, units, kCpuGrainUnits, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
      return;
    }
    TORCH_CHECK_TYPE(false, "rnnattn: dtype ", like.scalar_type(), " is not supported on the CPU");
  }
#ifdef RNNATTN_WITH_CUDA
  const cudaError_t err = cuda::launch_backward_step<Cell, T>(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rnnattn: ", Cell::kName, " backward kernel failed: ", cudaGetErrorString(err));
#else
  TORCH_CHECK(false, "rnnattn: built without CUDA, cannot run on ", like.device());
#endif
}

// Step order: the forward direction visits t = 0..T-1, the reverse one t = T-1..0.
struct StepOrder {
  int64_t steps;
  bool reverse;
  int64_t time(int64_t k) const { return reverse ? steps - 1 - k : k; }
};

// Calls fn with a null pointer of the storage type of like's dtype.
template <typename Fn>
void dispatch_dtype(const Tensor& like, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "rnnattn", [&] {
    fn(static_cast<typename Storage<scalar_t>::type*>(nullptr));
  });
}

}  // namespace

template <class Cell>
RecurrentForward recurrent_forward(const Tensor& input, const std::vector<Tensor>& initial_states,
                                   const Tensor& weight_ih, const Tensor& weight_hh,
                                   const std::optional<Tensor>& bias_ih, const std::optional<Tensor>& bias_hh,
                                   bool reverse, bool training) {
  constexpr int S = Cell::kStates;
  constexpr int planes = workspace_planes<Cell>();
#ifdef RNNATTN_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard guard(input.is_cuda() ? std::optional<c10::Device>(input.device())
                                                           : std::nullopt);
#endif
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t H = weight_hh.size(1), GH = Cell::kGates * H;
  const auto opts = input.options();

  const Tensor x = input.contiguous().view({T * B, I});
  const Tensor w_hh_t = weight_hh.contiguous().t();
  // The input projection of every step in one GEMM (b_ih folded in).
  const Tensor xproj = bias_ih ? at::addmm(*bias_ih, x, weight_ih.t()) : at::mm(x, weight_ih.t());
  Tensor hproj = at::empty({B, GH}, opts);
  Tensor output = at::empty({T, B, H}, opts);
  Tensor workspace = training ? at::empty({T, planes, B, H}, opts) : at::empty({0}, opts);
  std::vector<Tensor> init;
  for (const auto& s : initial_states) init.push_back(s.contiguous());
  // Inference keeps the states other than h in two alternating buffers instead of the workspace.
  std::vector<Tensor> ping_pong;
  if (!training) {
    for (int s = 1; s < S; ++s) {
      ping_pong.push_back(at::empty({B, H}, opts));
      ping_pong.push_back(at::empty({B, H}, opts));
    }
  }
  const StepOrder order{T, reverse};
  const int64_t plane = B * H;

  dispatch_dtype(input, [&](auto* type_tag) {
    using T_ = std::remove_pointer_t<decltype(type_tag)>;
    auto extra_state = [&](int64_t k, int s) -> T_* {
      // State s (>= 1) after forward step k.
      if (training) return ptr<T_>(workspace) + (order.time(k) * planes + Cell::kSaved + s - 1) * plane;
      return ptr<T_>(ping_pong[2 * (s - 1) + (k % 2)]);
    };
    for (int64_t k = 0; k < T; ++k) {
      const int64_t t = order.time(k);
      const Tensor h_prev = k == 0 ? init[0] : output.select(0, order.time(k - 1));
      if (bias_hh) {
        at::addmm_out(hproj, *bias_hh, h_prev, w_hh_t);
      } else {
        at::mm_out(hproj, h_prev, w_hh_t);
      }
      ForwardStepArgs<T_> args{};
      args.xproj = ptr<T_>(xproj) + t * B * GH;
      args.hproj = ptr<T_>(hproj);
      args.prev[0] = ptr<T_>(h_prev);
      args.next[0] = ptr<T_>(output) + t * plane;
      for (int s = 1; s < S; ++s) {
        args.prev[s] = k == 0 ? ptr<T_>(init[s]) : extra_state(k - 1, s);
        args.next[s] = extra_state(k, s);
      }
      args.saved = training ? ptr<T_>(workspace) + t * planes * plane : nullptr;
      args.batch = B;
      args.hidden = H;
      run_forward_step<Cell, T_>(input, args);
    }
  });

  RecurrentForward result;
  // Final states are fresh tensors: an op's outputs must not alias each other.
  if (T == 0) {
    for (const auto& s : init) result.final_states.push_back(s.clone());
  } else {
    const int64_t last = order.time(T - 1);
    result.final_states.push_back(output.select(0, last).clone());
    for (int s = 1; s < S; ++s) {
      result.final_states.push_back(training ? workspace.select(0, last).select(0, Cell::kSaved + s - 1).clone()
                                             : ping_pong[2 * (s - 1) + ((T - 1) % 2)]);
    }
  }
  result.output = std::move(output);
  result.workspace = std::move(workspace);
  return result;
}

template <class Cell>
RecurrentBackward recurrent_backward(const Tensor& grad_output, const std::vector<Tensor>& grad_final_states,
                                     const Tensor& input, const std::vector<Tensor>& initial_states,
                                     const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& output,
                                     const Tensor& workspace, bool reverse) {
  constexpr int S = Cell::kStates;
  constexpr int planes = workspace_planes<Cell>();
#ifdef RNNATTN_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard guard(input.is_cuda() ? std::optional<c10::Device>(input.device())
                                                           : std::nullopt);
#endif
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t H = weight_hh.size(1), GH = Cell::kGates * H;
  const auto opts = input.options();
  const int64_t plane = B * H;

  const Tensor w_hh = weight_hh.contiguous();
  const Tensor grad_y = grad_output.contiguous();
  std::vector<Tensor> init;
  for (const auto& s : initial_states) init.push_back(s.contiguous());
  // Carried state gradients, updated in place step by step (they end as the initial states' gradients).
  std::vector<Tensor> dstate;
  for (const auto& g : grad_final_states) dstate.push_back(g.contiguous().clone());

  Tensor dgx = at::empty({T, B, GH}, opts);
  Tensor dgh = Cell::kSeparateHiddenGrad ? at::empty({T, B, GH}, opts) : dgx;
  const StepOrder order{T, reverse};

  dispatch_dtype(input, [&](auto* type_tag) {
    using T_ = std::remove_pointer_t<decltype(type_tag)>;
    auto extra_state = [&](int64_t k, int s) -> const T_* {
      return ptr<T_>(workspace) + (order.time(k) * planes + Cell::kSaved + s - 1) * plane;
    };
    for (int64_t k = T - 1; k >= 0; --k) {
      const int64_t t = order.time(k);
      BackwardStepArgs<T_> args{};
      args.saved = ptr<T_>(workspace) + t * planes * plane;
      args.prev[0] = k == 0 ? ptr<T_>(init[0]) : ptr<T_>(output) + order.time(k - 1) * plane;
      args.next[0] = ptr<T_>(output) + t * plane;
      for (int s = 1; s < S; ++s) {
        args.prev[s] = k == 0 ? ptr<T_>(init[s]) : extra_state(k - 1, s);
        args.next[s] = extra_state(k, s);
      }
      args.grad_output = ptr<T_>(grad_y) + t * plane;
      for (int s = 0; s < S; ++s) args.dstate[s] = ptr<T_>(dstate[s]);
      args.dxg = ptr<T_>(dgx) + t * B * GH;
      args.dhg = ptr<T_>(dgh) + t * B * GH;
      args.batch = B;
      args.hidden = H;
      run_backward_step<Cell, T_>(input, args);
      // dh_{t-1} = (direct part from the cell) + dgh_t @ W_hh
      dstate[0].addmm_(dgh.select(0, t), w_hh);
    }
  });

  RecurrentBackward result;
  const Tensor dgx_flat = dgx.view({T * B, GH});
  const Tensor dgh_flat = dgh.view({T * B, GH});
  result.grad_input = dgx_flat.mm(weight_ih.contiguous()).view({T, B, I});
  result.grad_weight_ih = dgx_flat.t().mm(input.contiguous().view({T * B, I}));
  // dW_hh = sum_t dgh_t^T h_{t-1}: the step that read h_0 and the others (which read the outputs).
  if (T == 0) {
    result.grad_weight_hh = at::zeros_like(weight_hh);
  } else {
    const int64_t first = order.time(0);
    result.grad_weight_hh = dgh.select(0, first).t().mm(init[0]);
    if (T > 1) {
      const Tensor later = reverse ? dgh.narrow(0, 0, T - 1) : dgh.narrow(0, 1, T - 1);
      const Tensor read = reverse ? output.narrow(0, 1, T - 1) : output.narrow(0, 0, T - 1);
      result.grad_weight_hh.addmm_(later.reshape({(T - 1) * B, GH}).t(), read.reshape({(T - 1) * B, H}));
    }
  }
  result.grad_bias_ih = dgx_flat.sum(0);
  result.grad_bias_hh = Cell::kSeparateHiddenGrad ? dgh_flat.sum(0) : result.grad_bias_ih.clone();
  result.grad_initial_states = std::move(dstate);
  return result;
}

#define RNNATTN_INSTANTIATE_ENGINE(CELL)                                                                         \
  template RecurrentForward recurrent_forward<CELL>(const Tensor&, const std::vector<Tensor>&, const Tensor&,    \
                                                    const Tensor&, const std::optional<Tensor>&,                 \
                                                    const std::optional<Tensor>&, bool, bool);                   \
  template RecurrentBackward recurrent_backward<CELL>(const Tensor&, const std::vector<Tensor>&, const Tensor&,  \
                                                      const std::vector<Tensor>&, const Tensor&, const Tensor&,  \
                                                      const Tensor&, const Tensor&, bool);
RNNATTN_FOR_EACH_CELL(RNNATTN_INSTANTIATE_ENGINE)
#undef RNNATTN_INSTANTIATE_ENGINE

}  // namespace rnnattn
