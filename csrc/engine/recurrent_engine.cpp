#include "engine/recurrent_engine.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cells/all_cells.h"
#include "engine/cpu/attention_cpu.h"
#include "engine/cpu/packed_gemm.h"
#include "engine/cpu/packed_gemm_bf16.h"
#include "engine/cpu/panel_matrix.h"
#include "engine/cpu/pointwise_cpu.h"
#include "engine/attention_step.h"
#include "engine/projection_step.h"
#include "engine/reused_memory.h"
#include "engine/scratch.h"
#include "engine/step_args.h"
#include "engine/thread_team.h"
#include "engine/unit_blocks.h"

#ifdef RNNATTN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "engine/cuda/attention_cuda.h"
#include "engine/cuda/cublas_multiply.h"
#include "engine/cuda/persistent_cuda.h"
#include "engine/cuda/pointwise_cuda.h"
#include "engine/cuda/projection_cuda.h"
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

#ifdef RNNATTN_WITH_CUDA
// Raises for a failed launch of one of our kernels. A GPU the build has no code for is named, with its
// compute capability and the architectures built, instead of "no kernel image is available".
void check_launch(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    int device = 0;
    cudaDeviceProp prop{};
    if (cudaGetDevice(&device) == cudaSuccess && cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
      TORCH_CHECK(false, "rnnattn: this build has no CUDA code for ", prop.name, " (cuda:", device,
                  ", compute capability ", prop.major, ".", prop.minor, "); it was built for the architectures ",
                  RNNATTN_CUDA_ARCHS, ". Rebuild with RNNATTN_CUDA_ARCHS=\"", prop.major, prop.minor,
                  "\" (see README, build options); `python -m rnnattn_ext.info` shows what each GPU can run");
    }
  }
  TORCH_CHECK(false, "rnnattn: ", what, " failed: ", cudaGetErrorString(err));
}
#endif

// Batches up to this size are meant to run CUDA's time loops (forward and backward) as one
// persistent kernel each: a step's product of a few rows is too small to fill the GPU as a cuBLAS
// call, and the launches of a step cost more than its work. Larger batches fill it (the bound is a
// guess until measured on a GPU: the persistent kernels' products are plain ones).
constexpr int64_t kPersistentMaxBatch = 128;
// Whether auto picks them. Not yet: they have never run on a GPU (their blocks' phases are checked
// on the host, tests/test_persistent_loop.py), and until scripts/cuda_checks.sh passes on one, a
// CUDA user's default stays the loop step by step, which has. Their tests force them.
constexpr bool kAutoPicksPersistent = false;

// CUDA's time loop: RNNATTN_CUDA_LOOP=persistent or per_step forces one (for measurements and
// tests: a forced persistent loop the device cannot hold raises); unset or auto decides by the batch
// (kAutoPicksPersistent) and falls back to the loop step by step where the device cannot hold the
// persistent one.
enum class CudaLoop { per_step, persistent_where_possible, persistent };
CudaLoop cuda_loop(int64_t batch) {
  const char* choice = std::getenv("RNNATTN_CUDA_LOOP");
  const std::string_view loop = choice == nullptr ? "auto" : choice;
  TORCH_CHECK(loop == "auto" || loop == "persistent" || loop == "per_step",
              "rnnattn: the environment variable RNNATTN_CUDA_LOOP must be auto, persistent or per_step, got '",
              loop, "'");
  if (loop == "persistent") return CudaLoop::persistent;
  return loop == "auto" && kAutoPicksPersistent && batch <= kPersistentMaxBatch ? CudaLoop::persistent_where_possible
                                                                                : CudaLoop::per_step;
}

// The loop a call tries: the persistent ones cover layers without attention or projection.
CudaLoop cuda_loop(const at::Tensor& input, bool attention_or_projection, int64_t steps, int64_t batch) {
  if (!input.is_cuda()) return CudaLoop::per_step;
  const CudaLoop choice = cuda_loop(batch);  // checks the variable on every CUDA call
  return attention_or_projection || steps == 0 || batch == 0 ? CudaLoop::per_step : choice;
}

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
  check_launch(err, "pointwise kernel");
#else
  TORCH_CHECK(false, "rnnattn: built without CUDA, cannot run on ", like.device());
#endif
}

// A fresh tensor for an op's output: on the CPU made without a dispatcher call (a one-step call makes
// five or more; through the dispatcher they cost about a tenth of an LSTM(8) step), a large one in
// memory an earlier call freed (reused_memory.h: no page faults per call).
Tensor fresh_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? reused_cpu_empty(sizes, options.dtype().toScalarType())
                                   : at::empty(sizes, options);
}

// A fresh (rows, cols) copy of plane `index` of the contiguous t, read as planes of rows * cols
// elements (the final states: an op's outputs must not alias each other). On the CPU a memcpy: a
// select and a clone are two dispatcher calls, a noticeable part of a one-step call.
Tensor plane_copy(const Tensor& t, int64_t index, int64_t rows, int64_t cols) {
  const int64_t size = rows * cols;
  if (!t.is_cpu()) return t.view({-1}).narrow(0, index * size, size).view({rows, cols}).clone();
  Tensor copy = fresh_empty({rows, cols}, t.options());
  const int64_t bytes = size * static_cast<int64_t>(t.element_size());
  // (An empty tensor's data pointer may be null, which memcpy must never get, even for no bytes.)
  if (bytes > 0) std::memcpy(copy.data_ptr(), static_cast<const char*>(t.const_data_ptr()) + index * bytes, bytes);
  return copy;
}

// A slot store's keys or values, (B, slots, D) contiguous from element `offset` of `flat`.
struct SlotPlane {
  Tensor flat;
  int64_t offset, batch, slots, width;
  Tensor view() const {
    return flat.as_strided({batch, slots, width}, {slots * width, width, 1}, flat.storage_offset() + offset);
  }
};

// `carried` (n, B, D), the slot-major layout in which the ops take past slots, copied into slots
// [first, first + n) of every row of `plane`. On the CPU a memcpy per slot and row: views and a copy
// through ATen are five dispatcher calls, a noticeable part of a short call.
void copy_slots(const SlotPlane& plane, int64_t first, const Tensor& carried) {
  const int64_t n = carried.size(0), B = plane.batch, D = plane.width;
  if (!plane.flat.is_cpu() || carried.scalar_type() != plane.flat.scalar_type()) {
    plane.view().narrow(1, first, n).copy_(carried.transpose(0, 1));
    return;
  }
  const Tensor source = carried.contiguous();
  const int64_t bytes = D * static_cast<int64_t>(plane.flat.element_size());
  char* base = static_cast<char*>(plane.flat.data_ptr()) + plane.offset * plane.flat.element_size();
  const char* own = static_cast<const char*>(source.const_data_ptr());
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(base + ((b * plane.slots) + first + j) * bytes, own + (j * B + b) * bytes, bytes);
    }
  }
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

// float on the CPU multiplies with the packed kernel (csrc/engine/cpu/packed_gemm.h); other dtypes
// and CUDA go through ATen (MKL / cuBLAS).
bool uses_packed_gemm(const Tensor& like) { return like.is_cpu() && like.scalar_type() == at::kFloat; }

template <typename T>
GateView<T> gate_view(T* base, int64_t row_stride, const UnitBlocks& blocks, int64_t c) {
  return GateView<T>{base + blocks.row0(c), row_stride, blocks.width(c)};
}

// t's rows permuted by `order` (undefined: t's own order), made in the call's scratch: a fresh
// multi-MiB tensor is page-faulted on every call (LSTM(256) at batch 1, T=256: forward+backward
// 8.4 ms with fresh weight copies and gradient accumulators, 7.0 with them in the scratch).
Tensor rows_in_order(const Tensor& t, const Tensor& order, CallScratch& temp) {
  if (!order.defined()) return t.contiguous();
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[0] = order.numel();
  Tensor out = temp.empty(sizes);
  return at::index_select_out(out, t, 0, order);
}

// A zeroed gradient whose rows are in `order`: in the call's scratch when they are permuted (the
// result is a fresh tensor in torch.nn order, made from it after the loop), else itself the result.
Tensor block_order_zeros(at::IntArrayRef sizes, const Tensor& order, CallScratch& temp) {
  return order.defined() ? temp.zeros(sizes) : at::zeros(sizes, temp.options());
}

// Steps per chunk of the CPU time loop's large GEMMs, whose operands stay in one reused buffer of
// budget_bytes: the forward's input projection (a few MiB, so that the loop reads it from cache) and
// the backward's dx/dW/db GEMMs (larger: their efficiency grows with the chunk). A buffer for every
// step at once would be T*B*G*H fresh, page-faulted memory read back from DRAM. CUDA uses one chunk.
int64_t chunk_steps(const Tensor& like, int64_t steps, int64_t batch, int64_t row_width, int64_t budget_bytes) {
  if (!like.is_cpu() || steps == 0) return std::max<int64_t>(1, steps);
  constexpr int64_t kMinRows = 64;
  const int64_t step_bytes = std::max<int64_t>(1, batch * row_width * like.element_size());
  const int64_t by_budget = budget_bytes / step_bytes;
  const int64_t by_rows = (kMinRows + batch - 1) / std::max<int64_t>(1, batch);
  return std::clamp<int64_t>(std::max(by_budget, by_rows), 1, steps);
}
constexpr int64_t kForwardChunkBytes = 2 << 20, kBackwardChunkBytes = 8 << 20;

// How a block's constant matrix enters its products: through ATen (double, CUDA), packed into panels
// for our CPU kernel (float, used many times), or read in place by our CPU kernel (float, used
// a few times at a few rows: a streaming step or short chunk, where packing would cost more than
// it saves).
enum class MatrixForm { aten, packed, packed_bf16, in_place };

// A float CPU matrix used at most this many times at a few rows is read in place: packing it once
// costs about as much as reading it in place three or four times when it does not fit the core's
// cache (a streaming chunk of 2-4 steps of LSTM(256) at batch 1-4 took 30-50 µs less in place).
constexpr int64_t kInPlaceMaxUses = 4;

// The backward's products by a transposed matrix take its columns as they are (cpu::ColumnsMatrix)
// instead of packing them all first, in a float call of at most this many rows, T x B: the chunk's
// W_ih^T (dx), x^T and h_{t-1}^T (dW), which each member then reads through its own tables (no
// packing shared out, so no meeting after it); and in a call of at most kInPlaceMaxUses steps, the
// per-step products' W_rec^T (dh) and W_c^T. The sums are the packed ones bit for bit. A one-step
// backward's op took 15-25% less (RNN, GRU, LSTM(256) at batch 1 and 16; Zen 4).
constexpr int64_t kInPlaceBulkRows = 64;

// The form of a float CPU matrix used `uses` times at `rows` rows each (ATen for the rest); packed
// in bfloat16 for a bfloat16 layer's products (cpu/packed_gemm_bf16.h). Read in place, it stays
// float: a streaming step's products are few, and packing costs more than they would save.
MatrixForm matrix_form(bool packed_gemm, int64_t uses, int64_t rows, bool bf16_products = false) {
  if (!packed_gemm) return MatrixForm::aten;
  if (uses <= kInPlaceMaxUses && rows <= cpu::kRowsGemmMaxRows) return MatrixForm::in_place;
  return bf16_products ? MatrixForm::packed_bf16 : MatrixForm::packed;
}

// A single block's input projection goes to ATen, which spreads it over every thread, from this many
// multiply-adds per product up: below it ATen's call (~10 µs on a 2-core x86) costs more than our
// kernel on one thread (a 5-step chunk of LSTM(8) took 30 µs longer through ATen).
constexpr int64_t kAtenMinMultiplies = int64_t{1} << 19;

// Split by units, the forward's threads meet at the end of every step, and one that finishes first
// spins until the other does: from this batch up a step's input projection runs as fast a step at a
// time as a chunk at a time (the product has enough rows), and each thread projects its next step's
// input while it waits (TeamBarrier::arrive, wait_for). On a 2-core x86 (LSTM and GRU(256), T=128) the
// forward took 10-20% longer so at batch 2, as long at 4 and 8, and 5-8% less at 16 and 64.
constexpr int64_t kOverlapMinRows = 16;

// The row addresses (and the gathered bias) of our CPU kernels' forms: rows [first, first + count)
// of `parts` stacked, permuted by `index` (or none). Filled by the block's own thread.
struct RowTable {
  // One part (a tensor) of M: its rows, row stride, data and bias (or none).
  struct Part {
    int64_t size = 0, stride = 0;
    const float* data = nullptr;
    const float* bias = nullptr;
    int64_t bias_stride = 0;
  };
  static constexpr size_t kMaxParts = 4;  // W_hh, W_q, W_k, W_v
  std::array<Part, kMaxParts> parts{};
  size_t part_count = 0;
  int64_t total = 0;  // rows of M
  const int64_t* index = nullptr;
  int64_t first = 0, count = 0;
  const float** addresses = nullptr;
  float* bias = nullptr;  // where the bias is gathered, or null: none or read in place
  // One bfloat16 or float16 part read in place (its data here, not in parts[0].data): its rows'
  // addresses.
  const uint16_t* half_data = nullptr;
  const uint16_t** half_addresses = nullptr;

  void fill() const {
    if (half_data != nullptr) {
      fill_one_part(half_data, half_addresses);  // a 16-bit weight is always a matrix's one part
      return;
    }
    if (part_count == 1) {
      fill_one_part(parts[0].data, addresses);
      return;
    }
    // Rows found part by part, and the bias gathered into M's row order (a block's few hundred values).
    for (int64_t i = 0; i < count; ++i) {
      int64_t r = index == nullptr ? first + i : index[i];  // row of M, then of its part
      TORCH_INTERNAL_ASSERT(r >= 0 && r < total, "rnnattn: a row order names a row outside the matrix");
      const Part* part = parts.data();
      while (r >= part->size) r -= (part++)->size;
      addresses[i] = part->data + r * part->stride;
      if (bias != nullptr) bias[i] = part->bias != nullptr ? part->bias[r * part->bias_stride] : 0.f;
    }
  }

