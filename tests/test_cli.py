"""The `r1ray` command's own rules: dispatch, exit codes, and the Ray session it stops."""

import sys
import types

import pytest

from cluster.faults import RestartsExhausted
from common.config import ConfigError
from r1ray import cli


class StandInRay(types.ModuleType):
    """A stand-in for the `ray` module, recording whether `run` shut its session down."""

    class exceptions:  # noqa: N801 - the attribute `run` reads
        class GetTimeoutError(TimeoutError):
            pass

    def __init__(self, initialized: bool):
        super().__init__("ray")
        self.initialized, self.shutdowns = initialized, 0

    def is_initialized(self) -> bool:
        return self.initialized

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.initialized = False


def test_a_command_stops_only_the_ray_session_it_started(monkeypatch):
    # A test process (or a notebook) that calls the CLI with its own session keeps it.
    theirs = StandInRay(initialized=True)
    monkeypatch.setitem(sys.modules, "ray", theirs)
    assert cli.run(lambda: None) == 0 and theirs.shutdowns == 0
    # A command that connects (here: the body starts the session) stops it, even on an error.
    ours = StandInRay(initialized=False)
    monkeypatch.setitem(sys.modules, "ray", ours)

    def fails():
        ours.initialized = True
        raise ConfigError("learner.lr=-1 is out of range")

    assert cli.run(fails) == 2 and ours.shutdowns == 1


@pytest.mark.parametrize("error, code", [
    (ConfigError("bad key"), 2), (cli.UsageError("no metrics"), 2), (TimeoutError("rollout never finished"), 1),
    # A death past its budget: the actor, its last error, and how to go on, on one line.
    (RestartsExhausted("learner", 1, "learning in step 3", "Worker unexpectedly exits", 0,
                       "continue with: r1ray train --resume runs/x"), 1)])
def test_errors_become_one_line_and_an_exit_code(monkeypatch, capsys, error, code):
    monkeypatch.setitem(sys.modules, "ray", StandInRay(initialized=False))

    def body():
        raise error

    assert cli.run(body) == code
    assert capsys.readouterr().err == f"r1ray: error: {error}\n"


def test_a_ctrl_c_where_r1ray_has_no_handler_is_one_line_and_exit_code_130(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", StandInRay(initialized=False))

    def body():
        raise KeyboardInterrupt

    assert cli.run(body) == 130
    assert capsys.readouterr().err == "r1ray: stopped by SIGINT (Ctrl-C)\n"


def test_an_unknown_command_names_the_valid_ones(capsys):
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err == ("r1ray: unknown command 'trian'; valid: train, eval, plot, pipeline, "
                                       "train-rm, distill\n")
