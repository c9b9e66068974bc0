"""Encoders (BERT family): embeddings (dense, local or LSH attention), classification and probes, quality
tasks, head pruning and structured (heads + FFN) pruning.

Importing this package registers the encoder builder with loading, so `leanformer.load` on a BERT-family
folder returns a ready embedding / classification model.
"""

from leanformer.encoders.build import load_encoder
from leanformer.encoders.embed import classify, embed
from leanformer.encoders.probe import train_probe
from leanformer.encoders.prune_encoder import prune_encoder_, prune_ffn_
from leanformer.encoders.prune_heads import head_importance, prune_heads_, prune_heads_auto_

__all__ = [
    "classify",
    "embed",
    "head_importance",
    "load_encoder",
    "prune_heads_",
    "prune_heads_auto_",
    "prune_encoder_",
    "prune_ffn_",
    "train_probe",
]
