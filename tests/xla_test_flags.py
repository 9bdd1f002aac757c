"""XLA flags of every process the test suite starts (pytest's workers and the programs they run).

`--xla_backend_optimization_level=0` turns off LLVM's optimisation of the code XLA:CPU emits.
The suite's programs run for milliseconds and compile for seconds to tens of seconds each, so
compilation is most of the suite's time; at level 0 a tiny NFNet train step compiles about
twice as fast (measured: 32 s -> 21 s, experiments.reproduce --quick --only cost). XLA's HLO
passes, the fusion decisions and therefore what is computed are the same at every level; only the
machine code is less optimised. Users' runs keep XLA's default. Tests that compare numbers
across processes start every process with these flags, so both sides are compiled alike.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


# A persistent XLA compilation cache (JAX_COMPILATION_CACHE_DIR) shared by the processes ONE
# pytest session starts: programs that several test processes compile (a notebook's runs, a
# training run and the eval of its workdir, the digits train step of many end-to-end tests)
# compile once. tests/conftest.py makes the directory, empty, when the session starts (a run never
# reads what an earlier run wrote, so measured times stay honest) and removes it at exit. A cached
# executable is the compiled program itself: results are the same as compiling it again. The
# pytest processes themselves do not use it: in-process programs are seldom compiled twice, and
# writing every one cost more than it saved. Multi-process (gloo) runs stay out of it
# (`without_session_cache`): in test_multihost_digits, under load, one process of a 2-process run
# that read cached executables crashed and its peer timed out.
SESSION_CACHE_VARIABLE = "NFNETS_TEST_SESSION_XLA_CACHE"


def without_session_cache(env: dict[str, str]) -> dict[str, str]:
    """`env` without the session's compilation cache: for processes of a multi-process run."""
    return {name: value for name, value in env.items() if name != "JAX_COMPILATION_CACHE_DIR"}
