"""The broker (and its workers) that ``Runtime(level="host")`` starts when given no address."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from ..wire import config, shm
from ..wire.procs import runtime_dir
from ..wire.sockets import child_env


class EmbeddedBroker:
    """A child broker process serving ``devices``, stopped by ``stop()`` (with
    ``metrics_port``, serving /metrics and the dashboard there).

    It runs in its own session (Ctrl-C in a terminal reaches only the user's process,
    which then closes it), watches our pid, and exits with its workers if we die.
    """

    def __init__(self, devices: list[int], owner: str, settings: config.Config,
                 metrics_port: int | None = None):
        self._keep_logs = settings.keep_logs  # PTO_KEEP_LOGS
        base = runtime_dir(settings.runtime_dir)
        self.address = f"ipc://{base}/{owner}.sock"
        self.log_dir = os.path.join(base, f"logs-{owner}")
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        cmd = [sys.executable, "-m", "broker", "--listen", self.address,
               "--devices", ",".join(map(str, devices)), "--parent-pid", str(os.getpid()),
               "--log-dir", self.log_dir]
        if metrics_port is not None:  # /metrics and the dashboard on 127.0.0.1
            cmd += ["--metrics-port", str(metrics_port)]
        env = child_env()  # the broker reads its own PTO_* settings from it
        with open(os.path.join(self.log_dir, "broker.out"), "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         env=env, start_new_session=True)

    def exit_reason(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        return f"embedded broker exited with code {code} (logs in {self.log_dir})"

    def stop(self, keep_logs: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shm.reap_dead_owners()  # what a killed broker's workers could not remove themselves
        if not keep_logs and not self._keep_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)
