"""Containers behave like a notebook: state persists, files round-trip, plots come back as PNG."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smolrun.sandbox import Container, WarmPool


def test_state_persists_between_calls(box: Container) -> None:
    assert box.run("import math\nradius = 2").error is None
    assert box.run("round(math.pi * radius ** 2, 3)").result == "12.566"


def test_files_round_trip_with_the_same_bytes(new_container) -> None:  # type: ignore[no-untyped-def]
    box = new_container(preload=("pandas",))
    csv = b"city,population\nParis,2100000\nLyon,520000\n"
    path = box.put_file("cities.csv", csv)
    result = box.run(f"import pandas as pd\ndf = pd.read_csv('{path}')\n"
                     "df['share'] = df.population / df.population.sum()\n"
                     "df.to_csv('/mnt/data/out/report.csv', index=False) if __import__('os').makedirs("
                     "'/mnt/data/out', exist_ok=True) is None else None\nlen(df)")
    assert result.error is None and result.result == "2"
    assert result.files == ("out/report.csv",)
    report = box.read_file("out/report.csv")
    expected = box.run("open('/mnt/data/out/report.csv', 'rb').read()").result
    assert expected == repr(report)
    assert box.read_file("cities.csv") == csv


def test_tracebacks_are_results_not_exceptions(box: Container) -> None:
    result = box.run("def f():\n    return {}['missing']\nf()")
    assert result.error is not None and result.error.name == "KeyError"
    assert "f()" in result.error.traceback and "\x1b[" not in result.error.traceback  # no ANSI colours


def test_preloaded_modules_are_bound_to_their_usual_names(new_container) -> None:  # type: ignore[no-untyped-def]
    box = new_container(preload=("numpy", "pandas", "matplotlib", "matplotlib.pyplot"))
    assert box.run("(np.__name__, pd.__name__, plt.__name__)").result == "('numpy', 'pandas', 'matplotlib.pyplot')"
    bare = new_container()
    assert bare.run("np").error.name == "NameError"  # type: ignore[union-attr]


def test_matplotlib_figures_come_back_as_png(new_container) -> None:  # type: ignore[no-untyped-def]
    box = new_container(preload=("matplotlib.pyplot",))
    result = box.run("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')")
    assert result.error is None and len(result.images) == 1 and result.images[0].startswith(b"\x89PNG")
    assert box.run("1").images == ()  # figures are flushed once


def test_warm_pool_hands_out_ready_containers(sandbox_config) -> None:  # type: ignore[no-untyped-def]
    pool = WarmPool(sandbox_config, size=1)
    try:
        first = pool.acquire()
        assert first.run("import sys; 'pandas' in sys.modules").result == "True"
        first.close()
    finally:
        pool.close()


def test_exec_cli_runs_code_in_the_sandbox(sandbox_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "n.txt"
    data.write_text("21")
    code = "import os\nprint(os.getcwd())\nint(open('/mnt/data/n.txt').read()) * 2"
    out = subprocess.run([sys.executable, "-m", "smolrun", "exec", "-", "--file", str(data)], input=code,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["/mnt/data", "42"]
    failing = subprocess.run([sys.executable, "-m", "smolrun", "exec", "-"], input="1/0", capture_output=True,
                             text=True, timeout=120)
    assert failing.returncode == 1 and "ZeroDivisionError" in failing.stderr


def test_code_runs_below_the_model_on_the_cpu_and_cannot_climb_back(box: Container) -> None:
    result = box.run("import os\n(os.nice(0), os.sched_getscheduler(0) == os.SCHED_BATCH)")
    assert (result.error, result.result) == (None, "(10, True)")
    climb = box.run("import os\nos.nice(-1)")
    assert climb.error is not None and climb.error.name == "PermissionError"
    # SCHED_BATCH is a hint any process may drop; the niceness, which sets the share, stays.
    policy = box.run("import os\nos.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))\nos.nice(0)")
    assert (policy.error, policy.result) == (None, "10")


AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


@pytest.mark.skipif(not AUTOGROUP.exists() or AUTOGROUP.read_text().strip() != "1",
                    reason="this kernel groups no tasks by session (no autogroups): the process's nice is the share")
def test_the_cells_session_is_niced_too_where_the_kernel_shares_the_cpu_by_session(box: Container) -> None:
    # With autogroups, a session of its own at nice 0 would get half a core beside the model whatever the nice.
    # Code may raise it back to 0 (the kernel lets any task do that): as root the cpu cgroup below holds.
    group = box.run("open('/proc/self/autogroup').read().split()[-1]")
    assert (group.error, group.result) == (None, "'10'")


def test_no_cgroup_directory_is_made_where_no_v1_hierarchy_is_mounted(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # On cgroup v2 /sys/fs/cgroup is one tree, where mkdir "memory/smolrun/<id>" would make groups of nothing.
    from smolrun.sandbox import container, default_config

    monkeypatch.setattr(container, "CGROUPS", tmp_path)
    (tmp_path / "memory").mkdir()  # a directory, not a mount of the memory controller
    config = default_config()
    assert container._make_cgroups("c1", config) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory"] and not any((tmp_path / "memory").iterdir())
