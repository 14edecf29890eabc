"""``mvptr_ds.run.cli`` (the console script, ``python -m mvptr_ds.run``, each rank under a launcher) ends the
process like ``sys.exit(main())`` does, minus the interpreter's module teardown: the exit code, every exit handler,
threads still running, buffered output (Python's and C's) and the process group's destruction are kept."""
import subprocess
import sys

from conftest import REPO, clean_env

PRELUDE = """
import atexit, ctypes, sys, threading, time
atexit.register(lambda: print("exit handler ran"))   # no flush: the exit path must flush it
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
sys.stdout.write("buffered, no newline|")      # stdout is a pipe here: block-buffered
sys.stderr.write("stderr, no newline|")        # stderr: line-buffered
ctypes.CDLL(None).printf(b"printed by C|")     # C's stdout buffer, which os._exit would drop
sys.argv = ["mvptr_ds"] + sys.argv[2:]
from mvptr_ds.run import cli
cli()
raise AssertionError("cli() returned")
"""


def run(tmp_path, *args, prelude=PRELUDE):
    marker = tmp_path / "late.txt"
    proc = subprocess.run([sys.executable, "-c", prelude, str(marker), *args], cwd=REPO,
                          env=clean_env(PYTHONUNBUFFERED=None), capture_output=True, text=True, timeout=120)
    return proc, marker


def cli_with_command(body: str):
    """``cli()`` in a child process whose command (``run_command``) runs ``body``."""
    code = ("import mvptr_ds.run as r\n"
            f"def command(*a, **k):\n    {body}\n"
            "r.run_command = command\nimport sys; sys.argv = ['mvptr_ds', '--max_steps', '1']\nr.cli()")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=120)


def test_success_keeps_code_handlers_threads_and_output(tmp_path):
    proc, marker = run(tmp_path, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("buffered, no newline|") and "exit handler ran" in proc.stdout, proc.stdout
    assert "printed by C|" in proc.stdout and "stderr, no newline|" in proc.stderr, (proc.stdout, proc.stderr)
    assert marker.read_text() == "written after main returned"
    assert "module teardown ran" not in proc.stdout  # the teardown (1-2 s for torch) is what cli() skips


def test_user_error_exits_2_with_its_line(tmp_path):
    proc, marker = run(tmp_path, "no_such_command")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1].removeprefix("stderr, no newline|")  # the prelude's unfinished line
    assert last.startswith("error: unknown command 'no_such_command'"), proc.stderr
    assert "exit handler ran" in proc.stdout and marker.exists()


def test_a_failing_thread_exit_callback_keeps_the_status(tmp_path):
    """As the interpreter does: the exception is reported, the exit status stays main()'s."""
    prelude = PRELUDE.replace("from mvptr_ds.run import cli", "def fail():\n    raise RuntimeError('callback failed')\n"
                              "threading._register_atexit(fail)\nfrom mvptr_ds.run import cli")
    proc, _ = run(tmp_path, "no_such_command", prelude=prelude)
    assert proc.returncode == 2 and "RuntimeError: callback failed" in proc.stderr, proc.stderr
    assert "exit handler ran" in proc.stdout


def test_a_string_exit_is_status_1_with_its_message():
    """``sys.exit("message")`` inside a command: the message on stderr, status 1 (never 0)."""
    proc = cli_with_command("raise SystemExit('fatal: stopped')")
    assert proc.returncode == 1 and proc.stderr.strip() == "fatal: stopped", proc.stderr


def test_the_process_group_is_destroyed(tmp_path):
    code = ("import torch.distributed as dist\n"
            f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
            "destroy = dist.destroy_process_group\n"
            "def traced(*a, **k):\n    destroy(*a, **k)\n    print('destroyed', dist.is_initialized())\n"
            "dist.destroy_process_group = traced\n"
            "import sys; sys.argv = ['mvptr_ds', '--version']\nfrom mvptr_ds.run import cli\ncli()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "destroyed False" in proc.stdout, (proc.stdout, proc.stderr)


def test_a_crash_is_an_ordinary_traceback():
    """An unexpected exception leaves cli() the usual way: traceback, exit code 1."""
    proc = cli_with_command("raise RuntimeError('unexpected')")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and proc.stderr.strip().endswith("RuntimeError: unexpected"), proc.stderr
