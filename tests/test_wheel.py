"""The compiled wheel works without the source tree.

Builds the wheel with `pip wheel . --no-build-isolation --no-deps` (ninja
reuses the objects of `make build`, so this costs a link, not a rebuild),
installs it into a fresh venv outside the repository, and runs the codec and
a 2-process gloo broadcast from there. torch is borrowed from the running
interpreter through a .pth file instead of being installed again.
"""
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = textwrap.dedent("""
    import os, socket, sys
    import torch.multiprocessing as mp
    import fastbcast
    assert "{repo}" not in os.path.dirname(fastbcast.__file__), fastbcast.__file__
    obj = {{"ids": list(range(1000)), "t": (1, 2.5, "x"), "s": {{1, 2}}}}
    assert fastbcast.decode(fastbcast.encode(obj)) == obj

    def child(rank, port):
        import torch.distributed as dist
        import fastbcast
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank, world_size=2)
        got = fastbcast.broadcast_pyobj([obj] if rank == 0 else None, rank=rank, src=0)
        assert got == [obj], got
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        mp.spawn(child, args=(port,), nprocs=2, join=True)
        print("wheel-ok", fastbcast.__file__)
""")


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    dist_dir = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", REPO, "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(dist_dir)], check=True, cwd=REPO, env={**os.environ, "MAX_JOBS": "2"})
    wheels = list(dist_dir.glob("fastbcast-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        assert any(n.startswith("fastbcast/_C") and n.endswith(".so") for n in names), names
        assert "fastbcast/_build_info.py" in names
        # The startup hook lands at the top of site-packages, where .pth files are read.
        assert "fastbcast-autopatch.pth" in names and "fastbcast_autopatch.py" in names, names
        so = next(i for i in z.infolist() if i.filename.startswith("fastbcast/_C"))
        assert so.file_size < 4 << 20, f"{so.filename}: {so.file_size} bytes (debug symbols not stripped?)"
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        assert "[sglang.srt.plugins]\nfastbcast = fastbcast.integrations.sglang:plugin" in entry_points
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    major, minor = torch.__version__.split(".")[:2]
    assert f"Requires-Dist: torch<{major}.{int(minor) + 1},>={major}.{minor}" in requires or \
        f"Requires-Dist: torch>={major}.{minor},<{major}.{int(minor) + 1}" in requires, requires
    assert not any("msgpack" in r and "extra" not in r for r in requires), requires

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Borrow torch (and numpy) from this interpreter; fastbcast itself comes from the wheel only.
    with open(os.path.join(site, "_borrow_torch.pth"), "w") as f:
        f.write(os.path.dirname(os.path.dirname(torch.__file__)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps",
                    str(wheels[0])], check=True)
    script = tmp_path / "smoke.py"
    script.write_text(SMOKE.format(repo=REPO))
    out = subprocess.run([str(vpy), str(script)], cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "wheel-ok" in out.stdout
    assert sysconfig.get_paths()["purelib"] not in out.stdout
    # The installed hook: idle without FASTBCAST_PATCH, armed with it.
    probe = "import sys; print('fastbcast_autopatch' in sys.modules, 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTBCAST_PATCH")}
    for value, want in ((None, "False False"), ("sglang", "True False")):
        run_env = dict(env, **({"FASTBCAST_PATCH": value} if value else {}))
        out = subprocess.run([str(vpy), "-c", probe], cwd=str(tmp_path), capture_output=True, text=True,
                             timeout=120, env=run_env)
        assert out.returncode == 0 and out.stdout.strip() == want, (value, out.stdout, out.stderr)