  // One tensor (its rows at data, float or 16-bit): tight loops (a one-step call makes the addresses
  // of a few thousand rows, and its whole op call is ~100k instructions).
  template <typename T>
  void fill_one_part(const T* data, const T** out) const {
    const Part& only = parts[0];
    if (index == nullptr) {
      const T* row = data + first * only.stride;  // in range: block_matrix checked
      for (int64_t i = 0; i < count; ++i, row += only.stride) out[i] = row;
    } else {
      bool out_of_range = false;  // checked once, after the loop: a branch per row costs as much as the row
      for (int64_t i = 0; i < count; ++i) {
        out_of_range |= index[i] < 0 || index[i] >= total;
        out[i] = data + index[i] * only.stride;
      }
      TORCH_INTERNAL_ASSERT(!out_of_range, "rnnattn: a row order names a row outside the matrix");
    }
    if (bias != nullptr) {
      const int64_t step = only.bias_stride;  // rows checked above
      if (index == nullptr) {
        for (int64_t i = 0; i < count; ++i) bias[i] = only.bias[(first + i) * step];
      } else {
        for (int64_t i = 0; i < count; ++i) bias[i] = only.bias[index[i] * step];
      }
    }
  }
};

// One block's constant right-hand side M (n x k) of the per-step products out = a @ M^T (+ bias).
// Our CPU kernels' forms are made ready by prepare(), which the block's own thread calls inside the
// team: the row table is filled (and the packed form packed) in parallel, and the panels land in
// that core's cache.
struct BlockMatrix {
  MatrixForm form = MatrixForm::aten;
  int64_t n = 0;  // rows of M
  // Our CPU kernels' forms (packed, in place) read the caller's tensors through raw pointers: row i
  // of M at rows[i], its elements stride_k apart; the bias of row i at bias[i] (or none).
  const float* const* rows = nullptr;
  // in_place from a bfloat16 or float16 weight: its rows instead, and which of the two.
  const uint16_t* const* half_rows = nullptr;
  cpu::Float16Kind half_kind = cpu::Float16Kind::bfloat16;
  int64_t k = 0, stride_k = 1;
  RowTable table;                      // fills rows (and bias, when gathered)
  // Packed from columns instead (transposed_block_matrix): the table's rows are M's k columns; or,
  // with columns_in_place, those columns read where they are (float; no storage).
  bool from_columns = false, columns_in_place = false;
  float* storage = nullptr;            // packed, packed_bf16: room for the panels
  cpu::PanelMatrix panels;             // packed, packed_bf16: after prepare()
  const float* bias = nullptr;
  // ATen's form (double, CUDA): M^T (k x n) and the bias (n) or undefined.
  Tensor transposed;
  Tensor aten_bias;

  void prepare() {
    if (form == MatrixForm::aten) return;
    table.fill();
    if (!is_packed()) return;
    const bool bf16 = form == MatrixForm::packed_bf16;
    if (columns_in_place) {
      panels = cpu::columns_in_place(rows, n, k);
    } else if (from_columns) {
      panels = cpu::pack_columns(bf16, rows, n, k, storage, 0, cpu::panel_count(n));
    } else {
      panels = cpu::pack_matrix(bf16, rows, n, k, stride_k, storage);
    }
  }
  bool is_packed() const { return form == MatrixForm::packed || form == MatrixForm::packed_bf16; }
};

// Rows [first, first + count) of M permuted by `order` (unit_blocks.h; undefined: M's own order),
// and likewise of its bias. M is `parts` stacked (each with M's columns): one tensor for most
// matrices, W_hh, W_q[, W_k, W_v] for the attention cell's recurrent side. `biases` is empty (no
// bias) or one per part (an absent one reads as zeros).
struct PermutedRows {
  c10::ArrayRef<Tensor> parts;
  c10::ArrayRef<std::optional<Tensor>> biases;
  const Tensor& order;
  int64_t first, count;
};

// The parts stacked into one tensor, and their biases (absent ones as zeros) or none.
Tensor stacked(c10::ArrayRef<Tensor> parts) { return parts.size() == 1 ? parts[0] : at::cat(parts, 0); }
std::optional<Tensor> stacked_bias(c10::ArrayRef<Tensor> parts, c10::ArrayRef<std::optional<Tensor>> biases) {
  if (biases.empty()) return std::nullopt;
  if (biases.size() == 1) return biases[0];
  bool any = false;
  std::vector<Tensor> pieces;
  for (size_t i = 0; i < parts.size(); ++i) {
    any = any || biases[i].has_value();
    pieces.push_back(biases[i] ? *biases[i] : at::zeros({parts[i].size(0)}, parts[i].options()));
  }
  return any ? std::optional<Tensor>(at::cat(pieces, 0)) : std::nullopt;
}

// The block's rows of a weight in block order. Our kernels read them, and the bias, through a table
// of row addresses into the caller's tensors: no permuted or stacked copy and no view is made (each
// costs a dispatcher call, which matters to short calls such as one streaming step, and a stacked
// copy of the attention cell's weights costs as much as its streaming step).
BlockMatrix block_matrix(const PermutedRows& rows, MatrixForm form, CallScratch& scratch) {
  BlockMatrix result;
  const Tensor& first_part = rows.parts[0];
  result.n = rows.count;
  // Reading in place needs contiguous rows; a strided weight is packed instead.
  bool unit_stride = true;
  for (const Tensor& part : rows.parts) unit_stride = unit_stride && part.stride(1) == 1;
  result.form = form == MatrixForm::in_place && !unit_stride ? MatrixForm::packed : form;
  if (result.form == MatrixForm::aten) {
    const Tensor m = stacked(rows.parts);
    const std::optional<Tensor> bias = stacked_bias(rows.parts, rows.biases);
    const bool whole = !rows.order.defined() && rows.first == 0 && rows.count == m.size(0);
    const Tensor pick = rows.order.defined() ? rows.order.narrow(0, rows.first, rows.count) : Tensor();
    auto select = [&](const Tensor& t) {
      return whole ? t : pick.defined() ? t.index_select(0, pick) : t.narrow(0, rows.first, rows.count);
    };
    result.transposed = select(m).t();
    if (bias) result.aten_bias = select(*bias).contiguous();
    return result;
  }
  // Several parts share one column stride (the engine gives them unit strides).
  TORCH_INTERNAL_ASSERT(rows.parts.size() == 1 || unit_stride);
  TORCH_INTERNAL_ASSERT(rows.parts.size() <= RowTable::kMaxParts);
  result.k = first_part.size(1);
  result.stride_k = first_part.stride(1);
  // Each part's rows, row stride and bias, read once here (a tensor's accessors check on every call).
  RowTable& table = result.table;
  table.part_count = rows.parts.size();
  bool any_bias = false;
  for (size_t p = 0; p < rows.parts.size(); ++p) {
    const Tensor& t = rows.parts[p];
    table.total += t.size(0);
    const std::optional<Tensor>* b = rows.biases.empty() ? nullptr : &rows.biases[p];
    const bool has_bias = b != nullptr && b->has_value();
    any_bias = any_bias || has_bias;
    const bool half = t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
    // A 16-bit weight only as the one part of a matrix read in place (forward_loop's weight_in_form).
    TORCH_INTERNAL_ASSERT(!half || (result.form == MatrixForm::in_place && rows.parts.size() == 1));
    if (half) {
      table.half_data = static_cast<const uint16_t*>(t.const_data_ptr());
      result.half_kind = t.scalar_type() == at::kHalf ? cpu::Float16Kind::float16 : cpu::Float16Kind::bfloat16;
    }
    table.parts[p] = {t.size(0), t.stride(0), half ? nullptr : t.const_data_ptr<float>(),
                      has_bias ? (*b)->const_data_ptr<float>() : nullptr, has_bias ? (*b)->stride(0) : 0};
  }
  table.index = rows.order.defined() ? rows.order.const_data_ptr<int64_t>() + rows.first : nullptr;
  TORCH_INTERNAL_ASSERT(table.index != nullptr || (rows.first >= 0 && rows.first + rows.count <= table.total));
  table.first = rows.first;
  table.count = rows.count;
  if (table.half_data != nullptr) {
    table.half_addresses = scratch.row_addresses<uint16_t>(rows.count);
    result.half_rows = table.half_addresses;
  } else {
    table.addresses = scratch.row_addresses(rows.count);
    result.rows = table.addresses;
  }
  const RowTable::Part& only = table.parts[0];
  if (!any_bias) {
    result.bias = nullptr;
  } else if (table.part_count == 1 && table.index == nullptr && only.bias_stride == 1) {
    result.bias = only.bias + rows.first;  // read in place
  } else {
    table.bias = scratch.floats(rows.count);
    result.bias = table.bias;
  }
  if (result.is_packed()) {
    result.storage =
        scratch.floats(cpu::PanelMatrix::floats_needed(result.form == MatrixForm::packed_bf16, rows.count, result.k));
  }
  return result;
}

// M = the transpose of the permuted rows (n = the parts' columns, k = rows.count), as in the
// backward's dh = dg W_hh (M = W_hh^T): the rows are M's columns, so it packs them from the caller's
// tensors (rows contiguous; no bias) without a permuted copy or a strided gather, in bfloat16 pairs
// with bf16 (a bfloat16 layer's products); or, with in_place (float), reads them there.
BlockMatrix transposed_block_matrix(const PermutedRows& rows, bool bf16, bool in_place, CallScratch& scratch) {
  for (const Tensor& part : rows.parts) TORCH_INTERNAL_ASSERT(part.stride(1) == 1);
  TORCH_INTERNAL_ASSERT(rows.biases.empty() && !(bf16 && in_place));
  BlockMatrix result = block_matrix(rows, MatrixForm::in_place, scratch);  // the table of rows, no storage
  result.form = bf16 ? MatrixForm::packed_bf16 : MatrixForm::packed;
  result.from_columns = true;
  result.columns_in_place = in_place;
  result.n = rows.parts[0].size(1);
  result.k = rows.count;
  if (!in_place) result.storage = scratch.floats(cpu::PanelMatrix::floats_needed(bf16, result.n, result.k));
  return result;
}

// The backward's large products of a chunk in our CPU kernel (float; bfloat16 products for a
// bfloat16 layer): where their operands go.
struct BulkProducts {
  bool enabled = false;
  bool bf16 = false;                        // the matrices packed in bfloat16 pairs
  bool in_place = false;                    // float matrices read in place by columns, not packed
  int64_t ld = 0;                           // row stride of `transposed`
  cpu::PanelMatrix w_ih_t;                  // dx's M = W_ih^T (I x GH, columns in block order)
  const float* const* w_ih_rows = nullptr;  // its columns: W_ih's rows
  // Where each chunk's matrices are packed (none in place):
  float* x_panels = nullptr;                // dW_ih's M = the chunk's x^T (I x rows)
  float* h_panels = nullptr;                // dW_rec's M = the chunk's h_{t-1}^T (HS x rows)
  float* context_panels = nullptr;          // attention: dW_c's M = the chunk's context^T (D x rows)
  std::vector<const float**> x_rows, h_rows, context_rows;  // per member: the chunk's rows of each
  std::vector<float*> transposed;  // per member: a = a block's gate-gradient columns, transposed
};

// Room for chunks of `rows` rows (chunk steps x B), for `members` threads; W_ih's rows (contiguous)
// taken in block order; D the attention's context width (0: none); bf16: the products in bfloat16;
// in_place: the float matrices read in place by columns.
BulkProducts bulk_products(int64_t members, const UnitBlocks& blocks, int64_t rows, int64_t I, int64_t HS, int64_t D,
                           const Tensor& weight_ih, bool bf16, bool in_place, CallScratch& temp) {
  TORCH_INTERNAL_ASSERT(!(bf16 && in_place));
  BulkProducts bulk;
  bulk.enabled = true;
  bulk.bf16 = bf16;
  bulk.in_place = in_place;
  bulk.ld = cpu::spaced_stride(rows);
  const int64_t GH = weight_ih.size(0);
  auto room = [&](int64_t n, int64_t k) { return temp.floats(cpu::PanelMatrix::floats_needed(bf16, n, k)); };
  // W_ih^T's columns, W_ih's rows in block order, through the row table the other matrices use.
  BlockMatrix columns = block_matrix(PermutedRows{weight_ih, {}, blocks.order, 0, GH}, MatrixForm::in_place, temp);
  columns.table.fill();
  bulk.w_ih_rows = columns.rows;
  if (in_place) {
    bulk.w_ih_t = cpu::columns_in_place(bulk.w_ih_rows, I, GH);
  } else {
    bulk.w_ih_t = cpu::PanelMatrix::room(bf16, I, GH, room(I, GH));
    bulk.x_panels = room(I, rows);
    bulk.h_panels = room(HS, rows);
    if (D > 0) bulk.context_panels = room(D, rows);
  }
  int64_t widest = 0;  // the most gate-gradient columns a block has
  for (int64_t u = 0; u < blocks.count(); ++u) widest = std::max({widest, blocks.rows(u), blocks.rec_rows(u)});
  for (int64_t m = 0; m < members; ++m) {
    bulk.x_rows.push_back(temp.row_addresses(rows));
    bulk.h_rows.push_back(temp.row_addresses(rows));
    if (D > 0) bulk.context_rows.push_back(temp.row_addresses(rows));
    bulk.transposed.push_back(temp.floats(widest * bulk.ld));
  }
  return bulk;
}

// A one-part matrix's bias as PermutedRows::biases.
c10::ArrayRef<std::optional<Tensor>> bias_list(const std::optional<Tensor>& bias) {
  return bias ? c10::ArrayRef<std::optional<Tensor>>(bias) : c10::ArrayRef<std::optional<Tensor>>();
}

// All of M's rows, in its own order.
BlockMatrix block_matrix(const Tensor& m, const std::optional<Tensor>& bias, MatrixForm form, CallScratch& scratch) {
  const Tensor own_order;
  return block_matrix(PermutedRows{m, bias_list(bias), own_order, 0, m.size(0)}, form, scratch);
}

