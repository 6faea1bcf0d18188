"""Running the `worldlm` command in-process, as the CLI tests do, and the environment
of a test's subprocess."""
import contextlib
import io
import os
import re

from worldlm_jax.cli import parser as cli


def run_cli(argv):
    """(exit code, stdout, stderr) of cli.main(argv); SystemExit (argparse) is caught."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def subprocess_env(devices: int, **extra) -> dict:
    """os.environ for a subprocess with `devices` CPU devices, keeping the session's
    other XLA flags (tests/conftest.py: how it compiles) so its numbers match ours."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
                **extra)


def documented_form(key: str) -> str:
    """A record key as docs/metrics.md documents it: level numbers as level{d}, a
    plug-in's metric (any entry's, any name) as level{d}/plugin/{kind}/{entry}/{name}."""
    key = re.sub(r"^level\d+/", "level{d}/", key)
    key = re.sub(r"^level\{d\}/update_spread_group/[^/]+$", "level{d}/update_spread_group/{group}", key)
    return re.sub(r"^level\{d\}/plugin/[^/]+/[^/]+/[^/]+$", "level{d}/plugin/{kind}/{entry}/{name}", key)
