"""Unit tests of the L4 structures (no Ray): Refs in args -> template + slots -> filled on
the host; descriptors in results; errors that pickle by their fields; the trace layout."""

from __future__ import annotations

import gc
import pickle
from collections import namedtuple

import pytest

import pto
from pto.cluster.errors import HostLostError, HostTaskError, is_root
from pto.cluster.refs import (
    Ref,
    RunOutput,
    TensorDesc,
    _Slot,
    fill,
    follow,
    instances_in,
    map_instances,
    split_refs,
)
from pto.cluster.trace import build_events

Pair = namedtuple("Pair", "a b")


def _output(owner, run_id=1, host=0, released=None):
    release = (lambda h, r, copies: released.append((h, r))) if released is not None else (
        lambda h, r, copies: None)
    return RunOutput(owner, run_id, host, "entry", release=release)


def _desc(host=0, run=1, i=0):
    return TensorDesc(host, (run, i), f"/pto_x_{run}_{i}", (2, 3), "<f4", 0, 24)


def test_refs_in_args_become_slots_one_per_output():
    owner = object()
    a, b = _output(owner, 1), _output(owner, 2)
    args = {"x": Ref(a), "parts": [Ref(a)[0], Ref(b)["k"], 3], "pair": Pair(Ref(b), "s")}
    template, outputs = split_refs(args, owner)
    assert outputs == [a, b]
    assert template == {"x": _Slot(0, ()), "parts": [_Slot(0, (0,)), _Slot(1, ("k",)), 3],
                        "pair": Pair(_Slot(1, ()), "s")}
    assert isinstance(template["pair"], Pair)


def test_the_host_fills_the_template_with_the_resolved_values():
    owner = object()
    a, b = _output(owner, 1), _output(owner, 2)
    template, _ = split_refs([Ref(a), Ref(a)[1], Ref(b)["k"], (Ref(b)["k"], 7)], owner)
    d = _desc()
    values = (["first", d], {"k": 5})
    assert fill(template, values) == [["first", d], d, 5, (5, 7)]


def test_a_ref_of_another_runtime_is_refused():
    with pytest.raises(ValueError, match="another pto cluster runtime"):
        split_refs([Ref(_output(object()))], object())


def test_a_missing_path_names_what_was_missing():
    with pytest.raises(KeyError, match=r"no \['nope'\]"):
        follow({"k": 1}, ("nope",), "ref")
    with pytest.raises(IndexError, match=r"no \[5\]"):
        follow([1, 2], (5,), "ref")
    with pytest.raises(KeyError, match=r"no \[0\]"):
        follow(3.5, (0,), "ref")


def test_descriptors_are_mapped_through_nested_structures():
    d0, d1 = _desc(run=1), _desc(run=2)
    value = {"a": [d0, Pair(d1, 1)], "b": "text"}
    assert instances_in(value, TensorDesc) == [d0, d1]
    mapped = map_instances(value, TensorDesc, lambda d: d.key)
    assert mapped == {"a": [(1, 0), Pair((2, 0), 1)], "b": "text"}


def test_ref_indexing_and_its_errors():
    ref = Ref(_output(object(), host=1))
    assert ref.host == 1
    assert ref[0]["k"]._path == (0, "k")
    assert "on host 1" in repr(ref[0])
    with pytest.raises(TypeError, match="indexed by an int or a str"):
        ref[1.5]
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(ref)


def test_the_host_is_told_once_the_last_ref_to_an_output_is_gone():
    released: list[tuple[int, int]] = []
    out = _output(object(), run_id=7, host=1, released=released)
    ref, part = Ref(out), Ref(out)[0]
    del out
    del ref
    gc.collect()
    assert released == []  # ``part`` still names the run
    del part
    gc.collect()
    assert released == [(1, 7)]


