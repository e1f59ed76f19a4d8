"""CPU placement (serving/placement.py) on real processes: each case runs in a
subprocess of its own, so this test process keeps its CPUs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from serving.config import AppConfig
from serving.placement import format_cpu_list, parse_cpu_list
from tests.helpers.servers import REPO

CPUS = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")


@pytest.mark.parametrize("text, cpus", [("0", {0}), ("2-3,6", {2, 3, 6}),
                                        (" 1 , 4-5", {1, 4, 5}), ("3-3", {3})])
def test_cpu_lists_parse(text, cpus):
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "1,,2", "-1"])
def test_bad_cpu_lists_are_refused_with_the_field_named(text):
    with pytest.raises(ValueError, match="not a CPU list"):
        parse_cpu_list(text)
    with pytest.raises(ValidationError, match="decode.cpus"):
        AppConfig.model_validate({"prefill": {}, "decode": {"cpus": text}})
    with pytest.raises(ValidationError, match="prefill.engine_cpus"):
        AppConfig.model_validate({"prefill": {"engine_cpus": text}, "decode": {}})
    with pytest.raises(ValidationError, match="serving_cpus"):
        AppConfig.model_validate({"aggregated": {}, "serving_cpus": text})


def _run(code: str, env: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line, returned here."""
    return _run_logged(code, env)[0]


def _run_logged(code: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """`_run`, and what the code wrote to stderr (its log)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


AFFINITIES = """
    import json, os, subprocess, sys, threading, time
    def threads_of(pid):
        return sorted({tuple(sorted(os.sched_getaffinity(int(t))))
                       for t in os.listdir(f"/proc/{pid}/task")})
"""


@needs_two
@pytest.mark.parametrize("engine_cpus", [False, True])
def test_an_engine_replica_and_its_children_move_but_grandchildren_keep_theirs(engine_cpus):
    first, second = CPUS[0], CPUS[1]
    engine = second if engine_cpus else first
    result = _run(AFFINITIES + f"""
    from serving.placement import place_engine
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    # a child (vLLM's EngineCore) with a thread, and its child (the worker), bound
    child = subprocess.Popen([sys.executable, "-c", '''
    import os, subprocess, sys, threading, time
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    worker = subprocess.Popen([sys.executable, "-c", "import os, time; os.sched_setaffinity(0, {{{first}, {second}}}); print(os.getpid(), flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    print(worker.stdout.readline().strip(), flush=True)
    time.sleep(30)
    '''], stdout=subprocess.PIPE, text=True)
    worker = int(child.stdout.readline())
    place_engine({{{first}}}, {{{second}}} if {engine_cpus} else None)
    later = []
    t = threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0))))
    t.start(); t.join()
    print(json.dumps({{"own": threads_of(os.getpid()), "child": threads_of(child.pid),
                      "worker": threads_of(worker), "later": later[0]}}))
    child.kill(); os.kill(worker, 9)
    """)
    assert result["own"] == [[first]]  # every thread of the replica
    assert result["child"] == [[engine]]  # every thread of its EngineCore
    assert result["worker"] == [sorted({first, second})]  # vLLM's binding
    assert result["later"] == [first]  # a thread started afterwards inherits it


@needs_two
def test_an_engine_core_that_computes_keeps_its_bound_threads_and_moves_the_rest():
    """`distributed_executor_backend: uni`: the EngineCore is its own worker. Its main
    thread and OpenMP team (bound, one core each) stay; threads started after the binding
    (inheriting the main thread's core: vLLM's input and output threads) move, as does
    every thread of another child started in the same environment."""
    first, second = CPUS[0], CPUS[1]
    engine_core = textwrap.dedent(f"""
        import os, threading, time, setproctitle
        setproctitle.setproctitle("VLLM::EngineCore")
        os.sched_setaffinity(0, {{{second}}})  # the main thread, as libgomp binds it
        def team():
            os.sched_setaffinity(0, {{{first}}})
            time.sleep(30)
        threading.Thread(target=team, daemon=True).start()
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()  # inherits
        time.sleep(0.3)
        print("ready", flush=True)
        time.sleep(30)
        """)
    helper = (f"import os, time; os.sched_setaffinity(0, {{{second}}}); "
              "print('ready', flush=True); time.sleep(30)")
    result = _run(AFFINITIES + f"""
    from serving.placement import compute_threads, place_engine
    children = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                 text=True) for code in ({engine_core!r}, {helper!r})]
    for child in children:
        child.stdout.readline()
    engine, other = children
    bound = compute_threads(engine.pid)
    place_engine({{{first}}}, None, worker_in_engine=True)
    rest = [t for t in map(int, os.listdir(f"/proc/{{engine.pid}}/task")) if t not in bound]
    print(json.dumps({{"main": sorted(os.sched_getaffinity(engine.pid)),
                      "team": len(bound - {{engine.pid}}),
                      "rest": sorted({{tuple(sorted(os.sched_getaffinity(t))) for t in rest}}),
                      "helper": threads_of(other.pid)}}))
    for child in children:
        child.kill()
    """)
    assert result["main"] == [second]
    assert result["team"] == 1  # the thread bound to another core
    assert result["rest"] == [[first]]
    assert result["helper"] == [[first]]


@needs_two
def test_serving_cpus_then_an_engine_widens_back_to_the_launch_cpus():
    first = CPUS[0]
    result = _run(AFFINITIES + f"""
    from serving.placement import LAUNCH_CPUS_ENV, format_cpu_list, place_serving, widen_for_engine
    os.environ[LAUNCH_CPUS_ENV] = format_cpu_list(os.sched_getaffinity(0))
    place_serving("{first}")
    serving = threads_of(os.getpid())
    widen_for_engine()
    print(json.dumps({{"serving": serving, "engine": threads_of(os.getpid())}}))
    """)
    assert result["serving"] == [[first]]
    assert result["engine"] == [CPUS]


def test_cpus_this_box_lacks_are_a_clear_error():
    missing = max(CPUS) + 64
    done = subprocess.run(
        [sys.executable, "-c", f"from serving.placement import usable; "
                               f"usable('{missing}', 'cpus')"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"cpus: CPUs {missing} are not available here" in done.stderr


def test_children_are_found_with_or_without_the_proc_children_file():
    from serving.placement import all_pids, child_pids, parent_pid

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        scanned = [pid for pid in all_pids() if parent_pid(pid) == os.getpid()]
        assert child.pid in child_pids(os.getpid())
        assert child.pid in scanned
    finally:
        child.kill()
        child.wait()


NICE_TREE = """
    import json, logging, os, sys, threading, time
    from serving.placement import prioritize_engine
    logging.basicConfig(level=logging.INFO)
    def nice_of(pid):
        return sorted({os.getpriority(os.PRIO_PROCESS, int(t))
                       for t in os.listdir(f"/proc/{pid}/task")})
    def spawn(body):
        pid = os.fork()
        if pid == 0:
            body()
            os._exit(0)
        return pid
    def engine_core():  # a thread of its own, and a child (the worker)
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        worker = spawn(lambda: time.sleep(30))
        os.write(w, f"{worker}\\n".encode())
        time.sleep(30)
