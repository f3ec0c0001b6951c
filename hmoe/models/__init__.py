"""Models: the HMoE graph (sets -> experts -> gates -> towers), its typed config and presets.

    model = hmoe.models.preset("stem", schema, tasks=["click", "buy"])
    out = model(batch)                   # {"logits": {task: (B,)}, "aux_losses": {}, ...}

See hmoe.models.hmoe for the math, hmoe.models.config for the YAML keys and
hmoe.models.presets for the named configurations (``PRESETS``).
"""

from hmoe.models.config import EmbeddingSetConfig, ExpertConfig, ModelConfig, TaskConfig
from hmoe.models.hmoe import HMoE, SetSlice
from hmoe.models.presets import PRESETS, preset, preset_config, preset_knobs

__all__ = ["PRESETS", "EmbeddingSetConfig", "ExpertConfig", "HMoE", "ModelConfig", "SetSlice",
           "TaskConfig", "preset", "preset_config", "preset_knobs"]
