"""The EasySpec layer plan: a pure function from (layers, devices, config) to layer groups."""

from __future__ import annotations

import pytest

from workers.easyspec import LayerPlan, assign_ranks, make_layer_plan, validate_groups


def groups(plan: LayerPlan) -> list[list[int]]:
    return plan.to_lists()


def test_default_reproduces_the_32_layer_two_device_example():
    plan = make_layer_plan(32, 2)
    expected = [[0], [1], [2], [3]] + [[i, i + 1] for i in range(4, 28, 2)] + [[28], [29], [30], [31]]
    assert groups(plan) == expected
    assert plan.describe().startswith("[0] [1] [2] [3] [4,5] [6,7]")
    assert plan.describe().endswith("[26,27] [28] [29] [30] [31]")
    assert plan.num_layers == 32 and plan.num_steps == 20 and not plan.is_sequential
    assert len(plan.parallel_groups) == 12


def test_default_on_the_30_layer_default_draft():
    plan = make_layer_plan(30, 2)
    assert groups(plan)[:5] == [[0], [1], [2], [3], [4, 5]]
    assert groups(plan)[-5:] == [[24, 25], [26], [27], [28], [29]]
    assert plan.num_steps == 19


def test_groups_are_at_most_as_wide_as_the_devices_and_the_remainder_is_narrower():
    plan = make_layer_plan(11, 3, sequential_head=1, sequential_tail=1)
    assert groups(plan) == [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]
    plan = make_layer_plan(10, 4, sequential_head=1, sequential_tail=1)
    assert groups(plan) == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    plan = make_layer_plan(9, 4, sequential_head=2, sequential_tail=2, group_width=2)
    assert groups(plan) == [[0], [1], [2, 3], [4, 5], [6], [7], [8]]


@pytest.mark.parametrize("layers,devices,head,tail", [(6, 2, 1, 1), (30, 2, 4, 4), (32, 4, 2, 3), (7, 3, 0, 0)])
def test_every_layer_exactly_once_in_order(layers, devices, head, tail):
    plan = make_layer_plan(layers, devices, sequential_head=head, sequential_tail=tail)
    assert [i for g in plan.groups for i in g] == list(range(layers))
    assert all(len(g) <= devices for g in plan.groups)
    assert all(len(g) == 1 for g in plan.groups[:head])
    assert all(len(g) == 1 for g in plan.groups[len(plan.groups) - tail :])
    assert validate_groups(plan.to_lists(), layers, devices) == plan  # a plan is a valid override of itself


def test_degenerate_plans_are_sequential():
    assert make_layer_plan(5, 1).is_sequential  # one device
    assert make_layer_plan(6, 2).is_sequential  # head 4 + tail 4 cover the model
    assert groups(make_layer_plan(6, 2)) == [[i] for i in range(6)]
    assert groups(make_layer_plan(1, 2, sequential_head=0, sequential_tail=0)) == [[0]]
    assert groups(make_layer_plan(4, 2, sequential_head=0, sequential_tail=0)) == [[0, 1], [2, 3]]


def test_override_is_used_as_given():
    plan = make_layer_plan(6, 2, groups=[[0], [1, 2], [3], [4, 5]])
    assert groups(plan) == [[0], [1, 2], [3], [4, 5]]
    assert plan.parallel_groups == ((1, 2), (4, 5))
    all_sequential = make_layer_plan(4, 2, groups=[[0], [1], [2], [3]])
    assert all_sequential.is_sequential


@pytest.mark.parametrize(
    "override,message",
    [
        ([[0], [1, 2]], "leaves out layers [3]"),
        ([[0], [1, 2], [2, 3]], "appears more than once"),
        ([[0, 1, 2], [3]], "more than the 2 devices"),
        ([[1, 0], [2, 3]], "not a run of consecutive layers"),
        ([[0, 2], [1, 3]], "not a run of consecutive layers"),
        ([[0], [2, 3], [1]], "expected layer 1"),
        ([[0], [1], [2], [3], [4]], "outside [0, 4)"),
        ([[0], [], [1, 2, 3]], "empty"),
        ([], "no groups"),
        ([[0], [1.0], [2, 3]], "not a layer index"),
        ("0,1,2,3", "got the string"),
    ],
)
def test_invalid_overrides_are_refused_with_a_clear_error(override, message):
    with pytest.raises(ValueError) as e:
        make_layer_plan(4, 2, groups=override)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_layers=0, num_devices=2), "num_layers must be >= 1"),
        (dict(num_layers=4, num_devices=0), "num_devices must be >= 1"),
        (dict(num_layers=4, num_devices=2, sequential_head=-1), "sequential_head must be >= 0"),
        (dict(num_layers=4, num_devices=2, sequential_tail=1.5), "sequential_tail must be an integer"),
        (dict(num_layers=8, num_devices=2, group_width=3), "wider than the number of devices"),
        (dict(num_layers=8, num_devices=2, group_width=0), "group_width must be >= 1"),
    ],
)
def test_invalid_configs_are_refused(kwargs, message):
    layers, devices = kwargs.pop("num_layers"), kwargs.pop("num_devices")
    with pytest.raises(ValueError, match=message):
        make_layer_plan(layers, devices, **kwargs)


def test_rank_assignment():
    plan = make_layer_plan(8, 3, sequential_head=1, sequential_tail=1)  # [0] [1,2,3] [4,5,6] [7]
    assert plan.ranks_of((1, 2, 3)) == (0, 1, 2)
    assert plan.layers_of_rank((4, 5, 6), 2) == (6,)
    assert plan.layers_of_rank((0,), 2) == (0,)  # a sequential layer runs on every rank
    assert assign_ranks((5, 6), 3) == (0, 1)  # a narrow group leaves the last rank idle
    owned = {r: [i for g in plan.parallel_groups for i in plan.layers_of_rank(g, r)] for r in range(3)}
    assert owned == {0: [1, 4], 1: [2, 5], 2: [3, 6]}
    with pytest.raises(ValueError, match="only 2 devices"):
        assign_ranks((1, 2, 3), 2)
