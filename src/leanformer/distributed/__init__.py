"""Running one model across processes over torch.distributed (gloo on CPU): tensor parallel (heads and
MLP channels split, two all-reduces per layer) and pipeline parallel (layers split)."""

from leanformer.distributed.launch import join, shared_seed
from leanformer.distributed.pipeline import Stage, pipeline_
from leanformer.distributed.tensor_parallel import AllReduceLinear, check_tp, parallelize_

__all__ = ["AllReduceLinear", "Stage", "check_tp", "join", "parallelize_", "pipeline_", "shared_seed"]
