"""Process trees started the way SGLang (0.5.23) and verl start them, for test_autopatch.py.

Run as a script by an interpreter that has fastbcast's startup hook
(``fastbcast-autopatch.pth``) in its site-packages; it prints one JSON line:
for each way a scheduler process comes to be, what that process saw. Nothing
here sets ``FASTBCAST_PATCH``: whatever a process sees came through its
environment, and the patch through the startup hook (or SGLang's plugin hook).

The ways (each read from SGLang's or verl's code):

* ``tp``, ``pp``: ``Engine._launch_scheduler_processes`` with the ``spawn``
  start method: one ``mp.Process(target=run_scheduler_process, args=(...,
  tp_rank, pp_rank, None, writer))`` per (pp_rank, tp_rank), readiness over a
  pipe.
* ``dp_attention``: with DP attention the schedulers are started early with
  SGLang's own ``run_scheduler_process_with_init_pipe`` and get their
  arguments later over a duplex pipe from the DP controller.
* ``dp_controller``: ``run_data_parallel_controller_process`` in its own
  process, which spawns the schedulers of each DP rank.
* ``subprocess``: a plain ``python -c`` child (``python -m sglang.launch_server``
  and any tool that shells out).
* ``ray_actor``: verl's ``SGLangHttpServer`` is a Ray actor whose process gets
  ``runtime_env["env_vars"]`` and launches SGLang in-process, which spawns the
  schedulers: an actor process started with only those variables, and its
  spawned grandchild.
* ``plugin``: no variable; SGLang's ``load_plugins()`` (what
  ``run_scheduler_process`` calls first) finds fastbcast's entry point.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import integ_helpers  # noqa: E402

# At import, which in a spawned child comes before it unpickles its target
# (SGLang's own function, for the DP-attention schedulers): the CUDA build of
# torchvision next to CPU torch needs this before anything imports sglang.
integ_helpers.ensure_torchvision_importable()


def probe(pp: bool = False) -> dict:
    """What this process sees: the variable, and whether the scheduler's bindings are fastbcast's.

    Every probe imports the scheduler's request receiver (which binds both
    functions and brings in communication_op); ``pp`` adds the PP mixin.
    """
    import sglang.srt.distributed.communication_op as comm
    import sglang.srt.managers.scheduler_components.request_receiver as rr

    mods = [rr, comm]
    if pp:
        import sglang.srt.managers.scheduler_pp_mixin as ppm
        mods.append(ppm)
    fb = sys.modules.get("fastbcast.integrations.sglang")
    held = [(m.__name__, n, vars(m)[n]) for m in mods for n in ("broadcast_pyobj", "point_to_point_pyobj")
            if n in vars(m)]
    return {
        "pid": os.getpid(),
        "variable": os.environ.get("FASTBCAST_PATCH"),
        "patched": bool(fb is not None and fb.is_patched() and len(held) >= 3
                        and all(fn is getattr(fb, n) for _, n, fn in held)),
        "modules": [m.__name__ for m in mods],
        # the hook hands modules their own loader back
        "loader": type(sys.modules["sglang.srt.utils.common"].__loader__).__name__,
    }


def run_scheduler_process(server_args, port_args, gpu_id, tp_rank, pp_rank, dp_rank, pipe_writer,
                          display_tp_rank=None, display_dp_rank=None, display_moe_ep_rank=None):
    """Stands in for sglang's run_scheduler_process (same arguments): reports on the pipe."""
    info = probe(pp=pp_rank > 0)
    info.update(tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank)
    pipe_writer.send(info)


def run_data_parallel_controller_process(pipe_writer, run_scheduler_process_func, dp_size=1):
    """Stands in for sglang's controller: spawns one scheduler per DP rank, reports theirs and its own."""
    readers, procs = [], []
    for dp_rank in range(dp_size):
        reader, writer = mp.Pipe(duplex=False)
        p = mp.Process(target=run_scheduler_process_func, args=(None, None, dp_rank, 0, 0, dp_rank, writer))
        p.start()
        writer.close()
        readers.append(reader)
        procs.append(p)
    infos = [r.recv() for r in readers]
    for p in procs:
        p.join()
    pipe_writer.send({"controller_variable": os.environ.get("FASTBCAST_PATCH"), "schedulers": infos})