#ifdef RNNATTN_WITH_CUDA
// out = a @ M^T (or += with accumulate) as one direct cuBLAS call (cuda/cublas_multiply.h), for a
// product without bias on the GPU. False if neither M's rows nor its columns are contiguous (ATen
// then does it).
bool cuda_multiply(const BlockMatrix& m, const Operand& a, const Operand& out, bool accumulate) {
  const Tensor& mt = m.transposed;  // M^T: k x n, column j = row j of M
  const int64_t k = mt.size(0), n = mt.size(1);
  const bool by_rows = mt.stride(0) == 1 && mt.stride(1) >= k;     // the forward's weights
  const bool by_columns = mt.stride(1) == 1 && mt.stride(0) >= n;  // the backward's (M = W^T)
  if (m.aten_bias.defined() || k == 0 || !(by_rows || by_columns)) return false;
  if (a.rows == 0 || n == 0) return true;
  cuda::multiply_nt(mt.scalar_type(), a.rows, n, k, a.address(), a.ld, mt.const_data_ptr(),
                    by_rows ? mt.stride(1) : mt.stride(0), by_rows, accumulate, out.address(), out.ld);
  return true;
}
#endif

// A one-step call at batch 1 reads each thread's rows of W_ih and W_hh in place once: an LSTM(256)'s
// on two threads 1 MiB a thread, its core's whole L2, so that reading them in the same order every
// step found the first rows evicted by the last ones each time. Every other call of a thread's block
// reads them the other way round (W_hh from its last row, then W_ih from its last), starting with the
// rows the call before read last. True when this thread's next reading of the block whose first row
// is at `first_row` goes last first; it flips the answer for the next call. Per thread, by the
// block's address: a streamer's or a module's weights stay where they are from one step to the next.
bool read_last_first(const void* first_row) {
  constexpr size_t kBlocksRemembered = 16;  // layers and directions of a stack
  thread_local std::array<std::pair<const void*, bool>, kBlocksRemembered> recent{};
  thread_local size_t next_slot = 0;
  for (auto& [address, last_first] : recent) {
    if (address == first_row) {
      last_first = !last_first;
      return !last_first;
    }
  }
  recent[next_slot] = {first_row, true};  // this call reads first to last; the next the other way
  next_slot = (next_slot + 1) % kBlocksRemembered;
  return false;
}

// out = a @ M^T (+ bias), or out += a @ M^T with accumulate (not for M read in place). M read in
// place at one row of a may read its rows last first (cpu::RowsMatrix).
void multiply(const BlockMatrix& m, const Operand& a, const Operand& out, bool accumulate = false,
              bool last_first = false) {
  if (m.is_packed()) {
    m.panels.multiply(a.data<float>(), a.rows, a.ld, m.bias, out.data<float>(), out.ld, accumulate);
    return;
  }
  if (m.form == MatrixForm::in_place) {
    TORCH_INTERNAL_ASSERT(!accumulate);
    if (m.half_rows != nullptr) {
      const cpu::Rows16Matrix rows{m.half_rows, m.n, m.k, m.half_kind, last_first};
      cpu::gemm_rows_16_fn()(a.data<float>(), a.rows, a.ld, rows, m.bias, out.data<float>(), out.ld);
      return;
    }
    const cpu::RowsMatrix rows{m.rows, m.n, m.k, last_first};
    cpu::gemm_rows_fn()(a.data<float>(), a.rows, a.ld, rows, m.bias, out.data<float>(), out.ld);
    return;
  }
#ifdef RNNATTN_WITH_CUDA
  if (out.base.is_cuda() && cuda_multiply(m, a, out, accumulate)) return;
#endif
  Tensor result = out.view();
  if (accumulate) {
    result.addmm_(a.view(), m.transposed);
  } else if (m.aten_bias.defined()) {
    at::addmm_out(result, m.aten_bias, a.view(), m.transposed);
  } else {
    at::mm_out(result, a.view(), m.transposed);
  }
}

// The attention stage for the heads the arguments name, every batch row, on the tensors' device.
template <bool kBackward, typename T>
void run_attention(const Tensor& like, const AttentionStepArgs<T>& args) {
  if (like.is_cpu()) {
    if constexpr (std::is_same_v<T, float>) {  // cpu/attention_cpu.h
      if (cpu::vector_attention_applies(args)) {
        (kBackward ? cpu::attention_backward_fn() : cpu::attention_forward_fn())(args);
        return;
      }
    }
    if constexpr (kCpuType<T>) {
      if constexpr (kBackward) {
        attention_backward_pairs(args);
      } else {
        attention_forward_pairs(args);
      }
      return;
    }
    TORCH_CHECK_TYPE(false, "rnnattn: dtype ", like.scalar_type(), " is not supported on the CPU");
  }
#ifdef RNNATTN_WITH_CUDA
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = kBackward ? cuda::launch_attention_backward(args, stream)
                                    : cuda::launch_attention_forward(args, stream);
  check_launch(err, "attention kernel");
#else
  TORCH_CHECK(false, "rnnattn: built without CUDA, cannot run on ", like.device());
#endif
}

// A per-row pass of the projection (projection_step.h) over its columns, on the tensors' device.
template <template <typename> class Args, typename T>
void run_projection_pass(const Tensor& like, const Args<T>& args) {
  if (like.is_cpu()) {
    if constexpr (kCpuType<T>) {
      for (int64_t b = 0; b < args.batch; ++b) {
        for (int64_t p = args.col_begin; p < args.col_end; ++p) projection_element(args, b, p);
      }
    }
    return;
  }
#ifdef RNNATTN_WITH_CUDA
  const cudaError_t err = cuda::launch_projection_pass(args, c10::cuda::getCurrentCUDAStream());
  check_launch(err, "projection kernel");
#endif
}

// Block c's share [begin, end) of `width` columns (the projection's P), in block order.
std::pair<int64_t, int64_t> column_share(const UnitBlocks& blocks, int64_t c, int64_t width) {
  return even_share(width, c, blocks.count());
}

// The attention cell's shapes and memory, as the time loop sees them.
struct AttentionGeometry {
  bool enabled = false;
  bool self_memory = true;
  int64_t width = 0, heads = 0, head_dim = 0;  // D = heads * head_dim
  int64_t past = 0;                            // self memory: slots given before the first step
  int64_t slots = 0;                           // self memory: past + T (slot past + k is h before step k); external: S
  int64_t row_slots = 0;                       // room a row of the store has: slots, or a caller's store's C
  int64_t weight_slots = 0;                    // last dimension of the returned attention weights
  int64_t read_slots = 0;                      // the most slots one step reads
  std::optional<int64_t> window;
  int64_t groups() const { return !enabled ? 0 : self_memory ? 3 : 1; }

  // The slots step k reads (self memory; external memory uses the per-row lengths).
  int64_t new_slot(int64_t k) const { return past + k; }
  int64_t first_slot(int64_t k) const { return window ? std::max<int64_t>(0, past + k + 1 - *window) : 0; }
};

AttentionGeometry attention_geometry(const AttentionConfig* attention, int64_t steps) {
  AttentionGeometry g;
  if (attention == nullptr) return g;
  g.enabled = true;
  g.self_memory = !attention->memory.has_value();
  g.width = attention->weight_q.size(0);
  g.heads = attention->num_heads;
  g.head_dim = g.width / g.heads;
  g.window = g.self_memory ? attention->window : std::nullopt;
  g.past = attention->store_keys ? attention->store_past : attention->past_keys ? attention->past_keys->size(0) : 0;
  g.slots = g.self_memory ? g.past + steps : attention->memory->size(0);
  g.row_slots = attention->store_keys ? attention->store_keys->size(1) : g.slots;
  g.weight_slots = g.self_memory ? (g.window ? *g.window : g.slots) : g.slots;
  g.read_slots = g.self_memory && g.window ? std::min(*g.window, g.slots) : g.slots;
  return g;
}

// The recurrent-side weight W_rec in parts: W_hh, then W_q, then (self memory) W_k and W_v, and
// their biases (empty when no part has one). Our CPU kernels read the parts where they are; ATen and
// cuBLAS multiply by them stacked (`stacked`).
struct RecurrentSide {
  std::vector<Tensor> weights;
  std::vector<std::optional<Tensor>> biases;
};

RecurrentSide recurrent_side(const Tensor& weight_hh, const std::optional<Tensor>& bias_hh,
                             const AttentionConfig* attention, bool self_memory) {
  RecurrentSide side{{weight_hh}, {bias_hh}};
  if (attention != nullptr) {
    side.weights.insert(side.weights.end(), {attention->weight_q});
    side.biases.insert(side.biases.end(), {attention->bias_q});
    if (self_memory) {
      side.weights.insert(side.weights.end(), {attention->weight_k, attention->weight_v});
      side.biases.insert(side.biases.end(), {attention->bias_k, attention->bias_v});
    }
    // Stacked parts share one column stride in our kernels: a rare strided part is copied.
    for (Tensor& w : side.weights) {
      if (w.stride(1) != 1) w = w.contiguous();
    }
  }
  bool any_bias = false;
  for (const auto& b : side.biases) any_bias = any_bias || b.has_value();
  if (!any_bias) side.biases.clear();
  return side;
}

// Per-slot numbers of the attention passes, in the accumulate type: 2 * read_slots per (row, head).
Tensor attention_scratch(const AttentionGeometry& g, int64_t batch, const Tensor& like) {
  if (!g.enabled) return Tensor();
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return fresh_empty({batch * g.heads * 2 * std::max<int64_t>(1, g.read_slots)}, like.options().dtype(acc));
}

// Variable lengths as the step passes see them.
struct SequenceLengths {
  const int64_t* data = nullptr;  // (B,) on the tensors' device, or nullptr
  int64_t steps = 0;
  bool reverse = false;
};

// (T, B, 1) true at the steps a row does not take (t >= lengths[b]).
Tensor padded_steps(const Tensor& lengths, int64_t steps) {
  return at::arange(steps, lengths.options()).unsqueeze(1).ge(lengths.unsqueeze(0)).unsqueeze(2);
}

// Zeroes a (T, B, W) output at the steps its rows do not take. On the CPU row by row in place (the
// mask and masked_fill cost a small layer more than a few of its steps).
void zero_padded_steps(Tensor& output, const Tensor& lengths) {
  const int64_t T = output.size(0), B = output.size(1), W = output.size(2);
  if (!output.is_cpu() || !output.is_contiguous() || !lengths.is_contiguous()) {
    output.masked_fill_(padded_steps(lengths, T), 0);
    return;
  }
  const int64_t* length = lengths.const_data_ptr<int64_t>();
  const int64_t row_bytes = W * static_cast<int64_t>(output.element_size());
  auto* base = static_cast<unsigned char*>(output.data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = length[b]; t < T; ++t) std::memset(base + (t * B + b) * row_bytes, 0, row_bytes);
  }
}

// The (T, B, W) output with h0 (B, W) at the steps its rows do not take: the states a reverse
// layer's steps started from (the forward carried h0 through a row's padded steps, then zeroed them).
// On the CPU a copy with h0's rows put back (the mask and where cost more than the copy).
Tensor with_initial_state_at_padded_steps(const Tensor& output, const Tensor& h0, const Tensor& lengths) {
  const int64_t T = output.size(0), B = output.size(1), W = output.size(2);
  if (!output.is_cpu() || h0.scalar_type() != output.scalar_type()) {
    return at::where(padded_steps(lengths, T), h0.unsqueeze(0), output).contiguous();
  }
  Tensor result = output.clone(at::MemoryFormat::Contiguous);
  const Tensor initial = h0.contiguous();
  const int64_t* length = lengths.const_data_ptr<int64_t>();
  const int64_t row_bytes = W * static_cast<int64_t>(result.element_size());
  auto* base = static_cast<unsigned char*>(result.data_ptr());
  const auto* initial_rows = static_cast<const unsigned char*>(initial.const_data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = length[b]; t < T; ++t) {
      std::memcpy(base + (t * B + b) * row_bytes, initial_rows + b * row_bytes, row_bytes);
    }
  }
  return result;
}

// Per time step, the rows the recurrent GEMM must cover: up to the last row still running (all of
// them when lengths are sorted longest first, as a PackedSequence's are), so that finished rows cost
// no GEMM work. Empty without lengths. The attention cell keeps every row: its slots and queries
// are op outputs and must be defined for every row.
std::vector<int64_t> running_rows(const Tensor& lengths, int64_t steps, bool attention) {
  if (!lengths.defined() || attention) return {};
  const Tensor host = lengths.cpu();
  const int64_t* length = host.data_ptr<int64_t>();
  std::vector<int64_t> rows(steps, 0);
  for (int64_t b = 0; b < host.numel(); ++b) {
    for (int64_t t = 0; t < length[b]; ++t) rows[t] = b + 1;
  }
  return rows;
}

// The attention stage's arguments for block c at forward step k; query: that step's queries (B, D),
// keys, values: the slot store, each (B, slots, D). A row's slots lie next to each other, so that a
// (row, head) pass reads its window in order: slot-major, one row's slots would lie B * D floats
// apart (4 KiB at B = 16, D = 64, where caches alias), which took twice as long on the CPU.
template <typename T>
AttentionStepArgs<T> attention_step_args(const AttentionGeometry& g, const UnitBlocks& blocks, int64_t c,
                                         int64_t batch, int64_t k, const Tensor& lengths, const Tensor& scratch,
                                         const SequenceLengths& sequence, T* query, T* keys, T* values) {
  AttentionStepArgs<T> a{};
  a.query = query;
  a.query_stride = g.width;
  a.keys = keys;
  a.values = values;
  a.sequence_lengths = sequence.data;
  a.steps = sequence.steps;
  a.reverse = sequence.reverse;
  a.time = sequence.reverse ? sequence.steps - 1 - k : k;
  a.scratch = scratch.data_ptr();
  a.scratch_slots = std::max<int64_t>(1, g.read_slots);
  a.slot_stride = g.width;
  a.row_stride = g.row_slots * g.width;
  a.self_memory = g.self_memory;
  a.first_slot = g.self_memory ? g.first_slot(k) : 0;
  a.end_slot = g.self_memory ? g.new_slot(k) + 1 : g.slots;
  a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  a.weight_slots = g.weight_slots;
  a.batch = batch;
  a.heads = g.heads;
  a.head_dim = g.head_dim;
  a.head_begin = blocks.head_begin[c];
  a.head_end = blocks.head_begin[c + 1];
  a.scale = 1.0 / std::sqrt(static_cast<double>(g.head_dim));
  return a;
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? ptr<T>(t) : nullptr;
}

