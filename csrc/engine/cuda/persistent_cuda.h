// Launchers of the persistent forward and backward loops (engine/persistent_forward.h,
// persistent_backward.h): one cooperative launch runs every step. Torch-free, like the other
// launchers; errors are returned, not thrown.
#pragma once
#include <cuda_runtime_api.h>

#include "engine/persistent_backward.h"

namespace rnnattn::cuda {

// Whether the current device can run the loop for args (the thread blocks of one unit share each
// must fit on the device at once, with their weights in shared memory): fills args.units and
// args.batch_tile and returns true, or returns false (the caller runs the loop step by step).
// args.step.batch, .hidden, .hbias and args.layout.training must be set.
template <class Cell, typename T>
bool plan_persistent_forward(PersistentForwardArgs<T>& args);

// Queues the loop planned by plan_persistent_forward on `stream`.
template <class Cell, typename T>
cudaError_t launch_persistent_forward(const PersistentForwardArgs<T>& args, cudaStream_t stream);

// The same for the backward loop: fills args.units, .batch_tile and .parts; args.step.batch and
// .hidden must be set.
template <class Cell, typename T>
bool plan_persistent_backward(PersistentBackwardArgs<T>& args);

template <class Cell, typename T>
cudaError_t launch_persistent_backward(const PersistentBackwardArgs<T>& args, cudaStream_t stream);

}  // namespace rnnattn::cuda
