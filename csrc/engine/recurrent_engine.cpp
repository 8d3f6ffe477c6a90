#include "engine/recurrent_engine.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>

#include <type_traits>

#include "cells/all_cells.h"
#include "engine/cpu/packed_gemm.h"
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

// The device passes for each direction of the pointwise work, chosen by overload on the arguments.
template <class Cell, typename T>
void cpu_pointwise(const ForwardStepArgs<T>& args) {
  cpu::forward_block_fn<Cell, T>()(args);
}
template <class Cell, typename T>
void cpu_pointwise(const BackwardStepArgs<T>& args) {
  cpu::backward_block_fn<Cell, T>()(args);
}
#ifdef RNNATTN_WITH_CUDA
template <class Cell, typename T>
cudaError_t cuda_pointwise(const ForwardStepArgs<T>& args, cudaStream_t stream) {
  return cuda::launch_forward_step<Cell, T>(args, stream);
}
template <class Cell, typename T>
cudaError_t cuda_pointwise(const BackwardStepArgs<T>& args, cudaStream_t stream) {
  return cuda::launch_backward_step<Cell, T>(args, stream);
}
#endif

// The pointwise pass (forward or backward) of one block of units, on the tensors' device. On the
// CPU it runs in the calling thread (the engine gives each thread its own block).
template <class Cell, template <typename> class Args, typename T>
void run_pointwise_block(const Tensor& like, const Args<T>& args) {
  if (like.is_cpu()) {
    if constexpr (kCpuType<T>) {
      cpu_pointwise<Cell>(args);
      return;
    }
    TORCH_CHECK_TYPE(false, "rnnattn: dtype ", like.scalar_type(), " is not supported on the CPU");
  }
#ifdef RNNATTN_WITH_CUDA
  const cudaError_t err = cuda_pointwise<Cell>(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "rnnattn: ", Cell::kName, " pointwise kernel failed: ", cudaGetErrorString(err));
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

// How the hidden units are split into blocks, one per CPU thread, and the gate-row order that
// makes each block's rows of W_ih, W_hh and the projections contiguous.
//
// On the CPU every thread keeps its own slice of W_hh hot in its cache for the whole sequence and
// runs its block's GEMM and pointwise pass with no synchronisation in between; one barrier per step.
// CUDA uses a single block (and the plain torch.nn row order).
struct UnitBlocks {
  int64_t gates = 1, hidden = 0;
  std::vector<int64_t> begin;  // block c covers units [begin[c], begin[c + 1])
  Tensor order;                // permuted row p holds torch.nn row order[p]; undefined if identity
  Tensor inverse;              // torch.nn row r is permuted row inverse[r]

  int64_t count() const { return static_cast<int64_t>(begin.size()) - 1; }
  int64_t first(int64_t c) const { return begin[c]; }
  int64_t width(int64_t c) const { return begin[c + 1] - begin[c]; }
  // Rows of block c in the permuted order: [gates * first, gates * (first + width)).
  int64_t row0(int64_t c) const { return gates * begin[c]; }
  int64_t rows(int64_t c) const { return gates * width(c); }

  Tensor permute_rows(const Tensor& t) const { return order.defined() ? t.index_select(0, order) : t; }
  Tensor unpermute_rows(const Tensor& t) const { return inverse.defined() ? t.index_select(0, inverse) : t; }
};

// Blocks narrower than this (in units) are not worth a thread: the GEMM per block gets too thin.
constexpr int64_t kMinUnitsPerBlock = 32;

UnitBlocks make_unit_blocks(int gates, int64_t hidden, const Tensor& like) {
  UnitBlocks blocks;
  blocks.gates = gates;
  blocks.hidden = hidden;
  int64_t count = 1;
  if (like.is_cpu() && !at::in_parallel_region()) {
    count = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), hidden / kMinUnitsPerBlock));
  }
  for (int64_t c = 0; c < count; ++c) {
    // Block edges on multiples of 8 units keep the vectorized loops aligned.
    blocks.begin.push_back(c == 0 ? 0 : (hidden * c / count) / 8 * 8);
  }
  blocks.begin.push_back(hidden);
  if (count > 1) {
    std::vector<int64_t> order;
    order.reserve(gates * hidden);
    for (int64_t c = 0; c < count; ++c) {
      for (int g = 0; g < gates; ++g) {
        for (int64_t j = blocks.first(c); j < blocks.first(c) + blocks.width(c); ++j) order.push_back(g * hidden + j);
      }
    }
    blocks.order = at::tensor(order, at::TensorOptions().dtype(at::kLong));
    blocks.inverse = at::empty_like(blocks.order).index_copy_(0, blocks.order, at::arange(gates * hidden, at::kLong));
  }
  return blocks;
}

