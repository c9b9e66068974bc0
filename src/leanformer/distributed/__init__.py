"""Running one model across processes: tensor parallel over torch.distributed (gloo on CPU)."""

from leanformer.distributed.launch import join, shared_seed
from leanformer.distributed.tensor_parallel import AllReduceLinear, check_tp, parallelize_

__all__ = ["AllReduceLinear", "check_tp", "join", "parallelize_", "shared_seed"]
