"""Checkpoint writes under a real write failure: the kernel refuses to grow a file past the
process's file-size limit (RLIMIT_FSIZE, EFBIG: what a full disk's ENOSPC does to a write), in a
child process so that the limit binds it alone."""

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    import torch
    from lifelong.checkpoints import CheckpointWriteError, write_checkpoint

    path = Path(sys.argv[1])
    write_checkpoint({"round": 1, "w": torch.zeros(10)}, path)  # the previous checkpoint
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        write_checkpoint({"round": 2, "w": torch.zeros(100_000)}, path)
    except CheckpointWriteError as exc:
        print("REFUSED", exc)
    print("ROUND", torch.load(path)["round"])
    print("LEFT", sorted(p.name for p in path.parent.iterdir()))
""")


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    path = tmp_path / "ck" / "federated.pt"
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["REFUSED"] == (f"could not write {path}: File too large (the disk or the file-size limit is "
                                "full); the previous checkpoint there is intact")
    assert lines["ROUND"] == "1"  # the round-1 checkpoint, whole
    assert lines["LEFT"] == "['federated.pt']"  # no .tmp behind