// The forward's ForwardLayout: h (or m_t, with a projection) in slot 0, the cell's other states
// after it; `ping_pong` holds inference's two buffers per slot that is not the output, slots 1.. first.
template <class Cell, typename T>
ForwardLayout<T> forward_layout(const Tensor& output, const std::vector<Tensor>& init, const Tensor& m_initial,
                                const Tensor& workspace, const std::vector<Tensor>& ping_pong, int planes,
                                int m_plane, bool training, const StepOrder& order, int64_t plane) {
  constexpr int S = Cell::kStates;
  const bool projected = m_initial.defined();
  ForwardLayout<T> layout{};
  layout.output = ptr<T>(output);
  layout.workspace = training ? ptr<T>(workspace) : nullptr;
  layout.planes = planes;
  layout.training = training;
  layout.reverse = order.reverse;
  layout.steps = order.steps;
  layout.plane = plane;
  for (int s = 0; s < S; ++s) {
    layout.initial[s] = s == 0 && projected ? ptr<T>(m_initial) : ptr<T>(init[s]);
    layout.plane_of[s] = s > 0 ? Cell::kSaved + s - 1 : projected ? m_plane : -1;
    // Inference buffers: slot s >= 1 at 2 (s - 1), m_t after them at 2 (S - 1).
    const int buffer = s > 0 ? 2 * (s - 1) : projected ? 2 * (S - 1) : -1;
    if (!training && buffer >= 0) {
      layout.alternate[s][0] = ptr_or_null<T>(ping_pong[buffer]);
      layout.alternate[s][1] = ptr_or_null<T>(ping_pong[buffer + 1]);
    }
  }
  return layout;
}

}  // namespace

void linear_into(const Operand& input, const Tensor& weight, const std::optional<Tensor>& bias, const Operand& out) {
  TORCH_INTERNAL_ASSERT(input.rows == out.rows && input.cols == weight.size(1) && out.cols == weight.size(0));
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen form's views and product
  CallScratch scratch(input.base);
  // Packing the weight for one product would cost more than the product: a few rows or ATen.
  const bool in_place = uses_packed_gemm(input.base) && input.rows <= cpu::kRowsGemmMaxRows;
  BlockMatrix m = block_matrix(weight, bias, in_place ? MatrixForm::in_place : MatrixForm::aten, scratch);
  m.prepare();
  if (input.rows == 0) return;
  multiply(m, input, out);
}

void external_keys_values(const AttentionConfig& attention, const Tensor& keys, const Tensor& values) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // The memory's rows in store order: (B * S, M) (sizes spelled out: B or S may be 0).
  const Tensor& memory = *attention.memory;
  const int64_t rows = memory.size(0) * memory.size(1), width = keys.size(-1);
  const Tensor m = memory.transpose(0, 1).reshape({rows, memory.size(2)});
  Tensor k = keys.view({rows, width}), v = values.view({rows, width});
  const Tensor wk = attention.weight_k, wv = attention.weight_v;
  if (attention.bias_k) at::addmm_out(k, *attention.bias_k, m, wk.t()); else at::mm_out(k, m, wk.t());
  if (attention.bias_v) at::addmm_out(v, *attention.bias_v, m, wv.t()); else at::mm_out(v, m, wv.t());
}

// The forward time loop; with bf16_products (float CPU tensors of a bfloat16 layer) its packed
// products run in bfloat16. weight_ih and weight_hh may be bfloat16 or float16 (the rest float):
// each is read in place where its products read it in place, else through a float32 copy.
template <class Cell>
RecurrentForward forward_loop(const Tensor& input_arg, const std::vector<Tensor>& initial_states,
                              const Tensor& weight_ih_arg, const Tensor& weight_hh_arg,
                              const std::optional<Tensor>& bias_ih, const std::optional<Tensor>& bias_hh,
                              const std::optional<Tensor>& weight_hr, const std::optional<Tensor>& lengths_arg,
                              bool reverse, bool training, const AttentionConfig* attention, bool bf16_products) {
  constexpr int S = Cell::kStates, G = Cell::kGates;
  // Below autograd: the engine's own ATen calls record no history (so the arguments need no detach)
  // and skip the autograd and view-tracking kernels, which at one step cost about as much as the
  // call's whole set-up. Calls through the dispatcher are there already (ops/autograd_ops.cpp); the
  // guard, one thread-local write, keeps the engine correct for any other caller.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  // With a projection the cell's own output m_t is not a state: its plane follows the others. The
  // engine assumes that h reaches the next step only through the gates (true of the LSTM alone).
  const bool projected = weight_hr.has_value();
  TORCH_CHECK(!projected || std::string_view(Cell::kName) == "lstm", "rnnattn: weight_hr is for the LSTM only");
  const int planes = workspace_planes<Cell>(projected), m_plane = workspace_planes<Cell>();
#ifdef RNNATTN_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard guard(input_arg.is_cuda() ? std::optional<c10::Device>(input_arg.device())
                                                               : std::nullopt);
