// The names of the differentiable ops, from the cell list: per cell "<cell>_forward" and the attention
// cell's "<cell>_attn_forward" (schemas.cpp defines them), each with its "..._backward" op.
#pragma once
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "cells/all_cells.h"

namespace rnnattn {

// Unqualified names ("lstm_forward", "lstm_attn_forward", ...), as torch::Library::impl takes them.
inline std::vector<std::string> forward_op_names() {
  std::vector<std::string> names;
  for (const char* cell : {
#define RNNATTN_CELL_NAME(CELL) CELL::kName,
           RNNATTN_FOR_EACH_CELL(RNNATTN_CELL_NAME)
#undef RNNATTN_CELL_NAME
       }) {
    names.push_back(std::string(cell) + "_forward");
    names.push_back(std::string(cell) + "_attn_forward");
  }
  return names;
}

// "<name>_forward" -> "<name>_backward", qualified or not.
inline std::string backward_op_name(const std::string& forward_name) {
  const std::string suffix = "_forward";
  TORCH_INTERNAL_ASSERT(forward_name.size() > suffix.size() &&
                            forward_name.compare(forward_name.size() - suffix.size(), suffix.size(), suffix) == 0,
                        forward_name, " is not a forward op's name");
  return forward_name.substr(0, forward_name.size() - suffix.size()) + "_backward";
}

}  // namespace rnnattn
