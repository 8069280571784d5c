"""Rank groups: one model over several processes (rank 0 in the worker, followers spawned).

- group.py: the bootstrap (spawn, place, follow commands, notice failures, shut down).
- channel.py: how the ranks exchange commands, sums and gathers (shared memory, gloo, NCCL).
- commands.py: what rank 0 tells the followers, one struct per command.
- rendezvous.py: where the ranks meet (a file store on one host, rank 0's TCPStore
  across hosts), the handshake, and the heartbeats of ranks rank 0 did not spawn.

Users: the layer-parallel draft (workers/easyspec/ranks.py) and the
tensor-parallel target (workers/tensor_parallel.py).
"""

from .channel import Channel, ExchangeStats, RankError
from .group import FollowerProgram, RankGroup, RankPlacement, pick_channel

__all__ = ["Channel", "ExchangeStats", "FollowerProgram", "RankError", "RankGroup", "RankPlacement", "pick_channel"]