#endif
  const Tensor input = input_arg;
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  // H units per gate; HS the width of the state h and the output (P with a projection, else H).
  const int64_t GH = weight_hh_arg.size(0), H = GH / G, HS = weight_hh_arg.size(1);
  const auto opts = input.options();
  const AttentionGeometry geo = attention_geometry(attention, T);
  const int64_t D = geo.width;
  // Without a projection (whose pass shares out y_t's columns) no phase of a step mixes batch rows:
  // the loop may split by rows.
  const LoopSplit split = cpu_loop_split(G, H, HS, B, T, LoopPass::forward, input, geo.groups(), geo.heads,
                                         geo.head_dim, /*rows_independent=*/!projected);
  const bool by_rows = split.row_blocks > 1;
  const UnitBlocks blocks = make_unit_blocks(G, H, split.unit_blocks, geo.groups(), geo.heads, geo.head_dim);
  CallScratch temp(input);  // the call's temporary buffers

  // (T, B, I) read as (T * B, I) through Operands: no view is made.
  const Tensor x = input.contiguous();
  const bool packed = uses_packed_gemm(input);
  // The per-step matrices (W_rec, W_c, W_hr): one product of B rows per step.
  const MatrixForm step_form = matrix_form(packed, T, B, bf16_products);
  // The input projection (b_ih folded in), a chunk of steps at a time, each block its own gate rows
  // (split by rows: each thread its rows, a product per step). A single thread projects a large
  // product with ATen, which uses every thread. Overlapped (below): a step at a time, each block's
  // between the two halves of its step's last meeting.
  const bool overlapped = packed && !by_rows && split.threads() > 1 && T > 1 && B >= kOverlapMinRows;
  const int64_t chunk = overlapped ? 1 : chunk_steps(input, T, B, GH, kForwardChunkBytes);
  MatrixForm ih_form = by_rows ? matrix_form(packed, T, B / split.row_blocks, bf16_products)
                               : matrix_form(packed, (T + chunk - 1) / chunk, chunk * B, bf16_products);
  if (ih_form == MatrixForm::packed && split.threads() == 1 && chunk * B * I * GH >= kAtenMinMultiplies) {
    ih_form = MatrixForm::aten;
  }
  // A bfloat16 or float16 weight of a float32 CPU loop (recurrent_forward's) is read as it is by a
  // product that reads it in place (a one-step call: no float32 copy of the weights per streaming
  // step), else copied to float32. Weights in the input's dtype (every other call, CUDA's included)
  // go as they are.
  auto weight_in_form = [&](const Tensor& w, MatrixForm form) {
    const bool as_is = w.scalar_type() == input.scalar_type() ||
                       (form == MatrixForm::in_place && w.stride(1) == 1 && input.scalar_type() == at::kFloat &&
                        (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf));
    return as_is ? w : w.to(input.scalar_type());
  };
  const Tensor w_ih = weight_in_form(weight_ih_arg, ih_form);
  // Per step and block: h_{t-1} @ W_rec^T (+ b_rec), W_rec = W_hh (+ the attention rows). Weights and
  // biases stay in torch.nn's row order: each block reads its rows through the blocks' row orders.
  const RecurrentSide w_rec =
      recurrent_side(weight_in_form(weight_hh_arg, step_form), bias_hh, attention, geo.self_memory);
  // On the GPU the pointwise pass adds the recurrent bias (and the attention stage that of the
  // query, key and value rows), so that each step's product is a bare cuBLAS call (cuda_multiply).
  const std::optional<Tensor> b_rec = input.is_cuda() ? stacked_bias(w_rec.weights, w_rec.biases) : std::nullopt;
  const Tensor rec_bias = b_rec ? rows_in_order(*b_rec, blocks.rec_order, temp) : Tensor();
  const c10::ArrayRef<std::optional<Tensor>> rec_biases =
      input.is_cuda() ? c10::ArrayRef<std::optional<Tensor>>() : c10::ArrayRef<std::optional<Tensor>>(w_rec.biases);
  std::vector<BlockMatrix> ih_matrix, rec_matrix, ctx_matrix, proj_matrix;
  // Projection buffers: offsets into one scratch tensor, `buffers` (made once after this loop). A
  // tensor per buffer was made and freed on every call, a noticeable part of a one-step call.
  std::vector<int64_t> xproj, hproj, cproj;
  int64_t buffer_elements = 0;
  auto carve = [&](int64_t elements) {
    const int64_t offset = buffer_elements;
    buffer_elements += (elements + 15) / 16 * 16;  // each 64-byte aligned for float
    return offset;
  };
  const Tensor w_c = geo.enabled ? attention->weight_c : Tensor();
  const Tensor w_hr = projected ? weight_hr->contiguous() : Tensor();
  const Tensor own_order;  // W_hr's columns are shared out in its own row order
  // Per thread c: its unit block's matrices (a copy each when split by rows: each thread packs its
  // own, in its core's cache) and projection buffers (split by rows: one for all, each its rows).
  for (int64_t c = 0; c < split.threads(); ++c) {
    const int64_t u = split.unit_block(c);
    if (projected) {
      // Per step and block: its columns of y_t = m_t @ W_hr^T (every unit of m_t).
      const auto [p0, p1] = column_share(blocks, u, HS);
      proj_matrix.push_back(block_matrix(PermutedRows{w_hr, {}, own_order, p0, p1 - p0}, step_form, temp));
    }
    ih_matrix.push_back(block_matrix(
        PermutedRows{w_ih, bias_list(bias_ih), blocks.order, blocks.row0(u), blocks.rows(u)}, ih_form, temp));
    xproj.push_back(by_rows && c > 0 ? xproj[0] : carve(chunk * B * blocks.rows(u)));
    rec_matrix.push_back(block_matrix(
        PermutedRows{w_rec.weights, rec_biases, blocks.rec_order, blocks.rec_row0(u), blocks.rec_rows(u)}, step_form,
        temp));
    hproj.push_back(by_rows && c > 0 ? hproj[0] : carve(B * blocks.rec_rows(u)));
    if (geo.enabled) {
      // Per step and block: ctx_t @ W_c^T, the block's gate rows.
      ctx_matrix.push_back(
          block_matrix(PermutedRows{w_c, {}, blocks.order, blocks.row0(u), blocks.rows(u)}, step_form, temp));
      cproj.push_back(by_rows && c > 0 ? cproj[0] : carve(B * blocks.rows(u)));
    }
  }
  const Tensor buffers = temp.empty({buffer_elements});
  Tensor output = fresh_empty({T, B, HS}, opts);
  Tensor workspace = training ? fresh_empty({T, planes, B, H}, opts) : fresh_empty({0}, opts);
  std::vector<Tensor> init;
  for (const auto& s : initial_states) init.push_back(s.contiguous());
  // Inference keeps the states other than h (and m_t) in two alternating buffers instead of the
  // workspace (one step uses only the first: the second stays undefined).
  std::vector<Tensor> ping_pong;
  if (!training) {
    for (int s = 1; s < S + (projected ? 1 : 0); ++s) {
      ping_pong.push_back(fresh_empty({B, H}, opts));
      ping_pong.push_back(T > 1 ? fresh_empty({B, H}, opts) : Tensor());
    }
  }
  // The m "before the first step" that a held row carries (never projected: held rows keep y).
  const Tensor m_initial = projected ? temp.zeros({B, H}) : Tensor();

  // Attention memory, one flat buffer: queries (every step when training, else one step's; each
  // (B, D)), then the keys and the values of every slot, each (B, slots, D) (attention_step_args).
  // An inference call given an external memory's keys and values, or a self-memory slot store (a
  // streamer's steps), reads them, and writes its new slots, where they are: its store holds the
  // queries only. Views and copies are made only where needed: a one-step call's set-up is part of
  // every streaming step.
  const int64_t query_steps = training ? T : 1, slot_size = B * D;
  const bool given_keys = geo.enabled && !geo.self_memory && attention->memory_keys && !training;
  const bool given_store = geo.enabled && geo.self_memory && attention->store_keys;
  TORCH_INTERNAL_ASSERT(!given_store || (!training && !attention->past_keys),
                        "rnnattn: a caller's slot store is for inference, and holds the past slots itself");
  const int64_t store_first = given_store ? attention->store_first : 0;
  Tensor memory_store, keys_store, values_store, context, weights, lengths, scratch;
  // The store's keys (first = query_steps) or values (first = query_steps + slots).
  auto slot_plane = [&](int64_t first) { return SlotPlane{memory_store, first * slot_size, B, geo.slots, D}; };
  if (geo.enabled) {
    const bool in_place = given_keys || given_store;
    memory_store = fresh_empty({(query_steps + (in_place ? 0 : 2 * geo.slots)) * slot_size}, opts);
    if (in_place) {
      keys_store = given_keys ? *attention->memory_keys : *attention->store_keys;
      values_store = given_keys ? *attention->memory_values : *attention->store_values;
      for (const Tensor* given : {&keys_store, &values_store}) {
        TORCH_CHECK(given->is_contiguous() && given->sizes() == at::IntArrayRef({B, geo.row_slots, D}) &&
                        given->scalar_type() == input.scalar_type() && given->device() == input.device(),
                    "rnnattn: ", given_keys ? "an external memory's keys and values" : "a slot store's keys and values",
                    " must be contiguous (B, ", given_keys ? "S" : "C", ", D) = (", B, ", ", geo.row_slots, ", ", D,
                    ") in the input's dtype and device, got ", given->sizes());
      }
      TORCH_CHECK(!given_store || (store_first >= 0 && geo.past >= 0 && store_first + geo.slots <= geo.row_slots),
                  "rnnattn: a slot store of ", geo.row_slots, " slots a row has no room for ", geo.past,
                  " past slots from slot ", store_first, " and ", T, " new ones");
    } else if (geo.past > 0) {
      // Streaming: the slots before this call's first step, as given ((past, B, D)).
      copy_slots(slot_plane(query_steps), 0, *attention->past_keys);
      copy_slots(slot_plane(query_steps + geo.slots), 0, *attention->past_values);
    } else if (!geo.self_memory) {
      // External memory: every key and value once, before the loop (or as the caller made them).
      const Tensor keys = slot_plane(query_steps).view(), values = slot_plane(query_steps + geo.slots).view();
      if (attention->memory_keys) {
        keys.copy_(*attention->memory_keys);
        values.copy_(*attention->memory_values);
      } else {
        external_keys_values(*attention, keys, values);
      }
    }
    if (!geo.self_memory && attention->memory_lengths) lengths = attention->memory_lengths->contiguous();
    context = fresh_empty({T, B, D}, opts);
    scratch = attention_scratch(geo, B, input);
    weights = attention->need_weights ? at::zeros({T, B, geo.heads, geo.weight_slots}, opts) : fresh_empty({0}, opts);
  }
  const StepOrder order{T, reverse};
  const int64_t plane = B * H, out_plane = B * HS;
  const Tensor seq_lengths = lengths_arg ? lengths_arg->contiguous() : Tensor();
  const SequenceLengths sequence{seq_lengths.defined() ? seq_lengths.data_ptr<int64_t>() : nullptr, T, reverse};
  // CUDA without attention or projection may run the whole loop as one kernel (cuda/persistent_cuda.h).
  [[maybe_unused]] const CudaLoop loop_choice = cuda_loop(input, geo.enabled || projected, T, B);
  const bool persistent = loop_choice != CudaLoop::per_step;
  // (The persistent loop skips nothing: it needs no running rows, whose lengths are read on the host.)
  const std::vector<int64_t> running = persistent ? std::vector<int64_t>() : running_rows(seq_lengths, T, geo.enabled);
  // m_t after forward step k (projection): a workspace plane when training, else a ping-pong buffer.
  auto m_after = [&](int64_t k) -> Operand {
    if (training) return Operand{workspace, (order.time(k) * planes + m_plane) * plane, B, H, H};
    return Operand{ping_pong[2 * (S - 1) + (k % 2)], 0, B, H, H};
  };

  dispatch_dtype(input, [&](auto* type_tag) {
    using T_ = std::remove_pointer_t<decltype(type_tag)>;
    T_* const buffer = ptr<T_>(buffers);  // the projection buffers' offsets are into it
    const ForwardLayout<T_> layout =
        forward_layout<Cell, T_>(output, init, m_initial, workspace, ping_pong, planes, m_plane, training, order, plane);
#ifdef RNNATTN_WITH_CUDA
    if (persistent) {
      const Tensor w_hh = weight_hh_arg.contiguous();
      PersistentForwardArgs<T_> loop{};
      loop.step.xproj = GateView<const T_>{buffer + xproj[0], GH, H};
      if (rec_bias.defined()) loop.step.hbias = GateView<const T_>{ptr<T_>(rec_bias), 0, H};
      loop.step.lengths = sequence.data;
      loop.step.batch = B;
      loop.step.hidden = H;
      loop.layout = layout;
      loop.weight = ptr<T_>(w_hh);
      if (cuda::plan_persistent_forward<Cell, T_>(loop)) {
        multiply(ih_matrix[0], {x, 0, T * B, I, I}, {buffers, xproj[0], T * B, GH, GH});
        check_launch(cuda::launch_persistent_forward<Cell, T_>(loop, c10::cuda::getCurrentCUDAStream()),
                     "the persistent forward loop");
        return;
      }
      TORCH_CHECK(loop_choice != CudaLoop::persistent, "rnnattn: RNNATTN_CUDA_LOOP=persistent, but this GPU cannot ",
                  "run the forward loop of batch ", B, " and hidden size ", H, " in ", input.scalar_type(),
                  " as one kernel (each SM's share of W_hh and 4 rows of h must fit in its shared memory)");
    }
#endif
    T_* queries = geo.enabled ? ptr<T_>(memory_store) : nullptr;
    // Keys and values of the call's first slot (a caller's store: its past slots' first).
    T_* keys = !geo.enabled              ? nullptr
               : keys_store.defined() ? ptr<T_>(keys_store) + store_first * D
                                      : queries + query_steps * slot_size;
    T_* values = !geo.enabled              ? nullptr
                 : keys_store.defined() ? ptr<T_>(values_store) + store_first * D
                                        : keys + geo.slots * slot_size;
    // A one-step call at batch 1 reading both weights in place alternates their order (read_last_first):
    // each block's way this call, written by the thread that runs the block.
    const bool alternating = T == 1 && B == 1 && !by_rows && !ih_matrix.empty() &&
                             ih_matrix[0].form == MatrixForm::in_place && rec_matrix[0].form == MatrixForm::in_place;
    std::vector<char> last_first(split.threads(), 0);
    // One team for the whole loop: member threads keep their blocks; a step's phases end at a sync
    // (split by rows, none: each thread runs every phase of its rows).
    run_team(split.threads(), !packed, [&](const TeamMember& team) {
      team.for_each_block([&](int64_t c) {
        ih_matrix[c].prepare();
        rec_matrix[c].prepare();
        if (geo.enabled) ctx_matrix[c].prepare();
        if (projected) proj_matrix[c].prepare();
        const BlockMatrix& rec = rec_matrix[c];
        if (alternating && rec.n > 0) {
          const void* first_row = rec.rows != nullptr ? static_cast<const void*>(rec.rows[0]) : rec.half_rows[0];
          last_first[c] = read_last_first(first_row);
        }
      });
      int64_t chunk_first_time = 0;  // the earliest time step of the current chunk of xproj
      // Block c's input projection of the chunk's n steps (in the block's reading order).
      auto project_chunk = [&](int64_t c, int64_t n) {
        const int64_t width = blocks.rows(split.unit_block(c));
        if (!by_rows) {
          multiply(ih_matrix[c], {x, chunk_first_time * B * I, n * B, I, I}, {buffers, xproj[c], n * B, width, width},
                   false, last_first[c]);
          return;
        }
        const auto [r0, r1] = split.rows(c, B);
        const int64_t rows = r1 - r0;
        for (int64_t step = 0; step < n; ++step) {
          const int64_t row = (chunk_first_time + step) * B + r0;
          multiply(ih_matrix[c], {x, row * I, rows, I, I},
                   {buffers, xproj[c] + (step * B + r0) * width, rows, width, width});
        }
      };
      for (int64_t k = 0; k < T; ++k) {
        const int64_t t = order.time(k);
        if (k % chunk == 0 && !(overlapped && k > 0)) {
          const int64_t n = std::min(chunk, T - k);
          chunk_first_time = reverse ? T - k - n : k;
          team.for_each_block([&](int64_t c) {
            if (!last_first[c]) project_chunk(c, n);  // else after W_hh's product, below
          });
        }
        // h_{t-1} as a raw operand: no tensor is made per step.
        const Operand h_prev =
            k == 0 ? Operand{init[0], 0, B, HS, HS} : Operand{output, order.time(k - 1) * out_plane, B, HS, HS};
        auto pointwise = [&](int64_t c) {
          const int64_t u = split.unit_block(c);
          ForwardStepArgs<T_> args{};
          args.xproj = GateView<const T_>{buffer + xproj[c] + (t - chunk_first_time) * B * blocks.rows(u),
                                          blocks.rows(u), blocks.width(u)};
          args.hproj = GateView<const T_>{buffer + hproj[c], blocks.rec_rows(u), blocks.width(u)};
          if (rec_bias.defined()) {
            args.hbias = GateView<const T_>{ptr<T_>(rec_bias) + blocks.rec_row0(u), 0, blocks.width(u)};
          }
          if (geo.enabled) args.cproj = GateView<const T_>{buffer + cproj[c], blocks.rows(u), blocks.width(u)};
          layout.template fill<S>(args, k);
          args.lengths = sequence.data;
          args.batch = B;
          args.hidden = H;
          args.unit_begin = blocks.first(u);
          args.unit_end = blocks.first(u) + blocks.width(u);
          std::tie(args.row_begin, args.row_end) = split.rows(c, B);
          run_pointwise_block<Cell>(input, args);
        };
        team.for_each_block([&](int64_t c) {
          const int64_t u = split.unit_block(c);
          const auto [r0, r1] = split.rows(c, B);
          // The thread's rows; past the last running one they are held: the pointwise pass does not
          // read their projection.
          const int64_t rows = std::clamp<int64_t>((running.empty() ? B : running[t]) - r0, 0, r1 - r0);
          if (rows > 0) {
            const Operand h_rows{h_prev.base, h_prev.offset + r0 * HS, rows, HS, HS};
            const int64_t width = blocks.rec_rows(u);
            multiply(rec_matrix[c], h_rows, {buffers, hproj[c] + r0 * width, rows, width, width}, false, last_first[c]);
          }
          if (last_first[c]) project_chunk(c, 1);  // the one step's, W_ih read last first too
          if (!geo.enabled) {
            pointwise(c);
            return;
          }
          if (blocks.cols(u) == 0) return;
          // The block's heads: their query (and new slot) staged from the GEMM, then the attention.
          AttentionStepArgs<T_> a = attention_step_args<T_>(geo, blocks, u, B, k, lengths, scratch, sequence,
                                                            queries + (training ? k : 0) * slot_size, keys, values);
          a.staged = SlotRows<T_>{buffer + hproj[c] + blocks.rows(u), blocks.rec_rows(u), blocks.cols(u),
                                  blocks.col0(u),
                                  rec_bias.defined() ? ptr<T_>(rec_bias) + blocks.rec_row0(u) + blocks.rows(u) : nullptr,
                                  geo.self_memory ? geo.new_slot(k) : -1};
          a.context = ptr<T_>(context) + t * slot_size;
          a.context_stride = D;
          a.weights = attention->need_weights ? ptr<T_>(weights) + t * B * geo.heads * geo.weight_slots : nullptr;
          a.row_begin = r0;
          a.row_end = r1;
          run_attention<false>(input, a);
        });
        // The end of a phase: a meeting, but for the last step's last phase (the team's end joins its
        // members).
        const bool last_step = k + 1 == T;
        auto phase_end = [&](bool more_phases) {
          if (more_phases) return team.sync();
          if (last_step) return true;
          if (!overlapped) return team.sync();
          // The step's last meeting: a thread done with its step projects its next step's input (its
          // own rows of W_ih: no other thread waits for them) before it waits for the others.
          const int64_t ticket = team.arrive();
          chunk_first_time = order.time(k + 1);
          team.for_each_block([&](int64_t c) { project_chunk(c, 1); });
          return team.wait_for(ticket);
        };
        if (!by_rows && !phase_end(geo.enabled || projected)) return;
        if (geo.enabled) {
          // Every head's context of the thread's rows is ready: W_c ctx_t joins the input side of
          // each block's gates.
          team.for_each_block([&](int64_t c) {
            const int64_t width = blocks.rows(split.unit_block(c));
            const auto [r0, r1] = split.rows(c, B);
            multiply(ctx_matrix[c], {context, t * slot_size + r0 * D, r1 - r0, D, D},
                     {buffers, cproj[c] + r0 * width, r1 - r0, width, width});
            pointwise(c);
          });
          if (!by_rows && !phase_end(projected)) return;
        }
        if (projected) {
          // Every unit of m_t is ready: each block its columns of y_t; held rows keep y_{t-1}.
          const int64_t rows = running.empty() ? B : running[t];
          team.for_each_block([&](int64_t c) {
            const auto [p0, p1] = column_share(blocks, c, HS);
            if (p1 == p0) return;
            if (rows > 0) {
              Operand m = m_after(k);
              m.rows = rows;
              multiply(proj_matrix[c], m, {output, t * out_plane + p0, rows, p1 - p0, HS});
            }
            if (sequence.data != nullptr) {
              ProjectionHoldArgs<T_> hold{ptr<T_>(output) + t * out_plane, h_prev.data<T_>(), sequence.data, t, B, HS,
                                          p0, p1};
              run_projection_pass(input, hold);
            }
          });
          if (!phase_end(false)) return;
        }
      }
    });
  });

  RecurrentForward result;
  // Final states are fresh tensors: an op's outputs must not alias each other.
  if (T == 0) {
    for (const auto& s : init) result.final_states.push_back(s.clone());
  } else {
    const int64_t last = order.time(T - 1);
    result.final_states.push_back(plane_copy(output, last, B, HS));
    for (int s = 1; s < S; ++s) {
      result.final_states.push_back(training ? plane_copy(workspace, last * planes + Cell::kSaved + s - 1, B, H)
                                             : ping_pong[2 * (s - 1) + ((T - 1) % 2)]);
    }
    // Held rows carried their state through the output: the final states above are those after each
    // row's last valid step; the padded steps' outputs become zero.
    if (seq_lengths.defined()) zero_padded_steps(output, seq_lengths);
  }
  result.output = std::move(output);
  result.workspace = std::move(workspace);
  if (geo.enabled) {
    result.context = std::move(context);
    result.attention = std::move(weights);
    result.attention_workspace = training ? std::move(memory_store) : fresh_empty({0}, opts);
  }
  return result;
}

