// The list of cells the engine is instantiated for. Adding a cell: see csrc/README.md.
#pragma once
#include "cells/gru_cell.h"
#include "cells/lstm_cell.h"
#include "cells/rnn_cell.h"

// X(CellType) for every cell; used for explicit instantiations on each device.
#define RNNATTN_FOR_EACH_CELL(X) \
  X(::rnnattn::LstmCell)         \
  X(::rnnattn::GruCell)          \
  X(::rnnattn::RnnTanhCell)      \
  X(::rnnattn::RnnReluCell)
