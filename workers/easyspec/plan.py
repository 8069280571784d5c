"""The layer plan: which draft layers run one after another, which side by side.

A plan is a tuple of groups, each a tuple of consecutive layer indices. A group
of one layer runs as usual (sequentially, on every rank); a group of w > 1
layers is a parallel group: every layer in it reads the SAME group input and
their residual contributions are summed (see fuzzy.py). Layer j of a parallel
group runs on rank j, so a group is at most as wide as the number of devices.

    make_layer_plan(32, 2)  ->  [0] [1] [2] [3] [4,5] [6,7] ... [26,27] [28] [29] [30] [31]

The first and last layers stay sequential by default: they move the hidden
state the most (embedding-like early layers, logit-shaping late ones), so
running them on approximate inputs costs the most acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from configs.loader import EasySpecConfig

LayerGroup = tuple[int, ...]

# ALGORITHMS.md's example (32 layers, D=2) keeps four layers sequential at each end.
DEFAULT_SEQUENTIAL_HEAD = EasySpecConfig.sequential_head
DEFAULT_SEQUENTIAL_TAIL = EasySpecConfig.sequential_tail


@dataclass(frozen=True)
class LayerPlan:
    groups: tuple[LayerGroup, ...]
    num_devices: int

    @property
    def num_layers(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def num_steps(self) -> int:
        """Layer steps on the critical path of a fuzzy forward (one per group)."""
        return len(self.groups)

    @property
    def is_sequential(self) -> bool:
        """True when no group runs layers side by side (the plan is the exact model)."""
        return all(len(g) == 1 for g in self.groups)

    @property
    def parallel_groups(self) -> tuple[LayerGroup, ...]:
        return tuple(g for g in self.groups if len(g) > 1)

    def ranks_of(self, group: LayerGroup) -> tuple[int, ...]:
        """The rank that computes each layer of a group (see assign_ranks)."""
        return assign_ranks(group, self.num_devices)

    def layers_of_rank(self, group: LayerGroup, rank: int) -> tuple[int, ...]:
        """The layers of `group` that `rank` computes; a sequential group runs on every rank."""
        if len(group) == 1:
            return group
        return tuple(layer for layer, r in zip(group, self.ranks_of(group)) if r == rank)

    def describe(self) -> str:
        return " ".join("[" + ",".join(str(i) for i in g) + "]" for g in self.groups)

    def to_lists(self) -> list[list[int]]:
        """Plain data (a config's `groups` override reproduces this plan)."""
        return [list(g) for g in self.groups]

    def __str__(self) -> str:
        return self.describe()


def assign_ranks(group: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Rank of each layer in a group: layer j of the group runs on rank j.

    A sequential group (one layer) is computed by every rank; it is reported as rank 0.
    """
    if len(group) > num_devices:
        raise ValueError(f"group {list(group)} has {len(group)} layers but there are only {num_devices} devices")
    return tuple(range(len(group)))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def make_layer_plan(
    num_layers: int,
    num_devices: int,
    *,
    sequential_head: int = DEFAULT_SEQUENTIAL_HEAD,
    sequential_tail: int = DEFAULT_SEQUENTIAL_TAIL,
    group_width: int | None = None,
    groups: Iterable[Iterable[int]] | None = None,
) -> LayerPlan:
    """The layer plan for a draft of `num_layers` layers over `num_devices` devices.

    Default: the first `sequential_head` and last `sequential_tail` layers one by
    one, the middle ones in consecutive groups of `group_width` (default
    num_devices; the last middle group may be narrower). When head + tail cover
    the model, or with one device, every layer is sequential.

    `groups` overrides all of that; it is validated (see validate_groups).
    """
    _check_int("num_layers", num_layers, 1)
    _check_int("num_devices", num_devices, 1)
    if groups is not None:
        return validate_groups(groups, num_layers, num_devices)
    _check_int("sequential_head", sequential_head, 0)
    _check_int("sequential_tail", sequential_tail, 0)
    width = num_devices if group_width is None else _check_int("group_width", group_width, 1)
    if width > num_devices:
        raise ValueError(f"group_width {width} is wider than the number of devices {num_devices}")
    head = min(sequential_head, num_layers)
    tail = min(sequential_tail, num_layers - head)
    middle = range(head, num_layers - tail)
    plan: list[LayerGroup] = [(i,) for i in range(head)]
    plan += [tuple(middle[j : j + width]) for j in range(0, len(middle), width)]
    plan += [(i,) for i in range(num_layers - tail, num_layers)]
    return LayerPlan(tuple(plan), num_devices)


def validate_groups(groups: Iterable[Iterable[int]], num_layers: int, num_devices: int) -> LayerPlan:
    """Check an explicit plan: every layer exactly once, in order, groups contiguous and <= devices wide."""
    _check_int("num_layers", num_layers, 1)
    _check_int("num_devices", num_devices, 1)
    if isinstance(groups, (str, bytes)):
        raise ValueError(f"layer groups must be a list of lists of layer indices, got the string {groups!r}")
    try:
        plan = [tuple(g) for g in groups]
    except TypeError:
        raise ValueError(f"layer groups must be a list of lists of layer indices, got {groups!r}") from None
    if not plan:
        raise ValueError("layer plan has no groups")
    seen: set[int] = set()
    expected = 0
    for n, group in enumerate(plan):
        if not group:
            raise ValueError(f"layer group {n} is empty")
        for layer in group:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(f"layer group {n} holds {layer!r}, not a layer index")
            if not 0 <= layer < num_layers:
                raise ValueError(f"layer group {n} names layer {layer}, outside [0, {num_layers})")
            if layer in seen:
                raise ValueError(f"layer {layer} appears more than once in the layer plan")
            seen.add(layer)
        if len(group) > num_devices:
            raise ValueError(
                f"layer group {n} {list(group)} has {len(group)} layers, more than the {num_devices} devices"
            )
        if list(group) != list(range(group[0], group[0] + len(group))):
            raise ValueError(f"layer group {n} {list(group)} is not a run of consecutive layers in order")
        if group[0] != expected:
            raise ValueError(
                f"layer group {n} {list(group)} starts at layer {group[0]}, expected layer {expected} "
                "(groups must cover the layers in order)"
            )
        expected = group[-1] + 1
    if expected != num_layers:
        missing = sorted(set(range(num_layers)) - seen)
        raise ValueError(f"layer plan leaves out layers {missing}")
    return LayerPlan(tuple(plan), num_devices)


def plan_of(config: EasySpecConfig, num_layers: int, num_devices: int) -> LayerPlan:
    """The layer plan an `easyspec` config gives a draft of num_layers over num_devices."""
    return make_layer_plan(
        num_layers,
        num_devices,
        sequential_head=config.sequential_head,
        sequential_tail=config.sequential_tail,
        groups=config.groups or None,
    )
