"""``mvptr_ds.run.cli`` (the console script, ``python -m mvptr_ds.run``, each rank under a launcher) ends the
process like ``sys.exit(main())`` does, minus the interpreter's module teardown: the exit code, every exit handler,
threads still running and buffered output are kept."""
import subprocess
import sys

from conftest import REPO, clean_env

PRELUDE = """
import atexit, sys, threading, time
atexit.register(lambda: print("exit handler ran", flush=True))
out = sys.argv[1]
def late_writer():
    time.sleep(0.5)
    with open(out, "w") as f:
        f.write("written after main returned")
threading.Thread(target=late_writer).start()   # not a daemon: the interpreter would wait for it
class Noisy:
    def __del__(self):
        print("module teardown ran", flush=True)
kept = Noisy()                                 # freed only by the interpreter's teardown of __main__
sys.stdout.write("buffered, no newline")       # stdout is a pipe here: block-buffered
sys.argv = ["mvptr_ds"] + sys.argv[2:]
from mvptr_ds.run import cli
cli()
raise AssertionError("cli() returned")
"""


def run(tmp_path, *args):
    marker = tmp_path / "late.txt"
    proc = subprocess.run([sys.executable, "-c", PRELUDE, str(marker), *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    return proc, marker


def test_success_keeps_code_handlers_threads_and_output(tmp_path):
    proc, marker = run(tmp_path, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("buffered, no newline") and "exit handler ran" in proc.stdout, proc.stdout
    assert marker.read_text() == "written after main returned"
    assert "module teardown ran" not in proc.stdout  # the teardown (1-2 s for torch) is what cli() skips


def test_user_error_exits_2_with_its_line(tmp_path):
    proc, marker = run(tmp_path, "no_such_command")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown command 'no_such_command'"), proc.stderr
    assert "exit handler ran" in proc.stdout and marker.exists()


def test_a_crash_is_an_ordinary_traceback():
    """An unexpected exception leaves cli() the usual way: traceback, exit code 1."""
    code = ("import mvptr_ds.run as r\n"
            "def boom(*a, **k):\n    raise RuntimeError('unexpected')\n"
            "r.run_command = boom\nimport sys; sys.argv = ['mvptr_ds', '--max_steps', '1']\nr.cli()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and proc.stderr.strip().endswith("RuntimeError: unexpected"), proc.stderr