// The backward time loop; with bf16_products (float CPU tensors of a bfloat16 layer) its packed
// products run in bfloat16.
template <class Cell>
RecurrentBackward backward_loop(const Tensor& grad_output, const std::vector<Tensor>& grad_final_states,
                                const Tensor& input_arg, const std::vector<Tensor>& initial_states,
                                const Tensor& weight_ih_arg, const Tensor& weight_hh_arg,
                                const std::optional<Tensor>& weight_hr, const Tensor& output_arg,
                                const Tensor& workspace_arg, const std::optional<Tensor>& lengths_arg, bool reverse,
                                const AttentionConfig* attention, const AttentionSaved* saved, bool bf16_products) {
  constexpr int S = Cell::kStates, G = Cell::kGates;
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the forward
  const bool projected = weight_hr.has_value();
  const int planes = workspace_planes<Cell>(projected), m_plane = workspace_planes<Cell>();
#ifdef RNNATTN_WITH_CUDA
  const c10::cuda::OptionalCUDAGuard guard(input_arg.is_cuda() ? std::optional<c10::Device>(input_arg.device())
                                                               : std::nullopt);
#endif
  const Tensor input = input_arg;
  const Tensor workspace = workspace_arg.contiguous();
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const Tensor seq_lengths = lengths_arg ? lengths_arg->contiguous() : Tensor();
  const SequenceLengths sequence{seq_lengths.defined() ? seq_lengths.data_ptr<int64_t>() : nullptr, T, reverse};
  // The states each step started from are the outputs of the step before it. With lengths, in
  // reverse, a row's first valid step started from h_0, which the forward carried through the padded
  // steps and then zeroed there: put it back.
  const Tensor output = seq_lengths.defined() && reverse
                            ? with_initial_state_at_padded_steps(output_arg, initial_states[0], seq_lengths)
                            : output_arg.contiguous();
  const int64_t GH = weight_hh_arg.size(0), H = GH / G, HS = weight_hh_arg.size(1);  // as in the forward
  const auto opts = input.options();
  const int64_t plane = B * H, out_plane = B * HS;
  const AttentionGeometry geo = attention_geometry(attention, T);
  const int64_t D = geo.width, slot_size = B * D;
  // As in the forward: without a projection the loop may split by batch rows.
  const LoopSplit split = cpu_loop_split(G, H, HS, B, T, LoopPass::backward, input, geo.groups(), geo.heads,
                                         geo.head_dim, /*rows_independent=*/!projected);
  const bool by_rows = split.row_blocks > 1;
  const UnitBlocks blocks = make_unit_blocks(G, H, split.unit_blocks, geo.groups(), geo.heads, geo.head_dim);
  CallScratch temp(input);  // the call's temporary buffers
  const int64_t R = blocks.rec_total();  // recurrent-side rows
  // CUDA without attention or projection may run the whole loop as one kernel (cuda/persistent_cuda.h).
  [[maybe_unused]] const CudaLoop loop_choice = cuda_loop(input, geo.enabled || projected, T, B);
  const bool persistent = loop_choice != CudaLoop::per_step;
  const std::vector<int64_t> running = persistent ? std::vector<int64_t>() : running_rows(seq_lengths, T, geo.enabled);

  // ATen's products (double, reduced precision, CUDA) read the weights' rows in block order from
  // permuted copies; our CPU kernel packs them through tables of row addresses instead (contiguous
  // rows), and writes its weight gradients straight into torch.nn's row order. (Only the tables need
  // unit column strides: rows_in_order copies a strided weight once already.)
  const bool packed = uses_packed_gemm(input);
  auto unit_column_stride = [&](const Tensor& w) { return !packed || w.stride(1) == 1 ? w : w.contiguous(); };
  const Tensor weight_ih = unit_column_stride(weight_ih_arg);
  std::vector<Tensor> rec_weights = recurrent_side(weight_hh_arg, std::nullopt, attention, geo.self_memory).weights;
  for (Tensor& w : rec_weights) w = unit_column_stride(w);
  const Tensor weight_c = geo.enabled ? unit_column_stride(attention->weight_c) : Tensor();
  const Tensor w_ih = packed ? Tensor() : rows_in_order(weight_ih, blocks.order, temp);
  const Tensor w_rec = packed ? Tensor() : rows_in_order(stacked(rec_weights), blocks.rec_order, temp);
  const Tensor w_c = geo.enabled && !packed ? rows_in_order(weight_c, blocks.order, temp) : Tensor();
  const Tensor grad_y = grad_output.contiguous();
  std::vector<Tensor> init;
  for (const auto& s : initial_states) init.push_back(s.contiguous());
  // Carried state gradients, updated in place step by step (they end as the initial states' gradients).
  std::vector<Tensor> dstate;
  for (const auto& g : grad_final_states) dstate.push_back(g.contiguous().clone());
  // With several blocks, each block's share of dh_{t-1} = dg_rec_t @ W_rec goes to its own buffer
  // and the blocks add them up (in block order: deterministic) at the next step. Likewise the
  // shares of dctx_t = dxg_t @ W_c. A projection always uses shares (projection_step.h). Split by
  // rows, the one block's share holds every thread's rows.
  const MatrixForm form = !packed ? MatrixForm::aten : bf16_products ? MatrixForm::packed_bf16 : MatrixForm::packed;
  const bool shares = packed || blocks.count() > 1 || projected;
  // dh shares by step parity: a step reads the list the step after it wrote (zeros at first), one
  // (blocks, B, HS) buffer per parity.
  std::vector<Tensor> dh_shares[2], dctx_share;
  Tensor dh_share_planes[2];
  if (shares) {
    for (int parity = 0; parity < 2; ++parity) {
      dh_share_planes[parity] = temp.zeros({blocks.count(), B, HS});
      for (int64_t c = 0; c < blocks.count(); ++c) dh_shares[parity].push_back(dh_share_planes[parity][c]);
    }
  }
  // Projection: dm_t = dy_t @ W_hr, each block its units, into dm (the pointwise pass's dh_t, whose
  // own grad_output is then a zero plane); the m before the first step, which no row reads.
  std::vector<BlockMatrix> rec_matrix, ctx_matrix, proj_matrix;
  const Tensor w_hr = projected ? weight_hr->contiguous() : Tensor();
  const Tensor dm = projected ? temp.empty({B, H}) : Tensor();
  const Tensor zero_plane = projected ? temp.zeros({B, H}) : Tensor();
  // A float call of few steps reads the per-step products' W_rec^T and W_c^T in place by columns.
  const bool step_columns_in_place = packed && !bf16_products && T <= kInPlaceMaxUses;
  for (int64_t c = 0; c < split.threads(); ++c) {
    // share_c = dg_rec_c @ W_rec_c: M = W_rec_c^T (HS x rec_rows(c)); split by rows, a copy each.
    const int64_t u = split.unit_block(c);
    rec_matrix.push_back(
        packed ? transposed_block_matrix(
                     PermutedRows{rec_weights, {}, blocks.rec_order, blocks.rec_row0(u), blocks.rec_rows(u)},
                     bf16_products, step_columns_in_place, temp)
               : block_matrix(w_rec.narrow(0, blocks.rec_row0(u), blocks.rec_rows(u)).t(), std::nullopt, form, temp));
    if (projected) {
      // dm of block c's units: M = W_hr[:, units]^T (width(c) x HS).
      proj_matrix.push_back(
          block_matrix(w_hr.narrow(1, blocks.first(c), blocks.width(c)).t(), std::nullopt, form, temp));
    }
    if (geo.enabled) {
      // dctx share_c = dxg_c @ W_c_c: M = W_c_c^T (D x rows(c)); split by rows, one share.
      ctx_matrix.push_back(
          packed
              ? transposed_block_matrix(PermutedRows{weight_c, {}, blocks.order, blocks.row0(u), blocks.rows(u)},
                                        bf16_products, step_columns_in_place, temp)
              : block_matrix(w_c.narrow(0, blocks.row0(u), blocks.rows(u)).t(), std::nullopt, form, temp));
      if (!by_rows || c == 0) dctx_share.push_back(temp.empty({B, D}));
    }
  }

  // Gradients of the pre-activations of one chunk of steps, chunk x B rows: input side (G*H each) in
  // gate order, recurrent side (R each) in recurrent-side order (the same buffer when they are equal). After
  // each chunk they go into the large GEMMs (dx, dW, db), so no buffer grows with T.
  // With a projection, also dy of the chunk's steps (chunk, B, HS) for dW_hr.
  const bool rec_alias = !geo.enabled && !Cell::kSeparateHiddenGrad;
  // Their rows are ldx and ldh floats apart: for our kernel a little further than a multiple of
  // 4 KiB, which the products reading them (the step's dh, the chunk's dx) would otherwise copy
  // first (packed_gemm.h).
  const int64_t ldx = packed ? cpu::alias_free_stride(GH) : GH;
  const int64_t ldh = rec_alias ? ldx : packed ? cpu::alias_free_stride(R) : R;
  const int64_t chunk =
      chunk_steps(input, T, B, (rec_alias ? ldx : ldx + ldh) + (projected ? HS : 0), kBackwardChunkBytes);
  Tensor dgx = temp.empty({chunk * B, ldx});
  Tensor dgh = rec_alias ? dgx : temp.empty({chunk * B, ldh});
  Tensor dgy = projected ? temp.empty({chunk, B, HS}) : Tensor();
  // The gradients the chunks add up: ATen's products add into zeros in block order (put in torch.nn
  // order after the loop); our kernel writes the results in torch.nn's order directly, the weights'
  // set by the first chunk (zeros only if no chunk has a row) and the biases' added up from zeros.
  const Tensor x = input.contiguous().view({T * B, I});
  Tensor grad_input = fresh_empty({T, B, I}, opts);
  auto weight_gradient = [&](at::IntArrayRef sizes, const Tensor& order) {
    if (!packed) return block_order_zeros(sizes, order, temp);
    return T * B > 0 ? at::empty(sizes, opts) : at::zeros(sizes, opts);
  };
  auto bias_gradient = [&](int64_t size, const Tensor& order) {
    return packed ? at::zeros({size}, opts) : block_order_zeros({size}, order, temp);
  };
  Tensor grad_w_ih = weight_gradient({GH, I}, blocks.order);
  Tensor grad_b_ih = bias_gradient(GH, blocks.order);
  Tensor grad_w_rec = weight_gradient({R, HS}, blocks.rec_order);
  Tensor grad_b_rec = rec_alias ? Tensor() : bias_gradient(R, blocks.rec_order);
  Tensor grad_w_hr = projected ? at::zeros({HS, H}, opts) : Tensor();
  Tensor grad_w_c = geo.enabled ? weight_gradient({GH, D}, blocks.order) : Tensor();
  const Tensor context = geo.enabled ? saved->context.contiguous().view({T * B, D}) : Tensor();

  // Attention: the saved queries, keys and values, the gradients of the keys and values (summed
  // over the steps that read each slot), and dctx of the current step.
  Tensor memory_store, grad_keys, grad_values, dctx, grad_context, lengths;
  const Tensor scratch = attention_scratch(geo, B, input);
  if (geo.enabled) {
    memory_store = saved->workspace.contiguous();
    // On the CPU each (row, head) pair's slots lie one after another, (B, heads, slots, head_dim):
    // every step adds to the slots of its window, and with the store's interleaved heads those
    // additions stalled on their cache lines (three quarters of the pass's samples at B=16,
    // window 128). CUDA keeps the store's layout, (B, slots, heads, head_dim).
    const std::vector<int64_t> sizes = input.is_cpu() ? std::vector<int64_t>{B, geo.heads, geo.slots, geo.head_dim}
                                                      : std::vector<int64_t>{B, geo.slots, geo.heads, geo.head_dim};
    grad_keys = at::zeros(sizes, opts);
    grad_values = at::zeros(sizes, opts);
    if (input.is_cpu()) dctx = temp.empty({B, D});  // CUDA reads its one block's share in place
    if (saved->grad_context.defined()) grad_context = saved->grad_context.contiguous();
    if (attention->memory_lengths) lengths = attention->memory_lengths->contiguous();
  }
  const StepOrder order{T, reverse};

  // On the CPU in float the chunks' large products (dx, dW_ih, dW_c, dW_rec) run in our GEMM kernel too (a
  // core of the Zen 4 host: ~112 GFLOP/s, MKL's ~93; in bfloat16 for a bfloat16 layer): M packed from
  // columns (W_ih^T once; each chunk's x^T and h_{t-1}^T by the members together), a = a block's
  // gate-gradient columns transposed into its thread's buffer.
  // A float call of at most kInPlaceBulkRows rows reads them in place by columns (no packing).
  const bool bulk_in_place = !bf16_products && T * B <= kInPlaceBulkRows;
  const BulkProducts bulk = packed ? bulk_products(split.threads(), blocks, chunk * B, I, HS, geo.enabled ? D : 0,
                                                   weight_ih, bf16_products, bulk_in_place, temp)
                                   : BulkProducts{};

  dispatch_dtype(input, [&](auto* type_tag) {
    using T_ = std::remove_pointer_t<decltype(type_tag)>;
    // Where the forward left each step's states (with a projection, m_t in slot 0).
    const ForwardLayout<T_> layout = forward_layout<Cell, T_>(output, init, zero_plane, workspace, {}, planes, m_plane,
                                                              /*training=*/true, order, plane);
    T_* queries = geo.enabled ? ptr<T_>(memory_store) : nullptr;  // read only (the forward's staging)
    T_* keys = geo.enabled ? queries + T * slot_size : nullptr;
    T_* values = geo.enabled ? keys + geo.slots * slot_size : nullptr;
    // The list of dh shares step k writes (step k - 1 reads it).
    auto written = [&](int64_t k) -> std::vector<Tensor>& { return dh_shares[(T - 1 - k) % 2]; };
    auto read = [&](int64_t k) -> std::vector<Tensor>& { return dh_shares[(T - k) % 2]; };
    // The large GEMMs of the chunk of steps [k_lo, k_lo + n) (its times from first_time on): each
    // block its own rows of dW and db, each member its share of dx's rows.
    // False if the loop must stop (a member failed).
    auto chunk_gradients = [&](const TeamMember& team, int64_t k_lo, int64_t n, int64_t first_time) -> bool {
      const int64_t rows = n * B;
      // ATen's operands (without the bulk products): the chunk's gate gradients.
      auto dgx_rows = [&] { return dgx.narrow(1, 0, GH).narrow(0, 0, rows); };
      auto dgh_rows = [&] { return dgh.narrow(1, 0, R).narrow(0, 0, rows); };
      // h_{t-1} of the chunk's steps: outputs, except that step 0 read h_0.
      const bool has_first = k_lo == 0;
      const int64_t regular = has_first ? n - 1 : n;
      const int64_t dgh_skip = has_first && !reverse ? 1 : 0;  // forward: step 0 is the chunk's first row
      const int64_t read_time = reverse ? first_time + 1 : (has_first ? 0 : first_time - 1);
      cpu::PanelMatrix x_t, h_t, context_t;  // the chunk's x^T, h_{t-1}^T and context^T (bulk)
      if (bulk.enabled) {
        // Row q of the chunk: x, the h_{t-1} it met (h_0 for step 0's rows) and the context.
        const float** x_rows = bulk.x_rows[team.index];
        const float** h_rows = bulk.h_rows[team.index];
        const float** context_rows = geo.enabled ? bulk.context_rows[team.index] : nullptr;
        const float* first_h = ptr<float>(init[0]);
        for (int64_t q = 0; q < rows; ++q) {
          x_rows[q] = ptr<float>(x) + (first_time * B + q) * I;
          const bool initial = has_first && (reverse ? q >= (n - 1) * B : q < B);
          h_rows[q] = initial ? first_h + (q % B) * HS : ptr<float>(output) + (read_time * B + q - dgh_skip * B) * HS;
          if (geo.enabled) context_rows[q] = ptr<float>(context) + (first_time * B + q) * D;
        }
        if (bulk.in_place) {
          // Each member reads them through its own tables: nothing to pack, so no meeting.
          x_t = cpu::columns_in_place(x_rows, I, rows);
          h_t = cpu::columns_in_place(h_rows, HS, rows);
          if (geo.enabled) context_t = cpu::columns_in_place(context_rows, D, rows);
        } else {
          // The members pack the panels together.
          auto mine = [&](int64_t width) { return even_share(cpu::panel_count(width), team.index, team.members); };
          const auto [x0, x1] = mine(I);
          const auto [h0, h1] = mine(HS);
          x_t = cpu::pack_columns(bulk.bf16, x_rows, I, rows, bulk.x_panels, x0, x1);
          h_t = cpu::pack_columns(bulk.bf16, h_rows, HS, rows, bulk.h_panels, h0, h1);
          if (geo.enabled) {
            const auto [c0, c1] = mine(D);
            context_t = cpu::pack_columns(bulk.bf16, context_rows, D, rows, bulk.context_panels, c0, c1);
          }
          if (!team.sync()) return false;
        }
      }
      team.for_each_block([&](int64_t c) {
        // Block c's rows of the gradients; split by rows, thread c's share of the one block's.
        const int64_t u = split.unit_block(c);
        auto share = [&](int64_t first, int64_t count) {
          if (!by_rows) return std::pair(first, count);
          const auto [begin, end] = even_share(count, c, split.row_blocks);
          return std::pair(first + begin, end - begin);
        };
        const auto [g0, gn] = share(blocks.row0(u), blocks.rows(u));
        const auto [r0, rn] = share(blocks.rec_row0(u), blocks.rec_rows(u));
        if (bulk.enabled) {
          // dW = or += dg^T M^T (W_ih, W_c, W_rec) and db += dg's column sums, dg^T (the block's columns
          // of the chunk's rows) in this thread's buffer, each run of rows consecutive in torch.nn
          // order (a block's gate) into its rows of the results.
          float* dg_t = bulk.transposed[team.index];
          const bool accumulate = k_lo + n < T;  // the first chunk done (the last steps) sets dW
          cpu::transpose(ptr<float>(dgx) + g0, rows, gn, ldx, dg_t, bulk.ld);
          for_each_torch_nn_run(blocks.order, g0, gn, [&](int64_t offset, int64_t row, int64_t count) {
            const float* a = dg_t + offset * bulk.ld;
            x_t.multiply(a, count, bulk.ld, nullptr, ptr<float>(grad_w_ih) + row * I, I, accumulate);
            cpu::add_row_sums(a, count, rows, bulk.ld, ptr<float>(grad_b_ih) + row);
            if (geo.enabled) {
              context_t.multiply(a, count, bulk.ld, nullptr, ptr<float>(grad_w_c) + row * D, D, accumulate);
            }
          });
          if (rec_alias) {
            TORCH_INTERNAL_ASSERT(r0 == g0 && rn == gn);  // the same gradients: dg_t holds them already
          } else {
            cpu::transpose(ptr<float>(dgh) + r0, rows, rn, ldh, dg_t, bulk.ld);
          }
          for_each_torch_nn_run(blocks.rec_order, r0, rn, [&](int64_t offset, int64_t row, int64_t count) {
            const float* a = dg_t + offset * bulk.ld;
            if (!rec_alias) cpu::add_row_sums(a, count, rows, bulk.ld, ptr<float>(grad_b_rec) + row);
            h_t.multiply(a, count, bulk.ld, nullptr, ptr<float>(grad_w_rec) + row * HS, HS, accumulate);
          });
        } else {
          const Tensor dg_in = dgx_rows().narrow(1, g0, gn);
          const Tensor dg_rec = dgh_rows().narrow(1, r0, rn);
          Tensor w = grad_w_rec.narrow(0, r0, rn);
          grad_w_ih.narrow(0, g0, gn).addmm_(dg_in.t(), x.narrow(0, first_time * B, rows));
          if (regular > 0) {
            w.addmm_(dg_rec.narrow(0, dgh_skip * B, regular * B).t(),
                     output.view({T * B, HS}).narrow(0, read_time * B, regular * B));
          }
          if (has_first) w.addmm_(dg_rec.narrow(0, reverse ? (n - 1) * B : 0, B).t(), init[0]);
          grad_b_ih.narrow(0, g0, gn).add_(dg_in.sum(0));
          if (!rec_alias) grad_b_rec.narrow(0, r0, rn).add_(dg_rec.sum(0));
          if (geo.enabled) grad_w_c.narrow(0, g0, gn).addmm_(dg_in.t(), context.narrow(0, first_time * B, rows));
        }
        if (projected) {
          // dW_hr += dy^T m over the chunk's steps, each block its rows (columns of y).
          const auto [p0, p1] = column_share(blocks, u, HS);
          if (p1 > p0) {
            const Tensor m = workspace.narrow(0, first_time, n).select(1, m_plane).reshape({rows, H});
            grad_w_hr.narrow(0, p0, p1 - p0)
                .addmm_(dgy.view({chunk * B, HS}).narrow(0, 0, rows).narrow(1, p0, p1 - p0).t(), m);
          }
        }
      });
      const auto [r0, r1] = even_share(rows, team.index, team.members);
      if (r1 > r0 && bulk.enabled) {
        bulk.w_ih_t.multiply(ptr<float>(dgx) + r0 * ldx, r1 - r0, ldx, nullptr,
                             ptr<float>(grad_input) + (first_time * B + r0) * I, I, /*accumulate=*/false);
      } else if (r1 > r0) {
        Tensor dx = grad_input.view({T * B, I}).narrow(0, first_time * B + r0, r1 - r0);
        at::mm_out(dx, dgx_rows().narrow(0, r0, r1 - r0), w_ih);
      }
      return true;
    };
    // Projection, before step k's pointwise pass (k = -1: after the loop, dh_0): dy_t from step
    // k + 1's shares, each block its columns (projection_step.h).
    auto carry_projected = [&](int64_t c, int64_t k, int64_t row) {
      const auto [p0, p1] = column_share(blocks, c, HS);
      ProjectionCarryArgs<T_> a{};
      a.carried = ptr<T_>(dstate[0]);
      a.shares = ptr<T_>(dh_share_planes[(T - k) % 2]);  // what step k + 1 wrote (see read)
      a.share_count = k == T - 1 ? 0 : blocks.count();
      a.grad_output = k >= 0 ? ptr<T_>(grad_y) + order.time(k) * out_plane : nullptr;
      a.step_grad = k >= 0 ? ptr<T_>(dgy) + row * HS : nullptr;
      a.lengths = sequence.data;
      a.time = k >= 0 ? order.time(k) : -1;
      a.next_time = k < T - 1 ? order.time(k + 1) : -1;
      a.batch = B;
      a.width = HS;
      a.col_begin = p0;
      a.col_end = p1;
      run_projection_pass(input, a);
    };
#ifdef RNNATTN_WITH_CUDA
    if (persistent) {
      const Tensor w_hh = weight_hh_arg.contiguous();
      PersistentBackwardArgs<T_> loop{};
      for (int s = 0; s < S; ++s) loop.step.dstate[s] = ptr<T_>(dstate[s]);
      loop.step.dxg = GateView<T_>{ptr<T_>(dgx), ldx, H};
      if (!rec_alias) loop.step.dhg = GateView<T_>{ptr<T_>(dgh), ldh, H};
      loop.step.lengths = sequence.data;
      loop.step.batch = B;
      loop.step.hidden = H;
      loop.layout = layout;
      loop.grad_output = ptr<T_>(grad_y);
      loop.weight = ptr<T_>(w_hh);
      if (cuda::plan_persistent_backward<Cell, T_>(loop)) {
        check_launch(cuda::launch_persistent_backward<Cell, T_>(loop, c10::cuda::getCurrentCUDAStream()),
                     "the persistent backward loop");
        // One chunk of every step on CUDA: its large products.
        run_team(1, /*aten_state=*/true, [&](const TeamMember& team) { chunk_gradients(team, 0, T, 0); });
        return;
      }
      TORCH_CHECK(loop_choice != CudaLoop::persistent, "rnnattn: RNNATTN_CUDA_LOOP=persistent, but this GPU cannot ",
                  "run the backward loop of batch ", B, " and hidden size ", H, " in ", input.scalar_type(),
                  " as one kernel (each SM's share of W_hh and 4 rows of gate gradients must fit in its shared memory)");
    }
#endif
    run_team(split.threads(), /*aten_state=*/true, [&](const TeamMember& team) {
      team.for_each_block([&](int64_t c) {
        rec_matrix[c].prepare();
        if (geo.enabled) ctx_matrix[c].prepare();
        if (projected) proj_matrix[c].prepare();
      });
      if (bulk.enabled && !bulk.in_place) {
        // Each member its panels of W_ih^T (dx's M), which the first chunk's products read.
        const auto [p0, p1] = even_share(cpu::panel_count(I), team.index, team.members);
        cpu::pack_columns(bulk.bf16, bulk.w_ih_rows, I, GH, bulk.w_ih_t.storage(), p0, p1);
      }
      int64_t chunk_first_time = 0, chunk_end = T;  // the current chunk ends before step chunk_end
      for (int64_t k = T - 1; k >= 0; --k) {
        const int64_t t = order.time(k);
        const int64_t n = std::min(chunk, chunk_end);  // steps in the current chunk
        if (k == chunk_end - 1) chunk_first_time = reverse ? T - chunk_end : chunk_end - n;
        const int64_t row = (t - chunk_first_time) * B;  // this step's rows in dgx and dgh
        // dh_{t-1} share of block c (or, with no shares, added straight into the carried gradient),
        // for thread c's rows [b0, b1). Held rows past the last running one have zero gradients: no
        // GEMM work for them.
        const int64_t running_now = running.empty() ? B : running[t];
        auto hidden_share = [&](int64_t c) {
          const int64_t u = split.unit_block(c);
          const auto [b0, b1] = split.rows(c, B);
          const int64_t rows = std::clamp<int64_t>(running_now - b0, 0, b1 - b0);
          const Operand dg{dgh, (row + b0) * ldh + blocks.rec_row0(u), rows, blocks.rec_rows(u), ldh};
          if (shares) {
            if (rows > 0) multiply(rec_matrix[c], dg, {written(k)[u], b0 * HS, rows, HS, HS});
            if (b0 + rows < b1) written(k)[u].narrow(0, b0 + rows, b1 - b0 - rows).zero_();
          } else if (rows > 0) {
            multiply(rec_matrix[c], dg, {dstate[0], b0 * HS, rows, HS, HS}, /*accumulate=*/true);
          }
        };
        if (projected) {
          team.for_each_block([&](int64_t c) { carry_projected(c, k, row); });
          if (!team.sync()) return;
        }
        team.for_each_block([&](int64_t c) {
          const int64_t u = split.unit_block(c), j0 = blocks.first(u), j1 = j0 + blocks.width(u);
          const auto [b0, b1] = split.rows(c, B);
          if (projected) {
            multiply(proj_matrix[c], {dstate[0], 0, B, HS, HS}, {dm, j0, B, j1 - j0, H});
          } else if (shares) {
            // dh_t of this block's units and thread's rows: its direct part plus every block's share
            // from step t+1.
            if constexpr (kCpuType<T_>) {
              T_* dh = ptr<T_>(dstate[0]);
              for (const auto& share : read(k)) {
                const T_* add = ptr<T_>(share);
                for (int64_t b = b0; b < b1; ++b) {
                  for (int64_t j = j0; j < j1; ++j) dh[b * H + j] += add[b * H + j];
                }
              }
            }
          }
          BackwardStepArgs<T_> args{};
          layout.template fill<S>(args, k);
          // With a projection the cell's h is m_t; its gradient dm already holds all of dL/dy_t.
          args.grad_output = projected ? ptr<T_>(zero_plane) : ptr<T_>(grad_y) + t * plane;
          for (int s = 0; s < S; ++s) args.dstate[s] = ptr<T_>(dstate[s]);
          if (projected) args.dstate[0] = ptr<T_>(dm);
          args.lengths = sequence.data;
          args.dxg = gate_view<T_>(ptr<T_>(dgx) + row * ldx, ldx, blocks, u);
          if (!rec_alias) args.dhg = GateView<T_>{ptr<T_>(dgh) + row * ldh + blocks.rec_row0(u), ldh, blocks.width(u)};
          args.batch = B;
          args.hidden = H;
          args.unit_begin = j0;
          args.unit_end = j1;
          args.row_begin = b0;
          args.row_end = b1;
          run_pointwise_block<Cell>(input, args);
          if (!geo.enabled) {
            hidden_share(c);
            return;
          }
          multiply(ctx_matrix[c], {dgx, (row + b0) * ldx + blocks.row0(u), b1 - b0, blocks.rows(u), ldx},
                   {dctx_share[u], b0 * D, b1 - b0, D, D});
        });
        if (!by_rows && !team.sync()) return;
        if (geo.enabled) {
          team.for_each_block([&](int64_t c) {
            const int64_t u = split.unit_block(c), col = blocks.col0(u), n = blocks.cols(u);
            const auto [b0, b1] = split.rows(c, B);
            if (n > 0) {
              // dctx_t of the block's heads and the thread's rows: the context output's own gradient
              // plus every block's share.
              const T_* grad_ctx = dctx.defined() ? ptr<T_>(dctx) : nullptr;
              if (input.is_cpu()) {
                if constexpr (kCpuType<T_>) {
                  T_* out = ptr<T_>(dctx);
                  const T_* direct = grad_context.defined() ? ptr<T_>(grad_context) + t * slot_size : nullptr;
                  for (int64_t b = b0; b < b1; ++b) {
                    for (int64_t d = col; d < col + n; ++d) {
                      T_ sum = direct != nullptr ? direct[b * D + d] : T_(0);
                      for (const auto& share : dctx_share) sum += ptr<T_>(share)[b * D + d];
                      out[b * D + d] = sum;
                    }
                  }
                }
              } else {
                // One block: its share is the whole of dctx_t.
                TORCH_INTERNAL_ASSERT(blocks.count() == 1);
                if (grad_context.defined()) dctx_share[0].add_(grad_context.select(0, t));
                grad_ctx = ptr<T_>(dctx_share[0]);
              }
              // The block's heads: query gradient into its recurrent-side rows, key and value
              // gradients into the slots. Step k's slot (h before step k) is read by no earlier
              // step: its gradients are final after this pass, which writes them to those rows too.
              T_* rec = ptr<T_>(dgh) + row * ldh + blocks.rec_row0(u) + blocks.rows(u);
              AttentionStepArgs<T_> a = attention_step_args<T_>(geo, blocks, u, B, k, lengths, scratch, sequence,
                                                                queries + k * slot_size, keys, values);
              a.row_begin = b0;
              a.row_end = b1;
              a.staged = SlotRows<T_>{rec, ldh, n, col, nullptr, geo.self_memory ? geo.new_slot(k) : -1};
              a.grad_context = grad_ctx;
              a.grad_context_stride = D;
              a.grad_query = rec - col;  // column d of the block's heads at rec[d - col]
              a.grad_query_stride = ldh;
              a.grad_keys = ptr<T_>(grad_keys);
              a.grad_values = ptr<T_>(grad_values);
              const bool head_major = input.is_cpu();
              a.grad_row_stride = grad_keys.stride(0);
              a.grad_head_stride = grad_keys.stride(head_major ? 1 : 2);
              a.grad_slot_stride = grad_keys.stride(head_major ? 2 : 1);
              run_attention<true>(input, a);
            }
            hidden_share(c);
          });
          if (!by_rows && !team.sync()) return;
        }
        if (k == chunk_end - n) {
          // The chunk is done (split by rows, once every member is): its large GEMMs, then every
          // member is past them before dgx is reused.
          if (by_rows && !team.sync()) return;
          if (!chunk_gradients(team, k, n, chunk_first_time) || !team.sync()) return;
          chunk_end = k;
        }
      }
      if (projected && T > 0) team.for_each_block([&](int64_t c) { carry_projected(c, -1, 0); });
    });
  });
  if (shares && !projected && T > 0) {
    for (const auto& share : dh_shares[(T - 1) % 2]) dstate[0].add_(share);
  }
  if (geo.enabled) {
    // The key and value gradients in the store's layout (B, slots, D).
    auto slot_major = [&](const Tensor& grad) {
      return (input.is_cpu() ? grad.permute({0, 2, 1, 3}) : grad).reshape({B, geo.slots, D});
    };
    grad_keys = slot_major(grad_keys);
    grad_values = slot_major(grad_values);
  }

  RecurrentBackward result;
  result.grad_input = std::move(grad_input);
  // Our kernel wrote torch.nn's order already.
  auto gate_rows = [&](const Tensor& t) { return packed ? t : blocks.unpermute_rows(t); };
  auto rec_rows = [&](const Tensor& t) { return packed ? t : blocks.unpermute_rec_rows(t); };
  result.grad_weight_ih = gate_rows(grad_w_ih);
  result.grad_bias_ih = gate_rows(grad_b_ih);
  grad_w_rec = rec_rows(grad_w_rec);
  const Tensor grad_b_rec_plain = rec_alias ? result.grad_bias_ih.clone() : rec_rows(grad_b_rec);
  result.grad_weight_hh = grad_w_rec.narrow(0, 0, GH);
  result.grad_bias_hh = grad_b_rec_plain.narrow(0, 0, GH);
  result.grad_weight_hr = projected ? grad_w_hr : at::empty({0}, opts);
  if (geo.enabled) {
    // The parts of the stacked weight and bias become separate outputs (outputs must not alias).
    auto rows = [&](const Tensor& t, int64_t group) { return t.narrow(0, GH + group * D, D).clone(); };
    result.grad_weight_hh = result.grad_weight_hh.clone();
    result.grad_bias_hh = result.grad_bias_hh.clone();
    result.grad_weight_q = rows(grad_w_rec, 0);
    result.grad_bias_q = rows(grad_b_rec_plain, 0);
    result.grad_weight_c = gate_rows(grad_w_c);
    if (geo.self_memory) {
      result.grad_weight_k = rows(grad_w_rec, 1);
      result.grad_bias_k = rows(grad_b_rec_plain, 1);
      result.grad_weight_v = rows(grad_w_rec, 2);
      result.grad_bias_v = rows(grad_b_rec_plain, 2);
      result.grad_memory = at::empty({0}, opts);
      const bool past = attention->past_keys.has_value();
      auto past_part = [&](const Tensor& grad) {  // (past, B, D), as given
        return grad.narrow(1, 0, geo.past).transpose(0, 1).clone(at::MemoryFormat::Contiguous);
      };
      result.grad_past_keys = past ? past_part(grad_keys) : at::empty({0}, opts);
      result.grad_past_values = past ? past_part(grad_values) : at::empty({0}, opts);
    } else {
      // External memory: k_s = W_k m_s + b_k for every slot once, so its gradients are one GEMM each.
      const Tensor memory = attention->memory->contiguous();
      const int64_t M = memory.size(2);
      const Tensor m = memory.view({geo.slots * B, M});
      // The gradients in the memory's (S, B) order.
      const Tensor dk = grad_keys.transpose(0, 1).reshape({geo.slots * B, D});
      const Tensor dv = grad_values.transpose(0, 1).reshape({geo.slots * B, D});
      result.grad_weight_k = dk.t().mm(m);
      result.grad_bias_k = dk.sum(0);
      result.grad_weight_v = dv.t().mm(m);
      result.grad_bias_v = dv.sum(0);
      result.grad_memory =
          dk.mm(attention->weight_k).addmm_(dv, attention->weight_v).view({geo.slots, B, M});
      result.grad_past_keys = at::empty({0}, opts);
      result.grad_past_values = at::empty({0}, opts);
    }
  }
  result.grad_initial_states = std::move(dstate);
  return result;
}

