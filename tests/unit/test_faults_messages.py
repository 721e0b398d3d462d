"""mmgrow.parallel.faults without processes: timeout validation and the recognition of backend failures."""

import math
from datetime import timedelta

import pytest

from mmgrow.cli_errors import run_command
from mmgrow.parallel import faults
from mmgrow.parallel.faults import COLLECTIVE_FAILURE_EXIT, collective_failure, collective_timeout


@pytest.mark.parametrize("bad", [0, -1, math.inf, math.nan, True, "30", None])
def test_collective_timeout_rejects_what_is_not_a_positive_finite_number(bad):
    with pytest.raises(ValueError, match=r"Owner: collective_timeout_s must be a positive, finite number"):
        collective_timeout(bad, "Owner")


def test_collective_timeout_returns_seconds_and_startup_waits_longer():
    assert collective_timeout(7, "X") == timedelta(seconds=7)
    assert faults.startup_timeout(7) == timedelta(seconds=faults.STARTUP_TIMEOUT_S)
    assert faults.startup_timeout(1000) == timedelta(seconds=1000)


class DistBackendError(RuntimeError):  # same name as torch's: recognised by class name, no torch import
    pass


@pytest.mark.parametrize("exc, kind", [
    (RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 6000ms for recv operation"),
     "timeout"),
    (DistBackendError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE) "
                      "ran for 600013 milliseconds before timing out."), "timeout"),
    (RuntimeError("Timed out after 301 seconds waiting for clients. 1/2 clients joined."), "timeout"),
    (RuntimeError("Application timeout caused pair closure"), "timeout"),  # gloo, seen in a DDP optimizer step
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5431"), "peer_lost"),
    (DistBackendError("Read error [127.0.0.1]:5431: Connection reset by peer"), "peer_lost"),
])
def test_backend_failures_become_one_collective_failure_naming_the_timeout(exc, kind, monkeypatch):
    monkeypatch.setattr(faults, "_configured_timeout_s", 6.0)
    wrapped = ValueError("wrapper")
    wrapped.__cause__ = exc  # looked through, as Lightning or a callback may wrap it
    found = collective_failure(wrapped)
    assert found is not None and found.kind == kind and found.timeout_s == 6.0
    assert "6 s" in str(found) and "collective_timeout_s" in str(found)


@pytest.mark.parametrize("exc", [RuntimeError("CUDA out of memory"), ValueError("Timed out waiting 5ms"),
                                 KeyError("connection closed by peer")])
def test_other_errors_are_not_collective_failures(exc):
    assert collective_failure(exc) is None


def test_console_prints_one_line_and_exits_4(capsys, monkeypatch):
    monkeypatch.setattr(faults, "_configured_timeout_s", 6.0)

    def fit(_args):
        raise RuntimeError("Timed out waiting 6000ms for recv operation to complete")

    assert run_command(fit, ["fit"]) == COLLECTIVE_FAILURE_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmgrow: error: a collective did not complete within 6 s"), err
    with pytest.raises(RuntimeError, match="Timed out waiting"):  # --debug: the original, with its traceback
        run_command(fit, ["fit", "--debug"])
