"""Encoders (BERT family): embeddings, classification and probes, quality tasks, head pruning.

Importing this package registers the encoder builder with loading, so `leanformer.load` on a BERT-family
folder returns a ready embedding / classification model.
"""

from leanformer.encoders.build import load_encoder
from leanformer.encoders.embed import classify, embed
from leanformer.encoders.probe import train_probe
from leanformer.encoders.prune_heads import head_importance, prune_heads_, prune_heads_auto_

__all__ = [
    "classify",
    "embed",
    "head_importance",
    "load_encoder",
    "prune_heads_",
    "prune_heads_auto_",
    "train_probe",
]
