"""rnnattn_ext: fused recurrent layers for PyTorch on CPU and CUDA.

``import rnnattn_ext`` loads the compiled library, which registers the ``torch.ops.rnnattn`` operators.
"""

from . import _ops  # noqa: F401  (loads the library, registers fake and autograd implementations)
from . import functional, reference
from .attention_modules import AttentionState, AttnGRU, AttnLSTM, AttnRNN
from .hybrid import HybridBlock
from .modules import GRU, LSTM, RNN

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "AttnLSTM", "AttnGRU", "AttnRNN", "AttentionState", "HybridBlock", "functional",
           "reference", "__version__"]
