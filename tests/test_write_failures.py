"""Outputs under failure: full and read-only disks, kills and Ctrl-C in the write window, stale
temporaries, and the one error path (exit codes, --debug, internal errors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lowrank_audit.cli import app
from lowrank_audit.errors import OutputError
from lowrank_audit.io import outputs
from lowrank_audit.io.outputs import atomic_file, remove_stale, write_text

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
BASE, FT = str(SAMPLES / "base.safetensors"), str(SAMPLES / "finetuned.safetensors")
runner = CliRunner()


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr and "\x1b" not in result.stderr
    return lines[0]


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if "lowrank-audit" in p.name)


# Every command that writes, as (name, arguments given the folder to write in).
WRITERS = {
    "spectrum": lambda d: ["spectrum", FT, "--out", str(d / "r.parquet")],
    "recommend": lambda d: ["recommend", FT, "--base", BASE, "--out", str(d / "ranks.parquet")],
    "recommend-peft": lambda d: ["recommend", FT, "--base", BASE, "--peft-config", str(d / "adapter_config.json")],
    "compress": lambda d: ["compress", FT, "--base", BASE, "--rank", "2", "--out", str(d / "adapter")],
    "compress-factorized": lambda d: ["compress", BASE, "--rank", "2", "--out", str(d / "lowrank")],
    "check-junit": lambda d: ["check", FT, "--policy", str(d.parent / "policy.toml"), "--junit", str(d / "j.xml")],
    "check-out": lambda d: ["check", FT, "--policy", str(d.parent / "policy.toml"), "--out", str(d / "c.parquet")],
}


@pytest.fixture
def mount(tmp_path):
    """Mount a small tmpfs at tmp_path/mnt with the given options; skip where mounting is not allowed."""
    mounted = []

    def make(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    (tmp_path / "policy.toml").write_text("forbid-nonfinite = true\n")
    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_full_disk_is_exit_2_one_line_and_nothing_left(mount, command):
    disk = mount("size=256k")
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill it to the last block
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    result = runner.invoke(app, WRITERS[command](disk))
    assert result.exit_code == 2, result.output  # never check's 1 ("a rule failed")
    line = one_error_line(result)
    assert f"cannot write {disk}/" in line and "No space left on device" in line, line
    assert "lowrank-audit" not in line  # the output's name, not its temporary's
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_a_read_only_folder_is_exit_2_one_line(mount, command):
    disk = mount("ro,size=64k")
    result = runner.invoke(app, WRITERS[command](disk))
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert f"cannot write {disk}/" in line and "Read-only file system" in line, line
    assert "lowrank-audit" not in line  # the output's name, not its temporary's
    assert list(disk.iterdir()) == []


def test_the_same_commands_succeed_with_room(tmp_path):
    """The negative control of the two tests above: the failure is the disk's, not the commands'."""
    (tmp_path / "policy.toml").write_text("forbid-nonfinite = true\n")
    room = tmp_path / "room"
    room.mkdir()
    for command, args in WRITERS.items():
        result = runner.invoke(app, args(room))
        assert result.exit_code == 0, (command, result.output)
    assert temporaries(room) == []


def test_os_errors_of_libraries_name_the_cause():
    from safetensors import SafetensorError

    assert outputs._cause(OSError(28, "No space left on device")) == "No space left on device"
    wrapped = SafetensorError("Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem, ... })")
    assert outputs._cause(SafetensorError("I/O error: No space left on device (os error 28)")) == os.strerror(28)
    assert "IoError" in outputs._cause(wrapped)  # no code to read: the library's own words
    with (
        pytest.raises(OutputError, match=r"cannot write .*x\.txt: No space left on device"),
        outputs._writing(Path("x.txt")),
    ):
        raise OSError(28, "No space left on device")


def test_stale_temporaries_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    host = outputs._HOST
    stale_file = tmp_path / f".report.parquet.lowrank-audit.{host}.{pid}.tmp"
    stale_folder = tmp_path / f".adapter.lowrank-audit.{host}.{pid}.tmp"
    stale_old = tmp_path / f".adapter.lowrank-audit.{host}.{pid}.old"
    live = tmp_path / f".other.lowrank-audit.{host}.{os.getppid()}.tmp"  # a running process's: kept
    remote = tmp_path / f".other.lowrank-audit.otherhost.{pid}.tmp"  # another machine's: cannot tell, kept
    mine = tmp_path / ".notes.tmp"  # not ours: kept
    stale_file.write_bytes(b"half")
    stale_folder.mkdir()
    (stale_folder / "adapter_model.safetensors").write_bytes(b"half")
    stale_old.mkdir()
    (tmp_path / "adapter").mkdir()  # the run finished its replacement: the old copy is garbage
    for path in (live, remote, mine):
        path.write_bytes(b"x")
    write_text(tmp_path / "out.txt", "done\n")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([live.name, remote.name, mine.name, "adapter", "out.txt"])
    assert remove_stale(tmp_path) == []


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("old")
    with pytest.raises(OutputError), atomic_file(target, force=True) as tmp:
        tmp.write_text("new, half")
        raise OSError(28, "No space left on device")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.txt"]


def _big_checkpoint(folder: Path) -> Path:
    """12 matrices of 768 x 768: the factor pass takes long enough to be caught inside the write window."""
    gen = torch.Generator().manual_seed(0)
    path = folder / "big.safetensors"
    save_file({f"layers.{i}.weight": torch.randn(768, 768, generator=gen) for i in range(12)}, path)
    return path


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "lowrank_audit", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temporary(proc: subprocess.Popen, folder: Path, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = temporaries(folder)
        if found:
            return found
        time.sleep(0.005)
    pytest.fail(f"no temporary appeared in {folder} (exit {proc.poll()})")


def _signal_in_the_write_window(folder: Path, sig: int) -> tuple[subprocess.Popen, str, Path, Path]:
    """Start a compress whose factor pass runs inside its write window, signal it once its
    temporary exists; returns the process, its stderr, the checkpoint and the output."""
    ckpt, out = _big_checkpoint(folder), folder / "lowrank"
    proc = _start(["compress", str(ckpt), "--rank", "64", "--method", "exact", "--out", str(out)], folder)
    _wait_for_temporary(proc, folder)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, err, ckpt, out


def test_a_kill_in_the_write_window_leaves_no_output_and_the_next_run_cleans_up(tmp_path):
    _, _, ckpt, out = _signal_in_the_write_window(tmp_path, signal.SIGKILL)
    assert not out.exists()
    assert temporaries(tmp_path), "the killed run left its temporary (nothing could remove it)"
    # The next run that writes there removes it, and its own output is whole.
    done = _start(["compress", str(ckpt), "--rank", "8", "--method", "exact", "--out", str(out)], tmp_path)
    assert done.wait(timeout=300) == 0, done.communicate()
    assert temporaries(tmp_path) == [] and (out / "compress-report.parquet").exists()


def test_ctrl_c_prints_one_line_exits_130_and_removes_its_temporaries(tmp_path):
    proc, err, _, out = _signal_in_the_write_window(tmp_path, signal.SIGINT)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["Error: interrupted; unfinished outputs were removed"], err
    assert not out.exists() and temporaries(tmp_path) == []


def test_debug_shows_the_traceback_and_the_line(tmp_path):
    missing = str(tmp_path / "absent.safetensors")
    plain = runner.invoke(app, ["spectrum", missing])
    assert plain.exit_code == 2 and "Traceback" not in plain.stderr
    debug = runner.invoke(app, ["--debug", "spectrum", missing])
    assert debug.exit_code == 2 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_a_bug_is_exit_70_with_its_traceback_never_check_s_1(monkeypatch):
    import lowrank_audit.analyses.spectrum as spectrum

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(spectrum, "load_spectrum", broken)
    result = runner.invoke(app, ["check", FT])
    assert result.exit_code == 70
    assert "Traceback" in result.stderr and "ZeroDivisionError: a bug" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: internal error (ZeroDivisionError)")


def test_an_unreadable_report_is_exit_2_not_1(tmp_path):
    report = tmp_path / "r.parquet"
    report.write_bytes(b"PAR1 not really")
    result = runner.invoke(app, ["check", str(report)])
    assert result.exit_code == 2
    assert "r.parquet" in one_error_line(result)


def test_a_kill_while_replacing_a_folder_gets_the_old_one_back(tmp_path):
    """Killed between moving the old output aside and moving the new one in: the next write
    there restores the old output (the new one may be incomplete) instead of deleting both."""
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    old = tmp_path / f".adapter.lowrank-audit.{outputs._HOST}.{dead}.old"
    new = tmp_path / f".adapter.lowrank-audit.{outputs._HOST}.{dead}.tmp"
    for folder, text in ((old, "old"), (new, "half")):
        folder.mkdir()
        (folder / "adapter_config.json").write_text(text)
    huge = tmp_path / f".x.lowrank-audit.{outputs._HOST}.{10**25}.tmp"  # no PID of this system: left alone
    huge.write_text("x")
    write_text(tmp_path / "notes.txt", "done\n")
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", "notes.txt", huge.name])


def test_control_characters_from_a_file_never_reach_the_terminal(tmp_path):
    """A hostile name (a terminal-title sequence, a newline) is shown escaped, on one line."""
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.ones(2, 2)}, folder / "model-1.safetensors")
    hostile = "\x1b]0;PWNED\x07\x1b(0\nmodel-1.safetensors"
    index = {"weight_map": {"w": "model-1.safetensors", "v": f"/{hostile}"}}
    (folder / "model.safetensors.index.json").write_text(__import__("json").dumps(index))
    result = runner.invoke(app, ["spectrum", str(folder)])
    assert result.exit_code == 2
    line = one_error_line(result)  # one line, and no escape byte at all
    assert "\\x1b]0;PWNED\\x07\\x1b(0\\nmodel-1" in line, line


def test_a_reader_that_goes_away_is_141_silently_never_1(tmp_path):
    """`check ... | true`: the reader is gone before the first line (rich would exit 1, which
    reads as "a rule failed")."""
    (tmp_path / "policy.toml").write_text("forbid-nonfinite = true\n")
    script = f"{sys.executable} -m lowrank_audit check {FT} --policy {tmp_path / 'policy.toml'} | true"
    done = subprocess.run(["bash", "-c", f"{script}; exit ${{PIPESTATUS[0]}}"], capture_output=True, text=True)
    assert done.returncode == 141 and done.stderr == "", (done.returncode, done.stderr)


@pytest.mark.parametrize(("value", "on"), [("1", True), ("yes", True), ("0", False), ("false", False), ("", False)])
def test_debug_from_the_environment(monkeypatch, tmp_path, value, on):
    monkeypatch.setenv("LOWRANK_AUDIT_DEBUG", value)
    result = runner.invoke(app, ["spectrum", str(tmp_path / "absent.safetensors")])
    assert result.exit_code == 2 and ("Traceback" in result.stderr) == on