def test_host_errors_pickle_with_their_fields_and_name_the_host():
    err = pickle.loads(pickle.dumps(HostTaskError(1, "scale", 0, "boom", failed=3, run=9)))
    assert isinstance(err, pto.TaskError)
    assert (err.host, err.kernel, err.chip, err.reason, err.failed, err.run) == (
        1, "scale", 0, "boom", 3, 9)
    assert str(err).startswith("on host 1: kernel 'scale' failed on chip 0: boom")
    lost = pickle.loads(pickle.dumps(HostLostError(2, "node died", run=4)))
    assert isinstance(lost, pto.HostLost) and lost.host == 2 and lost.run == 4
    assert "host 2 was lost: node died" in str(lost)


def test_a_root_failure_is_told_from_one_propagated_to_a_dependent():
    err = HostTaskError(1, "k", 0, "boom", run=3)
    assert is_root(err, 3, host=1)
    assert not is_root(err, 4, host=0)
    dead = HostLostError(1, "actor died")  # made on the driver: no run id
    assert is_root(dead, 5, host=1) and not is_root(dead, 6, host=0)
    own = ValueError("in the orchestration")
    own._pto_run = 8
    assert is_root(own, 8, host=0) and not is_root(own, 9, host=0)


def test_the_trace_has_a_process_per_host_with_runs_transfers_and_chips():
    hosts = [
        {"host": 0, "offset": 1000.0,
         "runs": [{"run": 1, "entry": "produce", "start": 1.0, "end": 1.5, "error": None}],
         "transfers": [],
         "chips": [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "pto"}},
                   {"ph": "X", "name": "fill", "pid": 1, "tid": 1, "ts": 1.1e6, "dur": 10.0},
                   {"ph": "s", "id": 1, "pid": 1, "tid": 1, "ts": 1.2e6}]},
        {"host": 1, "offset": 1000.0,
         "runs": [{"run": 2, "entry": "reduce", "start": 2.0, "end": 3.0, "error": "boom"}],
         "transfers": [{"run": 2, "from": 0, "to": 1, "bytes": 64, "name": "/pto_a_1",
                        "start": 2.0, "fetched": 2.25}],
         "chips": [{"ph": "s", "id": 1, "pid": 1, "tid": 1, "ts": 2.2e6}]},
        {"host": 2, "lost": "ActorDiedError"},
    ]
    events = build_events([("l4", 1000.5, 1004.0, None)], hosts, ["ip a", "ip b", "ip c"],
                          [(1, 0, "produce", 1000.6), (2, 1, "reduce", 1000.7)])
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert names == {0: "pto driver (L4)", 1: "host 0 (ip a)", 2: "host 1 (ip b)",
                     3: "host 2 (ip c) lost: ActorDiedError"}
    runs = [e for e in events if e.get("cat") == "l3run" and e["ph"] == "b"]
    assert [(e["pid"], e["name"]) for e in runs] == [(1, "produce"), (2, "reduce")]
    assert runs[1]["args"]["error"] == "boom"
    transfer = next(e for e in events if e.get("cat") == "transfer" and e["ph"] == "b")
    assert transfer["pid"] == 2 and transfer["args"]["bytes"] == 64
    assert transfer["args"]["pull_us"] == 250000.0
    submits = [e for e in events if e.get("cat") == "submit"]
    assert [(e["pid"], e["name"]) for e in submits] == [(0, "produce -> host 0"),
                                                        (0, "reduce -> host 1")]
    fill_ev = next(e for e in events if e.get("name") == "fill")
    assert fill_ev["pid"] == 1
    # host times are shifted by their offset to one clock, then made relative to the first
    assert fill_ev["ts"] == pytest.approx((1001.1 - 1000.5) * 1e6)
    assert min(e["ts"] for e in events if "ts" in e) == 0
    flows = sorted(e["id"] for e in events if e.get("ph") == "s")
    assert len(set(flows)) == 2  # flow ids of different hosts do not collide


def test_an_l4_run_raises_its_first_root_failure_and_counts_the_dependents():
    from pto.cluster.errors import first_failure

    root = HostTaskError(1, "k", 0, "boom", run=2)
    propagated = HostTaskError(1, "k", 0, "boom", run=2)  # what Ray hands the dependents
    later_root = HostLostError(0, "actor died")
    err = first_failure([(2, 1, root), (3, 0, propagated), (5, 0, later_root)])
    assert err is root
    assert err.__notes__ == ["(1 dependent L3 run(s) not run)"]
