// Runs the block phases of CUDA's persistent forward and backward loops (csrc/engine/
// persistent_forward.h, persistent_backward.h) on the host: every thread of every block in turn,
// phase by phase in the order the kernels' barriers impose, and compares everything the loops write
// (states, outputs, saved activations; gate gradients, carried state gradients) with plain loops
// over the same cell math. Blocks, batch tiles, parts of the backward's sums and thread counts are
// varied so that every partition of the work is covered. Built and run by tests/test_persistent_loop.py;
// prints one line, exits 1 on a mismatch.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <vector>

#include "cells/all_cells.h"
#include "engine/persistent_backward.h"

namespace {

using namespace rnnattn;

struct Case {
  int64_t steps, batch, hidden, units, tile, threads, parts;
  bool training, reverse, lengths, bias;
};

template <typename T>
std::vector<T> random_values(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  std::vector<T> v(n);
  for (auto& x : v) x = T(uniform(rng));
  return v;
}

// Each row's length in [1, steps] when the case has lengths, else steps.
std::vector<int64_t> random_lengths(const Case& c, std::mt19937& rng) {
  std::vector<int64_t> lengths(c.batch, c.steps);
  if (c.lengths) {
    for (auto& l : lengths) l = 1 + int64_t(rng() % uint64_t(c.steps));
  }
  return lengths;
}

// One forward pass's buffers and their layout.
template <class Cell, typename T>
struct Pass {
  static constexpr int S = Cell::kStates, planes = Cell::kSaved + Cell::kStates - 1;
  std::vector<T> output, workspace, alternate[kMaxStates][2];
  ForwardLayout<T> layout{};

  Pass(const Case& c, const std::vector<T>* initial) {
    const int64_t plane = c.batch * c.hidden;
    output.assign(c.steps * plane, T(-7));
    workspace.assign(c.training ? c.steps * planes * plane : 0, T(-7));
    layout.output = output.data();
    layout.workspace = c.training ? workspace.data() : nullptr;
    layout.planes = planes;
    layout.training = c.training;
    layout.reverse = c.reverse;
    layout.steps = c.steps;
    layout.plane = plane;
    for (int s = 0; s < S; ++s) {
      layout.initial[s] = initial[s].data();
      layout.plane_of[s] = s == 0 ? -1 : Cell::kSaved + s - 1;
      for (int i = 0; i < 2 && s > 0 && !c.training; ++i) {
        alternate[s][i].assign(plane, T(-7));
        layout.alternate[s][i] = alternate[s][i].data();
      }
    }
  }
  Pass(const Pass&) = delete;
};

template <class Cell, typename T, bool kSave, StepExtra kExtra>
void plain_loop(const Case& c, const ForwardStepArgs<T>& base, const std::vector<T>& weight, Pass<Cell, T>& pass) {
  const int64_t B = c.batch, H = c.hidden, GH = Cell::kGates * H;
  std::vector<T> hproj(B * GH);
  for (int64_t k = 0; k < c.steps; ++k) {
    ForwardStepArgs<T> a = base;
    pass.layout.template fill<Cell::kStates>(a, k);
    a.xproj.ptr += a.time * B * GH;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t r = 0; r < GH; ++r) {
        double sum = 0;
        for (int64_t i = 0; i < H; ++i) sum += double(a.prev[0][b * H + i]) * double(weight[r * H + i]);
        hproj[b * GH + r] = T(sum);
      }
    }
    a.hproj = GateView<const T>{hproj.data(), GH, H};
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < H; ++j) {
        if (row_active(a, b)) {
          forward_unit<Cell, T, kSave, kExtra>(a, b, j);
        } else {
          hold_forward_unit<Cell, T>(a, b, j);
        }
      }
    }
  }
}