def ray_actor_main():
    """The actor process: it starts SGLang in-process, which spawns the scheduler (the grandchild)."""
    mp.set_start_method("spawn", force=True)
    reader, writer = mp.Pipe(duplex=False)
    p = mp.Process(target=run_scheduler_process, args=(None, None, 0, 0, 0, None, writer))
    p.start()
    writer.close()
    info = reader.recv()
    p.join()
    print(json.dumps({"actor_pid": os.getpid(), "actor_variable": os.environ.get("FASTBCAST_PATCH"),
                      "grandchild": info}))


def _start(target, *args, **kwargs):
    reader, writer = mp.Pipe(duplex=False)
    p = mp.Process(target=target, args=args + (writer,), kwargs=kwargs)
    p.start()
    writer.close()   # so a child that dies makes recv() raise instead of waiting
    return p, reader


def main():
    from sglang.srt.managers.data_parallel_controller import run_scheduler_process_with_init_pipe

    mp.set_start_method("spawn", force=True)   # as sglang's Engine does
    here = os.path.abspath(__file__)
    started = {}
    # TP 2, and a second PP stage: one scheduler per (pp_rank, tp_rank), arguments at start.
    for name, ranks in (("tp", [(0, 0), (0, 1)]), ("pp", [(1, 0)])):
        started[name] = [_start(run_scheduler_process, None, None, tp, tp, pp, None) for pp, tp in ranks]
    # DP attention: started early with SGLang's own entry, arguments later over the duplex pipe.
    early = []
    for tp_rank in range(1):
        reader, writer = mp.Pipe(duplex=True)
        p = mp.Process(target=run_scheduler_process_with_init_pipe, args=(run_scheduler_process, writer))
        p.start()
        writer.close()
        early.append((p, reader, tp_rank))
    # The DP controller in its own process, spawning the schedulers.
    reader, writer = mp.Pipe(duplex=False)
    ctrl = mp.Process(target=run_data_parallel_controller_process,
                      kwargs=dict(pipe_writer=writer, run_scheduler_process_func=run_scheduler_process))
    ctrl.start()
    writer.close()
    # A plain subprocess, and a Ray actor that got only runtime_env's variables.
    code = f"import json, sys; sys.path.insert(0, {os.path.dirname(here)!r}); import autopatch_probes as a; " \
           "print(json.dumps(a.probe()))"

    sub = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    runtime_env = {"env_vars": {"FASTBCAST_PATCH": os.environ.get("FASTBCAST_PATCH", "")}}
    actor_env = {k: v for k, v in os.environ.items() if k != "FASTBCAST_PATCH"}
    actor_env.update(runtime_env["env_vars"])
    actor = subprocess.Popen([sys.executable, here, "--ray-actor"], stdout=subprocess.PIPE, text=True, env=actor_env)
    # SGLang's plugin route: no variable at all, load_plugins() as run_scheduler_process calls it.
    plugin_env = {k: v for k, v in os.environ.items() if k != "FASTBCAST_PATCH"}
    plugin_env["SGLANG_PLUGINS"] = "fastbcast"
    plugin_code = code.replace("print(", "from sglang.srt.plugins import load_plugins; load_plugins(); print(")
    plugin = subprocess.Popen([sys.executable, "-c", plugin_code], stdout=subprocess.PIPE, text=True,
                              env=plugin_env)

    for p, reader_, tp_rank in early:
        reader_.send(((None, None, tp_rank, tp_rank, 0, 0), (tp_rank, 0, tp_rank)))
    out = {name: [r.recv() for _, r in procs] for name, procs in started.items()}
    out["dp_attention"] = [r.recv() for _, r, _ in early]
    out["dp_controller"] = reader.recv()
    out["subprocess"] = json.loads(sub.communicate()[0].strip().splitlines()[-1])
    out["ray_actor"] = json.loads(actor.communicate()[0].strip().splitlines()[-1])
    out["plugin"] = json.loads(plugin.communicate()[0].strip().splitlines()[-1])
    for procs in started.values():
        for p, _ in procs:
            p.join()
    for p, _, _ in early:
        p.join()
    ctrl.join()
    out["parent_pid"] = os.getpid()
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1:] == ["--ray-actor"]:
        ray_actor_main()
    else:
        main()