// bfloat16 and float16 on the CPU: the CPU kernels are float32, so a call computes in float32 and
// rounds its results back (SPEC: reduced precision computes and accumulates in fp32); the workspace
// stays float32 (workspace_dtype). A bfloat16 layer's packed products, forward and backward, run in
// bfloat16 where the CPU has them (cpu/packed_gemm_bf16.h): its weights are bfloat16 already, the
// forward's products round x and h_{t-1} to bfloat16, as torch.nn's bfloat16 layers hold them, and
// the backward's round the gate gradients (and x and h_{t-1} for dW). The base cells only: the
// attention ops take float32 there.
namespace {
bool reduced_on_cpu(const Tensor& input) {
  return input.is_cpu() && (input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf);
}
Tensor as_float(const Tensor& t) { return t.defined() ? t.to(at::kFloat) : t; }
std::optional<Tensor> as_float(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(as_float(*t)) : std::nullopt;
}
std::vector<Tensor> as_float(const std::vector<Tensor>& ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(as_float(t));
  return out;
}
void round_to(at::ScalarType dtype, Tensor& t) {
  if (t.defined()) t = t.to(dtype);
}
}  // namespace

template <class Cell>
RecurrentForward recurrent_forward(const Tensor& input, const std::vector<Tensor>& initial_states,
                                   const Tensor& weight_ih, const Tensor& weight_hh,
                                   const std::optional<Tensor>& bias_ih, const std::optional<Tensor>& bias_hh,
                                   const std::optional<Tensor>& weight_hr, const std::optional<Tensor>& lengths,
                                   bool reverse, bool training, const AttentionConfig* attention) {
  if (!reduced_on_cpu(input)) {
    return forward_loop<Cell>(input, initial_states, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, lengths,
                              reverse, training, attention, /*bf16_products=*/false);
  }
  TORCH_INTERNAL_ASSERT(attention == nullptr, "rnnattn: the attention cell takes float32 on the CPU");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the casts record nothing, as in the loop
  const bool bf16_products = input.scalar_type() == at::kBFloat16 && cpu::bf16_products_available();
  // W_ih and W_hh go as they are: the loop reads them in place or copies them (weight_in_form).
  RecurrentForward r = forward_loop<Cell>(as_float(input), as_float(initial_states), weight_ih, weight_hh,
                                          as_float(bias_ih), as_float(bias_hh), as_float(weight_hr), lengths, reverse,
                                          training, nullptr, bf16_products);
  round_to(input.scalar_type(), r.output);
  for (Tensor& state : r.final_states) round_to(input.scalar_type(), state);
  return r;  // the workspace stays float32 (workspace_dtype)
}