template <class Cell, typename T, bool kSave, StepExtra kExtra>
void emulated_kernel(const Case& c, const ForwardStepArgs<T>& base, const std::vector<T>& weight,
                     Pass<Cell, T>& pass) {
  PersistentForwardArgs<T> args{};
  args.step = base;
  args.layout = pass.layout;
  args.weight = weight.data();
  args.units = c.units;
  args.batch_tile = c.tile;
  using Block = PersistentForwardBlock<Cell, T, kSave, kExtra>;
  const int64_t blocks = persistent_blocks(c.hidden, c.units);
  const int64_t bytes = persistent_shared_bytes<Cell, T>(c.batch, c.hidden, c.units, c.tile);
  std::vector<std::vector<double>> shared(blocks, std::vector<double>(bytes / sizeof(double) + 1, -7.0));
  std::vector<std::unique_ptr<Block>> block;
  for (int64_t i = 0; i < blocks; ++i) block.push_back(std::make_unique<Block>(args, i, shared[i].data()));
  for (auto& b : block) {
    for (int64_t t = 0; t < c.threads; ++t) b->load_weights(t, c.threads);
  }
  for (int64_t k = 0; k < c.steps; ++k) {
    const T* h_prev = args.layout.before(k, 0);
    for (int64_t b0 = 0; b0 < c.batch; b0 += c.tile) {
      const int64_t n = std::min(c.tile, c.batch - b0);
      for (auto& b : block) {
        for (int64_t t = 0; t < c.threads; ++t) b->stage_rows(h_prev, b0, n, t, c.threads);
        for (int64_t t = 0; t < c.threads; ++t) b->multiply_rows(b0, n, t, c.threads);
      }
    }
    for (auto& b : block) {
      for (int64_t t = 0; t < c.threads; ++t) b->pointwise(k, t, c.threads);
    }
  }
}

// The largest difference, relative to the expected value where that exceeds 1.
template <typename T>
double max_difference(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i])) / std::max(1.0, std::fabs(double(a[i])));
    worst = std::isnan(d) ? INFINITY : std::max(worst, d);
  }
  return worst;
}

// The largest difference between the two loops over every buffer the pass writes.
template <class Cell, typename T, bool kSave, StepExtra kExtra>
double compare(const Case& c, std::mt19937& rng) {
  constexpr int G = Cell::kGates, S = Cell::kStates;
  const int64_t B = c.batch, H = c.hidden;
  const std::vector<T> xproj = random_values<T>(c.steps * B * G * H, rng), weight = random_values<T>(G * H * H, rng),
                       bias = random_values<T>(G * H, rng);
  std::vector<T> initial[kMaxStates];
  for (int s = 0; s < S; ++s) initial[s] = random_values<T>(B * H, rng);
  const std::vector<int64_t> lengths = random_lengths(c, rng);
  ForwardStepArgs<T> base{};
  base.xproj = GateView<const T>{xproj.data(), G * H, H};
  if (kExtra == StepExtra::hidden_bias) base.hbias = GateView<const T>{bias.data(), 0, H};
  base.lengths = c.lengths ? lengths.data() : nullptr;
  base.batch = B;
  base.hidden = H;
  base.unit_begin = 0;
  base.unit_end = H;
  Pass<Cell, T> expected(c, initial), got(c, initial);
  plain_loop<Cell, T, kSave, kExtra>(c, base, weight, expected);
  emulated_kernel<Cell, T, kSave, kExtra>(c, base, weight, got);
  double worst = std::max(max_difference(expected.output, got.output), max_difference(expected.workspace, got.workspace));
  for (int s = 1; s < S; ++s) {
    for (int i = 0; i < 2; ++i) worst = std::max(worst, max_difference(expected.alternate[s][i], got.alternate[s][i]));
  }
  return worst;
}