// Runs body(c) for every block: inline for one block, else one block per thread. A body that calls
// ATen gets the caller's thread-local state (dispatch keys, grad mode) on the worker threads too;
// the packed-GEMM path calls no ATen and skips that cost.
template <typename Body>
void for_each_block(const UnitBlocks& blocks, const std::optional<at::ThreadLocalState>& caller_state, Body&& body) {
  if (blocks.count() == 1) {
    body(0);
    return;
  }
  at::parallel_for(0, blocks.count(), 1, [&](int64_t c0, int64_t c1) {
    std::optional<at::ThreadLocalStateGuard> guard;
    if (caller_state) guard.emplace(*caller_state);
    for (int64_t c = c0; c < c1; ++c) body(c);
  });
}

// float on the CPU multiplies by W_hh with the packed kernel (csrc/engine/cpu/packed_gemm.h);
// other dtypes and CUDA go through ATen (MKL / cuBLAS).
bool uses_packed_gemm(const Tensor& like) { return like.is_cpu() && like.scalar_type() == at::kFloat; }

template <typename T>
GateView<T> gate_view(T* base, int64_t row_stride, const UnitBlocks& blocks, int64_t c) {
  return GateView<T>{base + blocks.row0(c), row_stride, blocks.width(c)};
}

}  // namespace

template <class Cell>
RecurrentForward recurrent_forward(const Tensor& input_arg, const std::vector<Tensor>& initial_states,
                                   const Tensor& weight_ih_arg, const Tensor& weight_hh_arg,
                                   const std::optional<Tensor>& bias_ih, const std::optional<Tensor>& bias_hh,
                                   bool reverse, bool training) {
  constexpr int S = Cell::kStates, G = Cell::kGates;
  constexpr int planes = workspace_planes<Cell>();
#ifdef RNNATTN_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard guard(input_arg.is_cuda() ? std::optional<c10::Device>(input_arg.device())
                                                               : std::nullopt);
