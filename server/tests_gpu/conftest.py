"""GPU tests: run with `make test-gpu` on a CUDA machine with flashinfer installed."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