// The backward loops over random saved states (both read the same): gate gradients and the carried
// state gradients.
template <class Cell, typename T>
double compare_backward(const Case& c, std::mt19937& rng) {
  constexpr int G = Cell::kGates, S = Cell::kStates;
  const int64_t B = c.batch, H = c.hidden, GH = G * H, plane = B * H;
  const bool separate = Cell::kSeparateHiddenGrad;
  const std::vector<T> grad_output = random_values<T>(c.steps * plane, rng), weight = random_values<T>(GH * H, rng);
  std::vector<T> initial[kMaxStates], carried[kMaxStates];
  for (int s = 0; s < S; ++s) {
    initial[s] = random_values<T>(plane, rng);
    carried[s] = random_values<T>(plane, rng);
  }
  const std::vector<int64_t> lengths = random_lengths(c, rng);
  // A training forward's buffers, random: both loops read the same.
  Case training = c;
  training.training = true;
  Pass<Cell, T> forward(training, initial);
  // Written in place: the layout points into these buffers.
  for (std::vector<T>* buffer : {&forward.output, &forward.workspace}) {
    const std::vector<T> values = random_values<T>(buffer->size(), rng);
    std::copy(values.begin(), values.end(), buffer->begin());
  }
  const ForwardLayout<T>& layout = forward.layout;
  // What each loop writes: gate gradients and the carried state gradients.
  struct Written {
    std::vector<T> dxg, dhg, dstate[kMaxStates];
  } expected, got;
  BackwardStepArgs<T> base[2]{};
  Written* runs[2] = {&expected, &got};
  for (int i = 0; i < 2; ++i) {
    Written& w = *runs[i];
    w.dxg.assign(c.steps * B * GH, T(-7));
    w.dhg.assign(separate ? c.steps * B * GH : 0, T(-7));
    for (int s = 0; s < S; ++s) {
      w.dstate[s] = carried[s];
      base[i].dstate[s] = w.dstate[s].data();
    }
    base[i].dxg = GateView<T>{w.dxg.data(), GH, H};
    if (separate) base[i].dhg = GateView<T>{w.dhg.data(), GH, H};
    base[i].lengths = c.lengths ? lengths.data() : nullptr;
    base[i].batch = B;
    base[i].hidden = H;
    base[i].unit_begin = 0;
    base[i].unit_end = H;
  }
  // The plain loop: the whole step's cell backward, then dh_{t-1} += dg_t @ W_hh.
  for (int64_t k = c.steps - 1; k >= 0; --k) {
    BackwardStepArgs<T> a = base[0];
    layout.template fill<S>(a, k);
    a.grad_output = grad_output.data() + a.time * plane;
    a.dxg.ptr += a.time * B * GH;
    if (separate) a.dhg.ptr += a.time * B * GH;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < H; ++j) {
        if (row_active(a, b)) {
          backward_unit<Cell, T>(a, b, j);
        } else {
          hold_backward_unit<Cell, T>(a, b, j);
        }
      }
    }
    const T* rec = (separate ? expected.dhg : expected.dxg).data() + a.time * B * GH;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < H; ++j) {
        double sum = 0;
        for (int64_t r = 0; r < GH; ++r) sum += double(rec[b * GH + r]) * double(weight[r * H + j]);
        expected.dstate[0][b * H + j] = T(double(expected.dstate[0][b * H + j]) + sum);
      }
    }
  }
  // The emulated kernel.
  PersistentBackwardArgs<T> args{};
  args.step = base[1];
  args.layout = layout;
  args.grad_output = grad_output.data();
  args.weight = weight.data();
  args.units = c.units;
  args.batch_tile = c.tile;
  args.parts = c.parts;
  using Block = PersistentBackwardBlock<Cell, T>;
  const int64_t blocks = persistent_blocks(H, c.units);
  const int64_t bytes = persistent_backward_shared_bytes<Cell, T>(H, c.units, c.tile, c.parts);
  std::vector<std::vector<double>> shared(blocks, std::vector<double>(bytes / sizeof(double) + 1, -7.0));
  std::vector<std::unique_ptr<Block>> block;
  for (int64_t i = 0; i < blocks; ++i) block.push_back(std::make_unique<Block>(args, i, shared[i].data()));
  for (auto& b : block) {
    for (int64_t t = 0; t < c.threads; ++t) b->load_weights(t, c.threads);
  }
  for (int64_t k = c.steps - 1; k >= 0; --k) {
    for (auto& b : block) {
      for (int64_t t = 0; t < c.threads; ++t) b->pointwise(k, t, c.threads);
    }
    for (int64_t b0 = 0; b0 < B; b0 += c.tile) {
      const int64_t n = std::min(c.tile, B - b0);
      for (auto& b : block) {
        for (int64_t t = 0; t < c.threads; ++t) b->stage_rows(k, b0, n, t, c.threads);
        for (int64_t t = 0; t < c.threads; ++t) b->multiply_rows(n, t, c.threads);
        for (int64_t t = 0; t < c.threads; ++t) b->accumulate_rows(b0, n, t, c.threads);
      }
    }
  }
  double worst = std::max(max_difference(expected.dxg, got.dxg), max_difference(expected.dhg, got.dhg));
  for (int s = 0; s < S; ++s) worst = std::max(worst, max_difference(expected.dstate[s], got.dstate[s]));
  return worst;
}

