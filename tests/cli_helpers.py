"""Running the `worldlm` command in-process, as the CLI tests do."""
import contextlib
import io

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
