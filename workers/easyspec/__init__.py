"""EasySpec: layer-parallel drafting across devices, with KV calibration.

- plan.py: the layer plan (which layers run side by side), a pure function.
- fuzzy.py: the math of the layer-parallel forward, one rank's share of it.
- cache.py: the draft KV cache that knows which entries are exact.
- draft_model.py: LayerParallelDraftModel, behind DraftEngine's DraftModel
  interface (forward, new_cache, the round hooks), calibration policy, stats.
- ranks.py: the D processes (a rank group, workers/ranks/) and the draft's commands.
"""

from .cache import DraftKVCache
from workers.ranks.channel import ExchangeStats, RankError
from .draft_model import LayerParallelDraftModel, LocalExecutor
from .fuzzy import LayerRunner
from .plan import LayerPlan, assign_ranks, make_layer_plan, plan_of, validate_groups
from .ranks import DraftCheckpoint, DraftRankGroup, RankPlacement

__all__ = [
    "DraftKVCache",
    "DraftCheckpoint",
    "ExchangeStats",
    "LayerParallelDraftModel",
    "LayerPlan",
    "LayerRunner",
    "LocalExecutor",
    "RankError",
    "DraftRankGroup",
    "RankPlacement",
    "assign_ranks",
    "make_layer_plan",
    "plan_of",
    "validate_groups",
]