#endif
  // Plain (non-differentiable) views: the engine's own ATen calls must not record autograd history.
  const Tensor input = input_arg.detach();
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t H = weight_hh_arg.size(1), GH = G * H;
  const auto opts = input.options();
  const UnitBlocks blocks = make_unit_blocks(G, H, input);

  const Tensor x = input.contiguous().view({T * B, I});
  const Tensor w_ih = blocks.permute_rows(weight_ih_arg.detach());
  const Tensor w_hh = blocks.permute_rows(weight_hh_arg.detach()).contiguous();
  const std::optional<Tensor> b_hh =
      bias_hh ? std::optional<Tensor>(blocks.permute_rows(bias_hh->detach())) : std::nullopt;
  // The input projection of every step in one GEMM (b_ih folded in), rows in block order.
  const Tensor xproj = bias_ih ? at::addmm(blocks.permute_rows(bias_ih->detach()), x, w_ih.t()) : at::mm(x, w_ih.t());
  const bool packed = uses_packed_gemm(input);
  std::vector<Tensor> hproj, w_hh_t, b_hh_block;
  std::vector<cpu::PackedMatrix> w_hh_packed(packed ? blocks.count() : 0);
  for (int64_t c = 0; c < blocks.count(); ++c) {
    hproj.push_back(at::empty({B, blocks.rows(c)}, opts));
    w_hh_t.push_back(w_hh.narrow(0, blocks.row0(c), blocks.rows(c)).t());
    if (b_hh) b_hh_block.push_back(b_hh->narrow(0, blocks.row0(c), blocks.rows(c)).contiguous());
    if (packed) {
      // hproj_c = h @ W_c^T: M = W_c (rows(c) x H).
      cpu::pack_matrix(ptr<float>(w_hh) + blocks.row0(c) * H, blocks.rows(c), H, H, 1, w_hh_packed[c]);
    }
  }
  const std::optional<at::ThreadLocalState> caller_state =
      packed ? std::nullopt : std::optional<at::ThreadLocalState>(std::in_place);
  Tensor output = at::empty({T, B, H}, opts);
  Tensor workspace = training ? at::empty({T, planes, B, H}, opts) : at::empty({0}, opts);
  std::vector<Tensor> init;
  for (const auto& s : initial_states) init.push_back(s.detach().contiguous());
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
      for_each_block(blocks, caller_state, [&](int64_t c) {
        if (packed) {
          cpu::gemm_packed_fn()(ptr<float>(h_prev), B, H, w_hh_packed[c], b_hh ? ptr<float>(b_hh_block[c]) : nullptr,
                                ptr<float>(hproj[c]), blocks.rows(c));
        } else if (b_hh) {
          at::addmm_out(hproj[c], b_hh_block[c], h_prev, w_hh_t[c]);
        } else {
          at::mm_out(hproj[c], h_prev, w_hh_t[c]);
        }
        ForwardStepArgs<T_> args{};
        args.xproj = gate_view<const T_>(ptr<T_>(xproj) + t * B * GH, GH, blocks, c);
        args.hproj = GateView<const T_>{ptr<T_>(hproj[c]), blocks.rows(c), blocks.width(c)};
        args.prev[0] = ptr<T_>(h_prev);
        args.next[0] = ptr<T_>(output) + t * plane;
        for (int s = 1; s < S; ++s) {
          args.prev[s] = k == 0 ? ptr<T_>(init[s]) : extra_state(k - 1, s);
          args.next[s] = extra_state(k, s);
        }
        args.saved = training ? ptr<T_>(workspace) + t * planes * plane : nullptr;
        args.batch = B;
        args.hidden = H;
        args.unit_begin = blocks.first(c);
        args.unit_end = blocks.first(c) + blocks.width(c);
        run_pointwise_block<Cell>(input, args);
      });
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
                                     const Tensor& input_arg, const std::vector<Tensor>& initial_states,
                                     const Tensor& weight_ih_arg, const Tensor& weight_hh_arg, const Tensor& output_arg,
                                     const Tensor& workspace_arg, bool reverse) {
  constexpr int S = Cell::kStates, G = Cell::kGates;
  constexpr int planes = workspace_planes<Cell>();
#ifdef RNNATTN_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard guard(input_arg.is_cuda() ? std::optional<c10::Device>(input_arg.device())
                                                               : std::nullopt);
