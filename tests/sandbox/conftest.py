"""Sandbox fixtures: skipped, with the reason, where this machine cannot sandbox (no bwrap, no namespaces)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from smolrun.sandbox import Container, Limits, default_config, unavailable_reason

# Small limits keep the hostile suite quick and its bombs cheap.
TEST_LIMITS = Limits(memory_mb=384, timeout_s=4.0, grace_s=1.0, output_bytes=4000, tmp_mb=32, shm_mb=16,
                     file_mb=16, work_files=50, work_mb=64, pids=64)


@pytest.fixture(scope="session")
def sandbox_config():  # type: ignore[no-untyped-def]
    config = replace(default_config(), limits=TEST_LIMITS)
    reason = unavailable_reason(config)
    if reason is not None:
        pytest.skip(f"no sandbox on this machine: {reason} (`make setup` as root installs it)")
    return config


@pytest.fixture()
def new_container(sandbox_config) -> Iterator[Callable[..., Container]]:  # type: ignore[no-untyped-def]
    made: list[Container] = []

    def make(preload: tuple[str, ...] = ()) -> Container:
        c = Container(sandbox_config, preload=preload).start()
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture()
def box(new_container) -> Container:  # type: ignore[no-untyped-def]
    return new_container()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="per-container uids and cgroups need root")
needs_mount = pytest.mark.skipif(os.geteuid() != 0, reason="a quota tmpfs needs root (as in CI)")


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, as /proc/self/mountinfo lists them (octal escapes undone)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(path) or point.startswith(f"{path}/"):
            points.append(point)
    return sorted(points)
