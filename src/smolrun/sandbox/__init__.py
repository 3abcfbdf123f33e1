"""Sandboxed, stateful Python containers for model-written (untrusted) code: bubblewrap, seccomp, limits."""

from smolrun.errors import SandboxUnavailable
from smolrun.sandbox.container import Container, ExecError, Execution
from smolrun.sandbox.launch import Limits, SandboxConfig, default_config, unavailable_reason
from smolrun.sandbox.pool import WarmPool

__all__ = ["Container", "ExecError", "Execution", "Limits", "SandboxConfig", "SandboxUnavailable",
           "WarmPool", "default_config", "unavailable_reason"]
