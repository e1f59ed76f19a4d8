"""Which CPUs the serving processes run on, for CPU engines that share a box with them.

vLLM's CPU backend binds a worker's compute threads to the cores in
`VLLM_CPU_OMP_THREADS_BIND`, and leaves the rest floating: its EngineCore, which
schedules every step and busy-waits on the worker between them, the replica process
with vLLM's OpenAI layer, and here Ray's own processes, the ingress and the router.
Whatever floats onto a worker's core takes turns with that worker's forward pass: on a
2-core box serving P/D, tokens came 20-25% slower than with the same processes kept
off the decode worker's core (`benchmarks/pd_overhead.py`, layouts rotated per request
on one server). vLLM itself counts a core per EngineCore outside its workers' (its
`reserve_cpu_num`) but does not place anything there.

An engine whose pool sets `distributed_executor_backend: uni` has no worker process:
its EngineCore computes, started in the environment vLLM gives a CPU worker
(serving/engine.py), so its main thread and OpenMP team are bound to
`VLLM_CPU_OMP_THREADS_BIND` like a worker's. Its other threads (input, output,
ZeroMQ's), started after the binding, inherit the compute core; `place_engine` moves
them to the pool's `engine_cpus`, else `cpus` (`compute_threads` tells them apart).
That is configs/cpu-pd.yaml's layout: the decode engine computes alone on core 1, and
the decode replica and the EngineCore's other threads wait on core 0. No step is handed
between processes and nobody busy-waits: servers taking turns per request (20 each,
one stream at a time), tokens from the 2nd on came in 4.59 ms against 5.55 ms with
worker processes and the EngineCores on their replicas' cores (vLLM's own server,
beside them: 4.77 ms). With the EngineCore's other threads left on the compute core,
its output thread got the core only after the forward pass and sent two steps' outputs
together: two tokens in one SSE event 4-5 times in 60 requests, against 0-1 with them
on core 0 (ftrace: core 0 mostly idle when it happened, so not the replica falling
behind).

Three settings, in Linux CPU-list form ("0", "2-3,6"):
  - `serving_cpus` (app): Ray's processes (under `pdserve serve`, which sets it on
    itself before starting Ray, so everything Ray starts inherits it), the ingress and
    the router actor.
  - `cpus` (pool): the pool's replica processes, and their EngineCores unless
    `engine_cpus` is set; the worker's compute threads stay where vLLM binds them.
  - `engine_cpus` (pool): the pool's EngineCores.

An engine replica first widens itself to the CPUs `pdserve serve` was started with, so
the processes vLLM starts may bind to any of them, then narrows itself and its
EngineCore once the engine is up. Threads inherit their creator's CPUs, so threads
started later stay within them.

An EngineCore on its own worker's core (`engine_cpus`) takes turns with nothing but
its worker: each busy-waits on the other with sched_yield, so whichever has work runs,
and the replica's per-token work (vLLM's OpenAI layer, the ingress, the client's
socket) stays on the other cores. On the 2-core box with configs/cpu-pd.yaml, the
decode EngineCore moved from core 0 to core 1 (its worker's, `engine_cpus: "1"`), one
stream at a time: tokens from the 2nd on 11.5% faster (5.22 -> 4.62 ms, servers taking
turns per request; the gap between its steps fell from 0.51 to 0.02 ms), TTFT
unchanged; 8 streams at a time (`pdserve bench ab`, 48 requests, two rounds): TTFT and
ITL medians unchanged, throughput 3% higher. Then the prefill EngineCore moved from
core 1 to core 0 (its worker's): one stream, TTFT 4.5% shorter, ITL unchanged; 8
streams, TTFT 4% shorter, throughput 2% higher. Not kept: the EngineCore's other
threads (input, output, ZeroMQ) off its worker's core (no change), and the prefill
replica on core 0 as well (one stream, tokens 3% faster; 8 streams, 3% fewer
tokens/s). configs/cpu-pd.yaml does not use this layout (below).

With the decode EngineCore on core 1, tokens are made there whatever holds core 0,
where the replica and the ingress pass each one on; when they fell behind, the next
token joined it in one SSE event (vLLM's output collector merges what its reader has
not taken). Ray had them fall behind: it starts its workers at nice 15
(`RAY_worker_niceness`), but Linux keeps a nice value per thread and Ray renices the
worker's main thread only after its RPC threads have started, so those stay at 0 with
Ray's daemons, ahead of the replica's event loop. 60 streamed requests per server start
(1,000-token prompts), counting events of more than one token: EngineCores on their
replicas' cores, 0 in 3 starts; decode EngineCore on core 1, 4-9 per start (3 starts);
the same with every thread of the tree at one nice value, 0-1 (`RAY_worker_niceness=0`,
3 starts) and 0 (all raised to 15, 3 starts); both EngineCores on their workers' cores
with `RAY_worker_niceness=0`, 0-2. Not the cause: the decode EngineCore's other
threads on core 0 (5-9 per start). One nice value costs no speed: Ray's default
against `RAY_worker_niceness=0`, servers taking turns per request (20 each), tokens
from the 2nd on 4.76 against 4.75 ms, TTFT 121.7 against 123.5 ms. So `pdserve serve`
sets `RAY_worker_niceness=0` (serving/server.py) unless it is set; under `serve run`
or KubeRay, set it where Ray starts. Still, in a fresh-clone CI run the layout failed
tests/test_pd_e2e.py's check of one SSE event per token again (72 events, its server
new, every code path cold): with the EngineCore on core 0, a stall there holds up the
next token too, and so configs/cpu-pd.yaml kept the EngineCores on their replicas'
cores, the slower but burst-free layout, until it ran each engine without a worker
process (below).
(When first tried, a client leaving mid-stream sometimes did not stop its decode, in 3
of 7 runs of tests/test_pd_e2e.py. The old layout did the same once its test said
which step was missed: the ingress's relay dropped the cancel, in Python 3.11's
asyncio.wait_for; serving/ingress.py `_next_before`.)

Sharing a CPU with them, the EngineCore takes turns with the serving processes: every token
wakes the replica's OpenAI layer, the ingress and the client's socket just as the
EngineCore has to schedule the next step and answer the worker (twice a step: the
forward, then the sampling). A pool's `engine_nice` puts every EngineCore thread ahead
of them. (Under `pdserve serve` everything runs at 0, above. Ray's default starts an
engine at nice 15, `RAY_worker_niceness`, which the EngineCore and workers inherit from
the replica, while Ray's daemons and some of the replicas' threads run at 0.)
A trade-off, measured on the 2-core box with configs/cpu-pd.yaml as it was before
`engine_cpus` (decode EngineCore on core 0 with the prefill worker and the serving
processes):
  - one stream at a time (1,000-token prompts, 64 out; step traces beside vLLM's own
    server): at -10 the gap between steps fell from 0.56 to 0.16-0.21 ms and tokens
    came 10-13% faster; at -3, 9% faster.
  - 8 streams at a time (`pdserve bench ab`, 48 requests, two rounds): at -3, TTFT
    29% longer and 8% fewer tokens/s; at -10, 64% and 14%. The EngineCore busy-waits
    on its worker through every step, and ahead of the prefill worker on its core,
    that wait is taken from prefills.
So it is unset in the shipped configs. Raising the replicas' nice instead did not help,
nor did Ray's workers at 0 (`RAY_worker_niceness=0`, in that layout: ITL not clearly
better, and slower outliers; it is the default now for the bursts above). Lowering a
nice value needs CAP_SYS_NICE; without it the replica warns and leaves it.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

logger = logging.getLogger("pdserve.placement")

LAUNCH_CPUS_ENV = "PDSERVE_LAUNCH_CPUS"  # the CPUs `pdserve serve` was started with


def parse_cpu_list(text: str) -> set[int]:
    """"0-2,5" -> {0, 1, 2, 5}; ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, sep, last = part.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"not a CPU list: {text!r} (expected e.g. '0', '2-3,6')")
        low, high = int(first), int(last) if sep else int(first)
        if high < low:
            raise ValueError(f"not a CPU list: {text!r} ({part!r} runs backwards)")
        cpus.update(range(low, high + 1))
    return cpus