template <class Cell>
RecurrentBackward recurrent_backward(const Tensor& grad_output, const std::vector<Tensor>& grad_final_states,
                                     const Tensor& input, const std::vector<Tensor>& initial_states,
                                     const Tensor& weight_ih, const Tensor& weight_hh,
                                     const std::optional<Tensor>& weight_hr, const Tensor& output,
                                     const Tensor& workspace, const std::optional<Tensor>& lengths, bool reverse,
                                     const AttentionConfig* attention, const AttentionSaved* saved) {
  if (!reduced_on_cpu(input)) {
    return backward_loop<Cell>(grad_output, grad_final_states, input, initial_states, weight_ih, weight_hh, weight_hr,
                               output, workspace, lengths, reverse, attention, saved, /*bf16_products=*/false);
  }
  TORCH_INTERNAL_ASSERT(attention == nullptr, "rnnattn: the attention cell takes float32 on the CPU");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool bf16_products = input.scalar_type() == at::kBFloat16 && cpu::bf16_products_available();
  RecurrentBackward r = backward_loop<Cell>(as_float(grad_output), as_float(grad_final_states), as_float(input),
                                            as_float(initial_states), as_float(weight_ih), as_float(weight_hh),
                                            as_float(weight_hr), as_float(output), as_float(workspace), lengths,
                                            reverse, nullptr, nullptr, bf16_products);
  for (Tensor* grad : {&r.grad_input, &r.grad_weight_ih, &r.grad_weight_hh, &r.grad_bias_ih, &r.grad_bias_hh,
                       &r.grad_weight_hr}) {
    round_to(input.scalar_type(), *grad);
  }
  for (Tensor& grad : r.grad_initial_states) round_to(input.scalar_type(), grad);
  return r;
}

#define RNNATTN_INSTANTIATE_ENGINE(CELL)                                                                         \
  template RecurrentForward recurrent_forward<CELL>(const Tensor&, const std::vector<Tensor>&, const Tensor&,    \
                                                    const Tensor&, const std::optional<Tensor>&,                 \
                                                    const std::optional<Tensor>&, const std::optional<Tensor>&, \
                                                    const std::optional<Tensor>&, bool, bool,                    \
                                                    const AttentionConfig*);                                     \
  template RecurrentBackward recurrent_backward<CELL>(const Tensor&, const std::vector<Tensor>&, const Tensor&,  \
                                                      const std::vector<Tensor>&, const Tensor&, const Tensor&,  \
                                                      const std::optional<Tensor>&, const Tensor&, const Tensor&, \
                                                      const std::optional<Tensor>&,                               \
                                                      bool, const AttentionConfig*,                               \
                                                      const AttentionSaved*);
RNNATTN_FOR_EACH_CELL(RNNATTN_INSTANTIATE_ENGINE)
#undef RNNATTN_INSTANTIATE_ENGINE

}  // namespace rnnattn