"""


def test_an_engine_scheduler_gets_its_nice_value_and_the_workers_keep_theirs():
    result = _run(NICE_TREE + """
    base = os.getpriority(os.PRIO_PROCESS, 0)
    r, w = os.pipe()
    core = spawn(engine_core)
    worker = int(os.read(r, 100))
    time.sleep(0.2)  # the EngineCore's thread is up
    prioritize_engine(base + 7)  # raising needs no privilege
    print(json.dumps({"base": base, "own": nice_of(os.getpid()), "core": nice_of(core),
                      "core_threads": len(os.listdir(f"/proc/{core}/task")),
                      "worker": nice_of(worker)}))
    os.kill(core, 9); os.kill(worker, 9)
    """)
    base = result["base"]
    assert result["core"] == [base + 7] and result["core_threads"] == 2  # every thread
    assert result["own"] == [base]  # the replica's own: it serves the tokens
    assert result["worker"] == [base]  # the worker keeps what vLLM gave it


@pytest.mark.skipif(os.geteuid() != 0 and resource.getrlimit(resource.RLIMIT_NICE)[0] > 20,
                    reason="this process may lower its nice value")
def test_an_engine_nice_that_needs_a_privilege_this_process_lacks_warns():
    drop = "os.setuid(65534)  # nobody: no CAP_SYS_NICE" if os.geteuid() == 0 else ""
    result, log = _run_logged(NICE_TREE + f"""
    {drop}
    r, w = os.pipe()
    core = spawn(engine_core)
    worker = int(os.read(r, 100))
    prioritize_engine(-5)
    print(json.dumps({{"core": nice_of(core)}}))
    os.kill(core, 9); os.kill(worker, 9)
    """)
    assert result == {"core": [0]}
    assert "engine_nice -5: not permitted here" in log
