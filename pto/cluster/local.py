"""``pto.LocalCluster``: N simulated hosts on this machine, each a Ray node, for tests and examples.

Where it sits: L4 (``Runtime(level="cluster")``) runs on whatever Ray cluster it is given; on a real
cluster each machine runs ``ray start --resources '{"pto_chips": C}'``. This module builds the same
shape on one machine with Ray's own test-cluster utility (``ray.cluster_utils.Cluster``):

- a light Ray head (no CPUs, no ``pto_chips``) holding the GCS; drivers attach to it, so killing
  a host never kills the driver's own raylet;
- hosts ``0..N-1``, one Ray worker node each, advertising ``{"pto_chips": C}`` and the node label
  ``pto.host = "<i>"`` (the runtime orders hosts by it), each with its own ``PTO_RUNTIME_DIR``
  (inherited by the node's Ray workers, hence by the host actor and its broker and chip workers);
- Ray's health checks tightened so a killed node is declared dead within a few seconds.

``kill_host(i)`` is a host crash: SIGKILL to that node's raylet and every process under it, and the
crashed host's shared-memory segments vanish with it, as they would with the machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from types import TracebackType

import psutil

from ..wire import shm

HOST_LABEL = "pto.host"      # node label naming a host's index (the runtime orders hosts by it)
CHIPS_RESOURCE = "pto_chips"  # a node advertising it is a host; its value is the chip count
# A raylet silent for period * threshold is declared dead: ~4 s, against Ray's default 15 s
# (3 s * 5). Not tighter: on a loaded 2-core machine a live raylet may miss a second or two.
_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                  "health_check_timeout_ms": 1000, "health_check_failure_threshold": 4}
_NODE_DEFAULTS = {"include_log_monitor": False, "min_worker_port": 0, "max_worker_port": 0}
# Ray starts its workers at nice 15, and a host actor's broker and chip workers inherit it:
# on a busy machine every L3 run of a host then waits behind everything else (measured here
# under load: 4.4 ms per one-task L3 run in a host actor, 1.2 ms at nice 0). A host's chip
# workers are its compute, so they run at normal priority (plain Ray's workers on these
# nodes too: comparisons stay fair).
_WORKER_NICENESS = {"RAY_worker_niceness": "0"}
_KILL_WAIT_S = 10.0
_START_TIMEOUT_S = 60.0
_MIN_STORE_MIB = 80  # Ray refuses an object store under 75 MiB
_DIR_PREFIX = "ptolc-"  # + creator pid + "-" + random, in the temp directory


class LocalCluster:
    """A Ray cluster on this machine: ``hosts`` simulated hosts of ``chips`` simulated chips.

    >>> with pto.LocalCluster(hosts=2, chips=2) as cluster:                 # doctest: +SKIP
    ...     with pto.Runtime(level="cluster", cluster=cluster.address) as rt:
    ...         ...

    Each host is a Ray worker node with ``cpus_per_host`` CPUs and ``object_store_mib`` MiB of
    object store (pto's tensors do not travel through it; Ray's own objects do).
    Close every runtime connected to the cluster before stopping it.
    """

    def __init__(self, hosts: int = 2, chips: int = 2, *, cpus_per_host: int = 1,
                 object_store_mib: int = 128) -> None:
        for name, value, low in (("hosts", hosts, 1), ("chips", chips, 1),
                                 ("cpus_per_host", cpus_per_host, 0),
                                 ("object_store_mib", object_store_mib, _MIN_STORE_MIB)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"LocalCluster: {name} must be an integer >= {low}, got {value!r}")
        self._hosts = hosts
        self._chips = chips
        self._killed: set[int] = set()
        self._stopped = False
        # Ray's sessions, logs and sockets, and each host's pto runtime directory, live here and
        # go on stop. Short on purpose: unix socket paths must stay under 108 bytes. Named by
        # our pid, so a later LocalCluster removes what a killed creator could not.
        _remove_dirs_of_dead_creators()
        self._dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        from ray.cluster_utils import Cluster  # imported here: `import pto` must not import ray

        _make_ray_address_dir()
        try:
            self._ray = Cluster(initialize_head=False, shutdown_at_exit=True)
            # The head: the GCS, Ray's state API server (no dashboard UI), no autoscaler.
            with _quiet("ray._private.utils"):  # "Overwriting previous Ray address" chatter
                self._ray.add_node(num_cpus=0, include_dashboard=False, no_monitor=True,
                                   temp_dir=self._dir, object_store_memory=_MIN_STORE_MIB << 20,
                                   _system_config=dict(_HEALTH_CHECKS), **_NODE_DEFAULTS)
            self._address: str = self._ray.address
            self._host_nodes = self._start_hosts(cpus_per_host, object_store_mib << 20)
        except BaseException:
            self.stop()
            raise

    def _start_hosts(self, cpus: int, store_bytes: int) -> list:
        """Start the host nodes one after another (Ray's node start must run on the main thread),
        without waiting for each to register, then wait for all of them at once."""
        self._host_nodes = []  # filled as they start, so stop() finds what did start
        for index in range(self._hosts):
            runtime_dir = os.path.join(self._dir, f"host{index}")
            os.makedirs(runtime_dir, mode=0o700, exist_ok=True)
            self._host_nodes.append(self._ray.add_node(
                wait=False, num_cpus=cpus, resources={CHIPS_RESOURCE: self._chips},
                labels={HOST_LABEL: str(index)}, object_store_memory=store_bytes,
                temp_dir=self._dir, env_vars={"PTO_RUNTIME_DIR": runtime_dir, **_WORKER_NICENESS},
                **_NODE_DEFAULTS))
        self._ray.wait_for_nodes(timeout=_START_TIMEOUT_S)
        return self._host_nodes

    # -- what the cluster is --------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The Ray (GCS) address, for ``Runtime(level="cluster", cluster=...)`` or ``ray.init``."""
        self._check_running()
        return self._address

    @property
    def hosts(self) -> int:
        """How many hosts the cluster was started with (killed ones included)."""
        return self._hosts

    @property
    def chips(self) -> int:
        """Simulated chips per host."""
        return self._chips

    def alive_hosts(self) -> list[int]:
        """Indices of the hosts not killed with ``kill_host``."""
        return [i for i in range(self._hosts) if i not in self._killed]

    def host_pids(self, host: int) -> list[int]:
        """Pids of host ``host``'s processes: its raylet and everything under it (Ray workers, the
        host actor's pto broker and chip workers)."""
        self._check_host(host)
        return [p.pid for p in self._node_tree(self._host_nodes[host])]

    def pids(self) -> list[int]:
        """Pids of every live process of the cluster: the head's (GCS, state API server, its
        raylet) and every host's (``host_pids``)."""
        self._check_running()
        nodes = [self._ray.head_node, *self._host_nodes]
        return sorted({p.pid for node in nodes for p in self._node_tree(node)})

    # -- failures and stop ----------------------------------------------------------------------

    def kill_host(self, host: int) -> None:
        """Crash host ``host``: SIGKILL its raylet and every process under it, and drop its
        shared-memory segments (a crashed machine's ``/dev/shm`` goes with it). It stays down."""
        self._check_host(host)
        if host in self._killed:
            raise ValueError(f"LocalCluster: host {host} is already killed")
        self._killed.add(host)
        _kill_all(self._node_tree(self._host_nodes[host]))

    def stop(self) -> None:
        """Stop every node and leave nothing behind: no Ray or pto process, no pto segment,
        no temporary directory. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        address = getattr(self, "_address", None)  # None if the head did not start
        _disconnect_driver(address)
        ray_cluster = getattr(self, "_ray", None)
        head = ray_cluster.head_node if ray_cluster is not None else None
        nodes = [n for n in (*getattr(self, "_host_nodes", []), head) if n is not None]
        _kill_all([p for node in nodes for p in self._node_tree(node)])
        for node in nodes:
            # Ray's own bookkeeping (and zombie reaping); everything is already dead.
            with contextlib.suppress(Exception):
                ray_cluster.remove_node(node, allow_graceful=False)
        shm.reap_dead_owners()  # segments whose owners we just killed
        _forget_ray_address(address)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else f"at {self._address}"
        return f"LocalCluster(hosts={self._hosts}, chips={self._chips}) {state}"

    # -- helpers --------------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._stopped:
            raise RuntimeError("LocalCluster: the cluster is stopped")

    def _check_host(self, host: int) -> None:
        self._check_running()
        if not isinstance(host, int) or isinstance(host, bool) or not 0 <= host < self._hosts:
            raise ValueError(f"LocalCluster: no host {host!r}; hosts are 0..{self._hosts - 1}")

    @staticmethod
    def _node_tree(node) -> list[psutil.Process]:
        """Every live process Ray started for ``node`` and all their descendants (pto brokers run in
        their own sessions but are still descendants of the host actor)."""
        procs: dict[int, psutil.Process] = {}
        for infos in node.all_processes.values():
            for info in infos:
                if info.process is None or info.process.poll() is not None:
                    continue
                try:
                    root = psutil.Process(info.process.pid)
                    for p in [root, *root.children(recursive=True)]:
                        procs[p.pid] = p
                except psutil.NoSuchProcess:
                    continue
        return list(procs.values())


def _remove_dirs_of_dead_creators() -> None:
    """Remove the directories of LocalClusters whose creating process is gone (killed: its
    cluster's processes died with it, but nothing removed their files)."""
    base = tempfile.gettempdir()
    for name in os.listdir(base):
        pid = name[len(_DIR_PREFIX):].split("-", 1)[0]
        if name.startswith(_DIR_PREFIX) and pid.isdigit() and not shm.pid_alive(int(pid)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def _kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL ``procs`` (all at once, so no parent outlives a child to restart it) and wait."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _, alive = psutil.wait_procs(procs, timeout=_KILL_WAIT_S)
    if alive:
        raise RuntimeError(f"LocalCluster: processes survived SIGKILL: {[p.pid for p in alive]}")
    # Killed processes cannot remove their segments: unlink those of owners now dead.
    killed = {p.pid for p in procs}
    names = [*shm.list_names(), *shm.list_names(semaphores=True)]
    for owner in {shm.owner_of(name) for name in names}:
        if shm.owner_pid(owner) in killed:
            shm.unlink_owner(owner)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Hold a logger to warnings for the duration."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _disconnect_driver(address: str | None) -> None:
    """Drop this process's Ray connection to the cluster being stopped (it would dangle)."""
    import ray

    if address is None or not ray.is_initialized():
        return
    with contextlib.suppress(Exception):
        gcs = ray.get_runtime_context().gcs_address
        if gcs == address:
            ray.shutdown()


def _make_ray_address_dir() -> None:
    """Ray's test cluster writes the head's address into its default temp dir (/tmp/ray)
    even when every node has its own ``temp_dir``; on a machine where Ray never ran that
    folder is missing and the head fails to start."""
    try:
        from ray._private.utils import get_ray_address_file
    except ImportError:  # a private helper: if it moved, Ray makes the folder itself
        return
    os.makedirs(os.path.dirname(get_ray_address_file(None)), exist_ok=True)


def _forget_ray_address(address: str | None) -> None:
    """Ray writes the newest head's address to /tmp/ray/ray_current_cluster, and a bare
    ``ray.init()`` would later try to join it: remove it if it still names our stopped head."""
    try:
        from ray._private.utils import get_ray_address_file
    except ImportError:  # a private helper: if it moved, leaving the file is harmless enough
        return
    path = get_ray_address_file(None)
    with contextlib.suppress(OSError):
        with open(path) as f:
            if address is not None and f.read().strip() == address:
                os.unlink(path)