def format_cpu_list(cpus: set[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def pin_process(pid: int, cpus: set[int], keep: set[int] = frozenset()) -> int:
    """Put every thread of process `pid` but those in `keep` on `cpus`; returns how many
    were moved. Threads that end meanwhile are skipped; OSError if none of `cpus` is
    usable here."""
    return _each_thread(pid, lambda tid: os.sched_setaffinity(tid, cpus), keep)


def compute_threads(pid: int) -> set[int]:
    """The threads of process `pid` that vLLM's CPU worker bound to its cores, if it runs
    one: the main thread, on the first core of `VLLM_CPU_OMP_THREADS_BIND`, and its
    OpenMP team, one core each of the rest. A thread started after the binding inherits
    the main thread's core (vLLM's EngineCore starts its input and output threads
    then), so a thread on one other core is of the team. Empty if the main thread is
    not on one core: nothing was bound."""
    try:
        main = os.sched_getaffinity(pid)
    except ProcessLookupError:
        return set()
    if len(main) != 1:
        return set()
    bound = {pid}
    for tid in _thread_ids(pid):
        try:
            cpus = os.sched_getaffinity(tid)
        except ProcessLookupError:  # ended meanwhile
            continue
        if len(cpus) == 1 and cpus != main:
            bound.add(tid)
    return bound


def _is_engine_core(pid: int) -> bool:
    """Whether `pid` is vLLM's EngineCore (its process title; the replica's other
    children, such as multiprocessing's resource tracker, started in the same
    environment, have their main thread bound too, and move)."""
    return "EngineCore" in (process_name(pid) or "")


def process_name(pid: int) -> str | None:
    """The first word of `pid`'s command line (a process title such as vLLM's
    "VLLM::EngineCore" or Ray's "ray::ServeReplica:..." replaces it); None if it has
    ended."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None


def renice_process(pid: int, nice: int) -> int:
    """Every thread of process `pid` at `nice` (Linux keeps it per thread); returns how
    many were changed. PermissionError if not allowed."""
    return _each_thread(pid, lambda tid: os.setpriority(os.PRIO_PROCESS, tid, nice))


def _each_thread(pid: int, apply: Callable[[int], None], skip: set[int] = frozenset()
                 ) -> int:
    """`apply(tid)` for every thread of process `pid` not in `skip`; how many it was
    applied to (a thread that ends meanwhile is skipped, an ended process has none)."""
    done = 0
    for tid in _thread_ids(pid):
        if tid in skip:
            continue
        try:
            apply(tid)
        except ProcessLookupError:
            continue
        done += 1
    return done


def _thread_ids(pid: int) -> list[int]:
    """The threads of process `pid`; none if it has ended."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):  # CONFIG_PROC_CHILDREN
        return [other for other in all_pids() if parent_pid(other) == pid]
    children = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children += [int(child) for child in f.read().split()]
        except FileNotFoundError:  # the thread ended
            continue
    return children


def process_tree(root: int) -> list[int]:
    """`root` and every process below it, parents first."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        ppid = parent_pid(pid)
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    pids, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def parent_pid(pid: int) -> int | None:
    """`pid`'s parent, or None if it has ended."""
    return _stat_field(pid, 4)


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot), or None if it has ended: a
    pid names the same process only while this is unchanged."""
    return _stat_field(pid, 22)


def _stat_field(pid: int, number: int) -> int | None:
    """Field `number` (1-based, as proc(5) numbers them) of /proc/<pid>/stat, an integer
    after the command name; None if the process has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[number - 3])
    except (OSError, IndexError, ValueError):
        return None


