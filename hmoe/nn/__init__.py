"""Drop-in layers: plain tensors in, plain tensors out."""

from hmoe.nn.experts import IPNN, MLP, CrossLayerV2, DCNv2, FlatDNN, GwPFM
from hmoe.nn.gates import LearnedWeightGate, MeanGate, SoftmaxGate, mix, stack_experts
from hmoe.nn.mnse import MNSE
from hmoe.nn.multi_embedding import MultiEmbedding
from hmoe.nn.quantize import AffineQuantizer, LogQuantizer, QuantileQuantizer, Quantizer
from hmoe.nn.sequence import DINAttention, Dice, MeanPooling, SelfAttentionTarget, time_buckets
from hmoe.nn.similarity import SimHashID, SimilarityEncoder
from hmoe.nn.tim import TemporalInterest
from hmoe.nn.vocab import DynamicVocab, HashVocab

__all__ = ["AffineQuantizer", "CrossLayerV2", "DCNv2", "DINAttention", "Dice", "FlatDNN", "GwPFM",
           "IPNN", "LogQuantizer", "MLP", "MNSE", "MeanPooling", "MultiEmbedding",
           "QuantileQuantizer", "Quantizer", "SelfAttentionTarget", "SimHashID",
           "SimilarityEncoder", "TemporalInterest", "time_buckets"]
__all__ += ["DynamicVocab", "HashVocab"]
__all__ += ["LearnedWeightGate", "MeanGate", "SoftmaxGate", "mix", "stack_experts"]
