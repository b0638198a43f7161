"""What a capture works out from the recorded tasks (pto/host/capture.py): dependencies by
byte overlap (as the broker's live tracking), bytes covered by earlier writes, and the
frozen non-tensor values a replay's arguments must equal."""

from __future__ import annotations

import numpy as np
import pytest

from pto.host.capture import check_frozen, covered, dependencies, frozen_copy
from pto.wire import protocol as P
from pto.wire.args import ParamType as K


def task(*args: tuple[K, int, int, int]) -> P.TaskSpec:
    """A task of (kind, tensor, offset, nbytes) arguments."""
    return P.TaskSpec(0, 0, 1, [P.ArgSpec(int(k), t, o, n) for k, t, o, n in args])


def test_raw_war_waw_and_disjoint_views():
    deps = dependencies([
        task((K.OUTPUT, 1, 0, 64)),                      # 0 writes t1
        task((K.INPUT, 1, 0, 32), (K.OUTPUT, 2, 0, 8)),  # 1 reads t1[0:32]: RAW on 0
        task((K.INPUT, 1, 32, 32)),                      # 2 reads t1[32:64]: RAW on 0
        task((K.OUTPUT, 1, 0, 16)),                      # 3: WAR on 1 (overlap), not 2
        task((K.INOUT, 2, 0, 8)),                        # 4: RAW/WAW on 1
        task((K.NO_DEP, 1, 0, 64)),                      # 5: takes part in nothing
        task((K.SCALAR, -1, 0, 0)),                      # 6: no tensor
        task((K.INPUT, 1, 8, 4)),                        # 7: RAW on 3 and 0 (redundant)
    ])
    assert deps == [set(), {0}, {0}, {0, 1}, {1}, set(), set(), {0, 3}]


def test_a_covering_write_stands_for_the_accesses_it_covers():
    deps = dependencies([task((K.INPUT, 1, 0, 8)), task((K.OUTPUT, 1, 0, 64)),
                         task((K.INPUT, 1, 0, 8))])
    assert deps == [set(), {0}, {1}]


def test_covered_by_earlier_writes():
    assert covered((0, 8), [(0, 4), (4, 8)])
    assert covered((2, 6), [(0, 8)])
    assert not covered((0, 8), [(0, 4), (5, 8)])
    assert not covered((0, 8), [])


def test_frozen_values_must_equal_the_captured_ones():
    x = np.ones(3)
    args = {"x": x, "n": 2, "names": ["a", "b"], "w": np.arange(3.0), "f": float("nan")}
    frozen = frozen_copy(args, {id(x)})
    inputs = {"args['x']"}
    check_frozen(frozen, {**args, "x": np.zeros(3)}, "args", inputs)  # inputs may change
    check_frozen(frozen, dict(args), "args", inputs)
    bad = [({**args, "n": 3}, r"args\['n'\] is 3"),
           ({**args, "n": 2.0}, r"args\['n'\] is 2.0"),
           ({**args, "names": ["a"]}, r"args\['names'\]"),
           ({**args, "w": np.arange(3.0) + 1}, r"args\['w'\]"),
           ({k: v for k, v in args.items() if k != "f"}, "keys")]
    for new, match in bad:
        with pytest.raises(ValueError, match=match):
            check_frozen(frozen, new, "args", inputs)
    args["w"][0] = 9  # the capture kept its own copy
    with pytest.raises(ValueError, match=r"args\['w'\]"):
        check_frozen(frozen, args, "args", inputs)