def usable(cpus: str, setting: str) -> set[int]:
    """`cpus` parsed; a clear error for CPUs no process here may run on (absent, or
    outside the container's cpuset), before anything is moved or started."""
    wanted = parse_cpu_list(cpus)
    allowed = _allowed_cpus()
    if not wanted & allowed:
        raise ValueError(f"{setting}: CPUs {format_cpu_list(wanted)} are not available "
                         f"here (allowed: {format_cpu_list(allowed)})")
    return wanted


def place_serving(cpus: str | None) -> None:
    """This process (the ingress, `pdserve serve`) on the app's `serving_cpus`."""
    if cpus is not None:
        pin_process(os.getpid(), usable(cpus, "serving_cpus"))


def widen_for_engine() -> None:
    """Before vLLM starts its processes: back to the CPUs `pdserve serve` was started
    with (it narrowed itself, and so everything Ray starts, to `serving_cpus`), so a
    worker may bind to its cores."""
    launch = os.environ.get(LAUNCH_CPUS_ENV)
    if launch:
        pin_process(os.getpid(), parse_cpu_list(launch))


def place_engine(cpus: set[int] | None, engine_cpus: set[int] | None = None,
                 worker_in_engine: bool = False) -> None:
    """Once the engine is up: this replica process on `cpus`, and its EngineCore (its
    child processes, whose own children, the workers, keep vLLM's binding) on
    `engine_cpus`, else on `cpus`: a pool's settings as `usable` returned them. With
    `worker_in_engine` (the pool's `distributed_executor_backend: uni`), the EngineCore
    computes itself: its compute threads keep vLLM's binding, and its other threads
    (input, output, ZeroMQ's) move."""
    pid = os.getpid()
    if cpus is not None:
        moved = pin_process(pid, cpus)
        logger.info("replica %d on CPUs %s (%d threads)", pid, format_cpu_list(cpus), moved)
    engine_cpus = engine_cpus if engine_cpus is not None else cpus
    if engine_cpus is not None:
        moved = sum(pin_process(child, engine_cpus, compute_threads(child)
                                if worker_in_engine and _is_engine_core(child) else set())
                    for child in child_pids(pid))
        logger.info("its engine scheduler%s on CPUs %s (%d threads)",
                    "'s I/O threads" if worker_in_engine else "",
                    format_cpu_list(engine_cpus), moved)


def prioritize_engine(nice: int | None) -> None:
    """Once the engine is up: every thread of this replica's EngineCore (its child
    processes; their own children, the workers, are left as they are) at `nice`. Threads
    inherit their creator's, so those started later get it too. Without the privilege a
    lower value needs, a warning, and nothing changes."""
    if nice is None:
        return
    changed = 0
    for child in child_pids(os.getpid()):
        try:
            changed += renice_process(child, nice)
        except PermissionError:
            logger.warning("engine_nice %d: not permitted here (a value below the "
                           "current one needs CAP_SYS_NICE); the engine scheduler keeps "
                           "nice %d", nice, os.getpriority(os.PRIO_PROCESS, child))
            return
    logger.info("engine scheduler at nice %d (%d threads)", nice, changed)


def _allowed_cpus() -> set[int]:
    """The CPUs any process here may use (the container's cpuset), not just this one's
    current mask, which `pdserve serve` may have narrowed."""
    try:
        with open("/sys/fs/cgroup/cpuset.cpus.effective") as f:
            text = f.read().strip()
        if text:
            return parse_cpu_list(text)
    except (OSError, ValueError):
        pass
    return set(range(os.cpu_count() or 1))