#endif
  const Tensor input = input_arg.detach();
  const Tensor output = output_arg.detach().contiguous();
  const Tensor workspace = workspace_arg.detach().contiguous();
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t H = weight_hh_arg.size(1), GH = G * H;
  const auto opts = input.options();
  const int64_t plane = B * H;
  const UnitBlocks blocks = make_unit_blocks(G, H, input);

  const Tensor w_ih = blocks.permute_rows(weight_ih_arg.detach()).contiguous();
  const Tensor w_hh = blocks.permute_rows(weight_hh_arg.detach()).contiguous();
  const Tensor grad_y = grad_output.detach().contiguous();
  std::vector<Tensor> init;
  for (const auto& s : initial_states) init.push_back(s.detach().contiguous());
  // Carried state gradients, updated in place step by step (they end as the initial states' gradients).
  std::vector<Tensor> dstate;
  for (const auto& g : grad_final_states) dstate.push_back(g.detach().contiguous().clone());
  // With several blocks, each block's share of dh_{t-1} = dgh_t @ W_hh goes to its own buffer and the
  // blocks add them up (in block order: deterministic) at the next step.
  const bool packed = uses_packed_gemm(input);
  const bool shares = packed || blocks.count() > 1;
  std::vector<Tensor> dh_share, dh_share_next, w_hh_block;
  std::vector<cpu::PackedMatrix> w_hh_packed(packed ? blocks.count() : 0);
  for (int64_t c = 0; c < blocks.count(); ++c) {
    w_hh_block.push_back(w_hh.narrow(0, blocks.row0(c), blocks.rows(c)));
    if (shares) {
      dh_share.push_back(at::zeros({B, H}, opts));
      dh_share_next.push_back(at::empty({B, H}, opts));
    }
    if (packed) {
      // share_c = dgh_c @ W_c: M = W_c^T (H x rows(c)).
      cpu::pack_matrix(ptr<float>(w_hh) + blocks.row0(c) * H, H, blocks.rows(c), 1, H, w_hh_packed[c]);
    }
  }

  const std::optional<at::ThreadLocalState> caller_state =
      packed ? std::nullopt : std::optional<at::ThreadLocalState>(std::in_place);
  // Gradients of the pre-activations, rows in block order.
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
      for_each_block(blocks, caller_state, [&](int64_t c) {
        const int64_t j0 = blocks.first(c), j1 = j0 + blocks.width(c);
        if (shares) {
          // dh_t of this block's units: its direct part plus every block's share from step t+1.
          if constexpr (kCpuType<T_>) {
            T_* dh = ptr<T_>(dstate[0]);
            for (const auto& share : dh_share) {
              const T_* add = ptr<T_>(share);
              for (int64_t b = 0; b < B; ++b) {
                for (int64_t j = j0; j < j1; ++j) dh[b * H + j] += add[b * H + j];
              }
            }
          }
        }
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
        args.dxg = gate_view<T_>(ptr<T_>(dgx) + t * B * GH, GH, blocks, c);
        args.dhg = gate_view<T_>(ptr<T_>(dgh) + t * B * GH, GH, blocks, c);
        args.batch = B;
        args.hidden = H;
        args.unit_begin = j0;
        args.unit_end = j1;
        run_pointwise_block<Cell>(input, args);
        if (packed) {
          cpu::gemm_packed_fn()(ptr<float>(dgh) + t * B * GH + blocks.row0(c), B, GH, w_hh_packed[c], nullptr,
                                ptr<float>(dh_share_next[c]), H);
          return;
        }
        const Tensor dgh_block = dgh.select(0, t).narrow(1, blocks.row0(c), blocks.rows(c));
        if (shares) {
          at::mm_out(dh_share_next[c], dgh_block, w_hh_block[c]);
        } else {
          dstate[0].addmm_(dgh_block, w_hh_block[c]);  // dh_{t-1} = direct part + dgh_t @ W_hh
        }
      });
      std::swap(dh_share, dh_share_next);
    }
  });
  for (const auto& share : dh_share) dstate[0].add_(share);

  RecurrentBackward result;
  const Tensor dgx_flat = dgx.view({T * B, GH});
  const Tensor dgh_flat = dgh.view({T * B, GH});
  result.grad_input = dgx_flat.mm(w_ih).view({T, B, I});
  result.grad_weight_ih = blocks.unpermute_rows(dgx_flat.t().mm(input.contiguous().view({T * B, I})));
  // dW_hh = sum_t dgh_t^T h_{t-1}: the step that read h_0 and the others (which read the outputs).
  if (T == 0) {
    result.grad_weight_hh = at::zeros_like(weight_hh_arg);
  } else {
    const int64_t first = order.time(0);
    Tensor grad_w_hh = dgh.select(0, first).t().mm(init[0]);
    if (T > 1) {
      const Tensor later = reverse ? dgh.narrow(0, 0, T - 1) : dgh.narrow(0, 1, T - 1);
      const Tensor read = reverse ? output.narrow(0, 1, T - 1) : output.narrow(0, 0, T - 1);
      grad_w_hh.addmm_(later.reshape({(T - 1) * B, GH}).t(), read.reshape({(T - 1) * B, H}));
    }
    result.grad_weight_hh = blocks.unpermute_rows(grad_w_hh);
  }
  result.grad_bias_ih = blocks.unpermute_rows(dgx_flat.sum(0));
  result.grad_bias_hh =
      Cell::kSeparateHiddenGrad ? blocks.unpermute_rows(dgh_flat.sum(0)) : result.grad_bias_ih.clone();
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
