"""rnnattn_ext: fused recurrent layers for PyTorch on CPU and CUDA.

``import rnnattn_ext`` loads the compiled library, which registers the ``torch.ops.rnnattn`` operators.
"""

from . import _ops  # noqa: F401  (loads the library, registers the fake implementations)
from . import functional, onnx_export, reference
from .attention_modules import AttentionState, AttnGRU, AttnLSTM, AttnRNN
from .cells import GRUCell, LSTMCell, RNNCell
from .hybrid import HybridBlock, HybridState, HybridStreamer
from .modules import GRU, LSTM, RNN

#: What a module's ``streamer()`` returns: streaming inference, one step per call (see ``LSTM.streamer``).
Streamer = _ops.Streamer

__version__ = "0.1.0"


def library_path() -> str:
    """The compiled library that registers the ``torch.ops.rnnattn`` operators. A process that runs an
    exported or AOTInductor-compiled model without importing rnnattn_ext loads it with
    ``torch.ops.load_library(path)`` (the same torch it was built against)."""
    return _ops._C.__file__


def empty_cache() -> None:
    """Hands back to the system the CPU memory that rnnattn_ext keeps for reuse.

    A CPU op's large outputs (1 MiB and up: the training forward's saved activations, the output
    sequence, the input gradient) take their memory from blocks that earlier calls freed, so that a
    training loop does not map and page-fault them in anew every iteration. Freed blocks are kept up
    to ``RNNATTN_CPU_KEEP_MB`` MiB (default 1024; 0 keeps none); an output that finds none of its size
    lets the oldest go first. Like ``torch.cuda.empty_cache()``, this frees only memory no tensor uses."""
    _ops._C.release_cpu_kept_memory()


__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "AttnLSTM", "AttnGRU", "AttnRNN",
           "AttentionState", "HybridBlock", "HybridState", "HybridStreamer", "Streamer", "functional",
           "onnx_export", "reference", "library_path", "empty_cache", "__version__"]
