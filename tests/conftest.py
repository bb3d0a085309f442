from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"
# every architecture with a committed port (generated/vllm/<model_type>)
MODELS = sorted(p.name for p in (GENERATED / "vllm").iterdir() if (p / "PORT.json").exists())
TARGETS = ["vllm", "aphrodite"]


def run_group(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None,
              timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run CMD in a session of its own and capture its text output; when the timeout expires the
    whole process group is killed (the engine's workers, the worker processes `porter regen` and
    coverage start), then TimeoutExpired is raised as `subprocess.run` raises it. ENV replaces the
    environment when given."""
    with subprocess.Popen(cmd, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_porter(*args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the porter CLI as a user would (a fresh process; see run_group for the timeout)."""
    return run_group([sys.executable, "-m", "porter", *args], cwd=cwd, env={**os.environ, **(env or {})},
                     timeout=timeout)


@pytest.fixture
def porter_cli():
    return run_porter


# ---------------------------------------------------------------------------------------------
# which committed vLLM ports the engine verifies in this run (tests/test_verify_harness.py)
# ---------------------------------------------------------------------------------------------
# Every port whose digest has no valid verdict in generated/verdicts/ (new or changed ports, new
# versions of vllm, torch or transformers), plus PORTER_VERDICT_SAMPLE (default 6) ports drawn
# with PORTER_VERDICT_SEED (default: a fresh one, printed) among those with one.
# PORTER_VERIFY_ALL=1 verifies every port (make test-full). The controller decides once and hands
# the list to the xdist workers in PORTER_VERIFY_SELECTION (set it to replay a given list).
VERDICT_SAMPLE_DEFAULT = 6


def verify_plan() -> dict:
    """The run's plan: seed, sample size, selection, and every port's verdict status."""
    import json
    import random

    from porter.verify.verdicts import select, statuses

    if os.environ.get("PORTER_VERIFY_PLAN"):  # decided by the controller (or a parent run)
        return json.loads(os.environ["PORTER_VERIFY_PLAN"])
    seed = int(os.environ.get("PORTER_VERDICT_SEED") or random.SystemRandom().randrange(2**31))
    sample = int(os.environ.get("PORTER_VERDICT_SAMPLE") or VERDICT_SAMPLE_DEFAULT)
    verify_all = os.environ.get("PORTER_VERIFY_ALL", "") not in ("", "0")
    status = statuses(GENERATED / "vllm")
    chosen, sampled = select(status, sample, seed, verify_all)
    if os.environ.get("PORTER_VERIFY_SELECTION"):  # replay a given list
        chosen = sorted(m for m in os.environ["PORTER_VERIFY_SELECTION"].split(",") if m)
    return {"seed": seed, "sample": sample, "all": verify_all, "selection": chosen,
            "sampled": sampled, "status": status}


def _plan_lines(plan: dict) -> list[str]:
    status = plan["status"]
    others = sorted(m for m in plan["selection"] if status.get(m) != "valid")
    counts = {s: sum(1 for v in status.values() if v == s) for s in sorted(set(status.values()))}
    head = (f"verdicts: PORTER_VERIFY_ALL=1: all {len(plan['selection'])} ports verified" if plan["all"]
            else f"verdicts: PORTER_VERDICT_SEED={plan['seed']}: {len(plan['selection'])} of "
                 f"{len(status)} ports verified in the engine")
    return [
        f"{head} (store: {', '.join(f'{n} {s}' for s, n in counts.items())})",
        f"verdicts: without a valid verdict: {', '.join(others) or 'none'}",
        f"verdicts: sampled among the valid (PORTER_VERDICT_SAMPLE={plan['sample']}): "
        f"{', '.join(plan['sampled']) or 'none'}",
    ]


def pytest_configure(config):
    import json

    plan = verify_plan()
    # xdist workers start after this and inherit the environment: they verify the same list
    os.environ["PORTER_VERIFY_PLAN"] = json.dumps(plan)
    config._porter_verify_plan = plan


def pytest_collection_modifyitems(session, config, items):
    """The order pytest-xdist hands the test modules out in (--dist loadscope, one module at a time
    to the worker that has two tests left, pyproject.toml): the modules with long tests first, the
    engine runs (marked e2e) and the release matrix (the regen_new_release fixture, minutes of
    conversions), so the many short tests fill in beside the last long one."""
    def long(item) -> bool:
        return item.get_closest_marker("e2e") is not None or "regen_new_release" in getattr(item, "fixturenames", ())

    items.sort(key=lambda item: not long(item))  # (a stable sort)


def pytest_sessionstart(session):
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and not os.environ.get("PYTEST_XDIST_WORKER"):
        for line in _plan_lines(session.config._porter_verify_plan):
            tr.write_line(line)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    plan = config._porter_verify_plan
    terminalreporter.write_line(
        _plan_lines(plan)[0] + "; replay with PORTER_VERIFY_SELECTION=" + ",".join(plan["selection"]))
