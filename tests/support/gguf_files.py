"""Writing GGUF test files with gguf's own ``GGUFWriter``. Import after ``pytest.importorskip("gguf")``."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def add_and_write(w: gguf.GGUFWriter, path: Path, tensors: dict[str, np.ndarray],
                  quant: dict | None = None) -> Path:
    """Add ``tensors`` to the writer (those named in ``quant`` quantized to that ggml type by gguf's
    own quantizer), write the file and close it.

    Returns:
        ``path``, the file written.
    """
    for name, arr in tensors.items():
        qtype = (quant or {}).get(name)
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
