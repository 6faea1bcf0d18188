"""A process killed (SIGKILL) while it saves a checkpoint never costs the last good one.

Each case runs a child process that saves step 1 (with max_to_keep=1, so a save
that dropped the old step before committing the new one would lose everything),
then starts saving a larger step 2 and is SIGKILLed at one point of that save:

- ``arrays``: while the arrays are being written (a watcher thread kills the
  process once 4 MiB of the 32 MiB of random array data are on disk);
- ``item``: when an item (``device`` or ``host``) is fully written, before its
  directory is renamed into place;
- ``commit``: at the very end, after ``commit_success.txt`` is written and just
  before the step directory is renamed to its final name.

A fresh Checkpointer must then report step 1 as the latest, verify and restore it
exactly, ignore the half-written step (a reader leaves it alone), and saving step
2 again must replace it and commit normally. (That a writer's first save removes
leftovers of other steps is tested in test_checkpoint.py, without a kill.)
"""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldlm_jax.outputs.checkpoint import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import os, signal, sys, threading, time
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import async_path, atomicity
    from worldlm_jax.checkpoint import Checkpointer

    workdir, mode = sys.argv[1], sys.argv[2]
    ckpt = Checkpointer(workdir, max_to_keep=1)
    step1 = {"w": jnp.arange(32, dtype=jnp.float32).reshape(4, 8), "head": {"b": jnp.ones(3)}}
    ckpt.save(1, step1, {"round": 1})
    ckpt.wait()
    # 32 MiB of incompressible data: the write takes long enough to be cut halfway
    step2 = {f"w{i}": jax.random.normal(jax.random.PRNGKey(i), (512, 1024)) for i in range(16)}
    tmp = os.path.join(workdir, "checkpoints", "2" + atomicity.TMP_DIR_SUFFIX)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "arrays":
        def on_disk():
            return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(tmp)
                       for f in files if os.path.exists(os.path.join(root, f)))
        def watch():
            while on_disk() < 4 << 20:
                time.sleep(0.0005)
            die()
        threading.Thread(target=watch, daemon=True).start()
        finalize = atomicity.AtomicRenameTemporaryPath.finalize
        async def slow_finalize(self):  # never commit before the watcher has killed us
            if self.get_final().name == "2":
                time.sleep(60)
            return await finalize(self)
        atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
    elif mode == "item":
        async def finalize(self):
            die()
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    elif mode == "commit":
        rename = async_path.rename
        async def rename_then_die(src, dst):
            if os.path.basename(str(dst)) == "2":
                assert os.path.exists(os.path.join(str(src), "commit_success.txt"))
                die()
            return await rename(src, dst)
        async_path.rename = rename_then_die
    ckpt.save(2, step2, {"round": 2})
    ckpt.wait()
    print("step 2 was committed: the kill never happened")
''')

MODES = ("arrays", "item", "commit")


def step1_state():
    return {"w": jnp.arange(32, dtype=jnp.float32).reshape(4, 8), "head": {"b": jnp.ones(3)}}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """One workdir per mode, each left by a child SIGKILLed while saving step 2
    (the children run side by side)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    children = {}
    for mode in MODES:
        workdir = tmp_path_factory.mktemp(f"killed_{mode}")
        children[mode] = (workdir, subprocess.Popen(
            [sys.executable, "-c", CHILD, str(workdir), mode], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    runs = {}
    for mode, (workdir, child) in children.items():
        try:
            out, _ = child.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
        runs[mode] = (workdir, child.returncode, out)
    return runs


@pytest.mark.parametrize("mode", MODES)
def test_save_killed_midway_leaves_the_last_good_step(killed_runs, mode):
    workdir, returncode, out = killed_runs[mode]
    assert returncode == -signal.SIGKILL, f"child did not die by SIGKILL ({returncode}):\n{out[-3000:]}"
    checkpoints = pathlib.Path(workdir) / "checkpoints"
    tmp = checkpoints / "2.orbax-checkpoint-tmp"
    assert tmp.is_dir() and not (checkpoints / "2").exists()
    if mode == "arrays":  # killed inside the array write, not after it
        assert (tmp / "device.orbax-checkpoint-tmp").is_dir()

    with Checkpointer(workdir) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        assert ckpt.interrupted_saves() == [str(tmp)]
        assert ckpt.good_steps() == [1]
        device, host = ckpt.restore()
        assert host == {"round": 1}
        for got, want in zip(jax.tree.leaves(device), jax.tree.leaves(step1_state())):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert tmp.is_dir()  # a reader never deletes a save that may be in progress

        # the resumed run saves step 2 again: the leftover is replaced, the step commits
        assert ckpt.save(2, {"x": jnp.full((5,), 2.0)}, {"round": 2})
        ckpt.wait()
        assert not tmp.exists() and ckpt.interrupted_saves() == []
    with Checkpointer(workdir) as ckpt:
        assert ckpt.latest_step() == 2
        device, host = ckpt.restore()
        assert host == {"round": 2}
        np.testing.assert_array_equal(device["x"], np.full((5,), 2.0))
