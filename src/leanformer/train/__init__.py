"""Knowledge distillation: a student (fewer layers, pruned, or any model with the teacher's vocabulary)
trained to imitate a teacher. distill.py (the loop), losses.py, data.py, checkpoint.py, student.py."""

from leanformer.train.distill import DistillConfig, DistillResult, distill
from leanformer.train.losses import LossWeights
from leanformer.train.student import keep_layers_, make_student

__all__ = ["DistillConfig", "DistillResult", "LossWeights", "distill", "keep_layers_", "make_student"]