template <class Cell, typename T>
double compare_variant(const Case& c, std::mt19937& rng) {
  if (c.training) {
    return c.bias ? compare<Cell, T, true, StepExtra::hidden_bias>(c, rng) : compare<Cell, T, true, StepExtra::none>(c, rng);
  }
  return c.bias ? compare<Cell, T, false, StepExtra::hidden_bias>(c, rng) : compare<Cell, T, false, StepExtra::none>(c, rng);
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  int cases = 0, failures = 0;
  double worst_float = 0, worst_double = 0;
  // hidden, units: one unit per block, several, a last block with fewer, one block for all.
  const int64_t shapes[][2] = {{1, 1}, {5, 2}, {8, 3}, {13, 4}, {13, 16}, {6, 1}};
  const int64_t batches[] = {1, 3, 6, 9};
  const int64_t thread_counts[] = {1, 7, 64};
  for (const auto& shape : shapes) {
    for (const int64_t batch : batches) {
      // A tile of the whole batch, and tiles of 4 rows (the kernel's smaller tiles are multiples of 4).
      for (const int64_t tile : {batch, int64_t(4)}) {
        if (tile > batch) continue;
        for (int flags = 0; flags < 16; ++flags) {
          const int64_t threads = thread_counts[(cases / 3) % 3];
          const int64_t parts = 1 + (cases % 4);
          const Case c{1 + (flags % 3 == 0 ? 0 : 4), batch, shape[0], shape[1], tile, threads, parts,
                       (flags & 1) != 0, (flags & 2) != 0, (flags & 4) != 0, (flags & 8) != 0};
          const double d[] = {
              compare_variant<LstmCell, double>(c, rng), compare_variant<GruCell, double>(c, rng),
              compare_variant<RnnTanhCell, double>(c, rng), compare_variant<RnnReluCell, double>(c, rng),
              compare_backward<LstmCell, double>(c, rng), compare_backward<GruCell, double>(c, rng),
              compare_backward<RnnTanhCell, double>(c, rng), compare_backward<RnnReluCell, double>(c, rng)};
          const double f[] = {compare_variant<LstmCell, float>(c, rng), compare_variant<GruCell, float>(c, rng),
                              compare_variant<RnnTanhCell, float>(c, rng), compare_backward<LstmCell, float>(c, rng),
                              compare_backward<GruCell, float>(c, rng)};
          for (const double v : d) worst_double = std::max(worst_double, v);
          for (const double v : f) worst_float = std::max(worst_float, v);
          const bool bad = *std::max_element(std::begin(d), std::end(d)) > 1e-12 ||
                           *std::max_element(std::begin(f), std::end(f)) > 1e-4;
          if (bad && failures++ < 5) {
            std::printf("mismatch: steps %lld batch %lld hidden %lld units %lld tile %lld threads %lld parts %lld "
                        "training %d reverse %d lengths %d bias %d\n",
                        (long long)c.steps, (long long)c.batch, (long long)c.hidden, (long long)c.units,
                        (long long)c.tile, (long long)c.threads, (long long)c.parts, c.training, c.reverse,
                        c.lengths, c.bias);
          }
          ++cases;
        }
      }
    }
  }
  std::printf("%d cases, %d mismatched; largest (relative) difference float64 %.3g, float32 %.3g\n", cases, failures,
              worst_double, worst_float);
  return failures == 0 ? 0 : 1;
}
