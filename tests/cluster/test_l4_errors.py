"""L4 errors a user meets, through the public API only (issue 13).

A kernel failing on host 1 names the host, the kernel and the chip; runs depending on it do
not run; other runs go on. Bad input is refused at the call with a clear error: an unknown
host, an unknown entry, an L4 orchestration used as an L3 entry and the reverse, a Ref of
another runtime, arguments that cannot travel to a host.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(120)
In, Out, S = pto.Arg.input, pto.Arg.output, pto.Arg.scalar


def scale(x, y, factor):
    y[...] = x * factor


def explode(x, y):
    raise ValueError("kernel-exploded-4b1e")


KERNELS = {"scale": scale, "explode": explode}


def scaled(ctx, args):
    x = ctx.tensor(args["x"])
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[0], "scale", [In(x), Out(y), S(args.get("factor", 2.0))])
    return y


def exploding(ctx, args):
    """Fails on the host's second chip."""
    x = ctx.tensor(args)
    y = ctx.alloc(x.shape, x.dtype)
    ctx.submit(ctx.peers()[1], "explode", [In(x), Out(y)])
    return y


def touching(ctx, args):
    """Leaves a file behind (the host is this machine), then scales: proof that it ran."""
    open(args["path"], "w").close()
    return scaled(ctx, args)


def raising_orchestration(ctx, args):
    raise RuntimeError("orchestration-raised-77aa")


def echo(ctx, args):
    return args


@pytest.fixture(scope="module")
def l4(rt):
    for name, fn in {"scaled": scaled, "exploding": exploding, "touching": touching,
                     "raising_orchestration": raising_orchestration, "echo": echo}.items():
        rt.register(name, orch=fn, kernels=KERNELS)
    return rt


def test_a_failing_kernel_on_host_1_is_named_with_its_host_and_chip(l4, tmp_path):
    marker = tmp_path / "dependent-ran"

    def failing(ctx, args):
        broken = ctx.submit(1, "exploding", args=np.ones(8, np.float32))
        ctx.submit(0, "touching", args={"x": broken, "path": str(marker)})  # must not run
        return broken

    l4.register("failing", orch=failing)
    with pytest.raises(pto.TaskError) as info:
        l4.run("failing")
    message = str(info.value)
    assert "host 1" in message, message
    assert "explode" in message and "kernel-exploded-4b1e" in message, message
    assert "chip 1" in message or info.value.chip == 1, message
    assert not marker.exists(), "a run depending on the failed one ran"


def test_other_runs_go_on_after_a_failure(l4, tmp_path):
    def mixed(ctx, args):
        return {"bad": ctx.submit(1, "exploding", args=np.ones(4, np.float32)),
                "good": ctx.submit(0, "touching", args={"x": np.ones(4), "path": args})}

    l4.register("mixed", orch=mixed)
    marker = tmp_path / "independent-ran"
    with pytest.raises(pto.TaskError, match="host 1"):
        l4.run("mixed", args=str(marker))
    assert marker.exists(), "an independent run was not run"

    def healthy(ctx, args):
        return [ctx.submit(h, "scaled", args={"x": np.ones(4)}) for h in ctx.hosts()]

    l4.register("healthy_after_failure", orch=healthy)
    for result in l4.run("healthy_after_failure"):
        np.testing.assert_array_equal(result, np.full(4, 2.0))


def test_a_failure_reaches_a_submitted_future(l4):
    def failing_async(ctx, args):
        return ctx.submit(1, "exploding", args=np.ones(4, np.float32))

    l4.register("failing_async", orch=failing_async)
    future = l4.submit("failing_async")
    with pytest.raises(pto.TaskError, match="host 1"):
        future.result(timeout=60)


def test_an_l3_orchestration_raising_names_its_host(l4):
    def calls_raising(ctx, args):
        return ctx.submit(1, "raising_orchestration")

    l4.register("calls_raising", orch=calls_raising)
    with pytest.raises(Exception, match="orchestration-raised-77aa") as info:
        l4.run("calls_raising")
    assert "host 1" in str(info.value) + "".join(getattr(info.value, "__notes__", []))


# -- bad input, refused at the call -----------------------------------------------------------

def _run_submitting(l4, name, host, entry, args=None):
    def orch(ctx, _):
        return ctx.submit(host, entry, args=args)

    l4.register(name, orch=orch)
    return l4.run(name)


@pytest.mark.parametrize("host", [2, -1, "0", 1.0, None])
def test_unknown_host(l4, host):
    with pytest.raises(ValueError, match="host"):
        _run_submitting(l4, f"to_host_{host!r}", host, "echo")


def test_unknown_entry(l4):
    with pytest.raises(KeyError, match="no_such_entry"):
        _run_submitting(l4, "to_unknown_entry", 0, "no_such_entry")
    with pytest.raises(KeyError, match="no_such_orchestration"):
        l4.run("no_such_orchestration")


def test_an_l4_name_used_as_an_l3_entry_and_the_reverse(l4):
    l4.register("an_l4_orchestration", orch=lambda ctx, args: None)
    with pytest.raises(ValueError, match="L4"):
        _run_submitting(l4, "submits_l4_name", 0, "an_l4_orchestration")
    with pytest.raises(ValueError, match="L3"):
        l4.run("scaled", args={"x": np.ones(2)})  # an L3 entry is not run by rt.run


def test_a_name_is_registered_once(l4):
    with pytest.raises(ValueError, match="already registered"):
        l4.register("scaled", orch=scaled, kernels=KERNELS)
    with pytest.raises(ValueError, match="already registered"):
        l4.register("scaled", orch=echo)


@pytest.mark.slow
def test_a_ref_of_another_runtime_is_refused(l4, cluster):
    kept = []

    def keeps_a_ref(ctx, args):
        kept.append(ctx.submit(0, "scaled", args={"x": np.ones(2)}))
        return kept[-1]

    with pto.Runtime(level="cluster", cluster=cluster.address) as other:
        other.register("scaled", orch=scaled, kernels=KERNELS)
        other.register("keeps_a_ref", orch=keeps_a_ref)
        other.run("keeps_a_ref")
        foreign = kept.pop()
        assert isinstance(foreign, pto.Ref)
        with pytest.raises((TypeError, ValueError), match="another .*runtime"):
            _run_submitting(l4, "uses_foreign_ref", 0, "scaled", args={"x": foreign})
        del foreign


def test_args_that_cannot_travel_are_refused_at_the_call(l4):
    with pytest.raises(TypeError, match="echo"):
        _run_submitting(l4, "sends_a_lock", 1, "echo", args={"lock": threading.Lock()})


def test_the_runtime_keeps_serving_after_bad_input(l4):
    def fine(ctx, args):
        return ctx.submit(1, "scaled", args={"x": np.arange(3.0)})

    l4.register("fine_after_bad_input", orch=fine)
    np.testing.assert_array_equal(l4.run("fine_after_bad_input"), [0.0, 2.0, 4.0])


def test_bad_runtime_arguments():
    with pytest.raises(ValueError):
        pto.Runtime(level="cluster", cluster=42)
    with pytest.raises(ValueError):
        pto.Runtime(level="cluster", retries=-1)


@pytest.mark.parametrize("kwargs", [{"hosts": 0}, {"chips": 0}, {"hosts": 1.5},
                                    {"hosts": True}, {"object_store_mib": 1}])
def test_local_cluster_refuses_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="LocalCluster"):
        pto.LocalCluster(**kwargs)
