// Memory for the CPU ops' large outputs (the training forward's workspace, the output sequence,
// the backward's input gradient), kept when they are freed and handed to the next call that asks
// for a block of about the same size, instead of going back to the system.
//
// glibc serves a block over 32 MiB with its own mapping and unmaps it on free, so every call
// page-faulted such an output in anew, a page at a time: an LSTM(512)'s 67 MB workspace at batch
// 64, T=128 spent ~35 ms of a 210 ms training forward in the kernel. A training loop frees each
// call's workspace in its backward, and the next forward asks for the same size again. A call that
// finds no kept block of its size first lets go of the oldest ones, at least as many bytes as it
// asks: the kept memory does not add to the process's peak.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace rnnattn {

// An uninitialised contiguous CPU tensor. From reused memory when it is at least kReusedMinBytes;
// then its storage is resizable as ATen's own.
at::Tensor reused_cpu_empty(at::IntArrayRef sizes, at::ScalarType dtype);

// Below this a block goes to the default CPU allocator (malloc keeps small blocks itself).
constexpr int64_t kReusedMinBytes = int64_t{1} << 20;

// How many bytes of freed blocks are kept: RNNATTN_CPU_KEEP_MB (a non-negative integer, MiB; 0
// keeps nothing), default 1024. Read once; another value raises.
int64_t reused_memory_limit();
// Bytes of freed blocks kept now.
int64_t reused_memory_kept();
// Hands every kept block back to the system (rnnattn_ext.empty_cache()).
void release_reused_memory();
// Holds the blocks' lock for `seconds` (tests of a fork meanwhile).
void hold_reused_memory_lock(double seconds);

}  // namespace rnnattn
