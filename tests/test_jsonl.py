"""pipeline/jsonl.py: validation errors name file, line and field; atomic writes; torn-line recovery."""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from pipeline.errors import DiskFull, InputError, UserError
from pipeline.jsonl import (INSTRUCTION_FIELDS, MAX_RECORD_BYTES, AppendLog, atomic_write, check_output_path,
                            check_outputs_apart, claim_outputs, load_records, lock_path_for, locked_outputs, output_lock,
                            read_records, write_json_atomic, write_jsonl_atomic)

REPO = Path(__file__).resolve().parent.parent


def write_lines(path, lines, encoding="utf-8"):
    path.write_bytes("".join(line + "\n" for line in lines).encode(encoding))
    return path


def test_bad_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", ['{"instruction": "a"}', '{"instruction": "b"}', '{"instruction": oops'])
    with pytest.raises(InputError) as e:
        load_records(path, INSTRUCTION_FIELDS)
    assert f"{path}:3:" in str(e.value)
    assert "not valid JSON" in str(e.value)


@pytest.mark.parametrize("record, field, problem", [
    ({"input": "x"}, "instruction", "missing"),
    ({"instruction": "   "}, "instruction", "empty"),
    ({"instruction": 7}, "instruction", "expected a string"),
    ({"instruction": "ok", "input": ["a"]}, "input", "expected a string"),
    ({"instruction": "ok", "id": True}, "id", "expected a string or an integer"),
])
def test_field_errors_name_the_field(tmp_path, record, field, problem):
    path = write_lines(tmp_path / "x.jsonl", ['{"instruction": "fine"}', json.dumps(record)])
    with pytest.raises(InputError) as e:
        load_records(path, INSTRUCTION_FIELDS)
    assert str(e.value).startswith(f"{path}:2: {field}: {problem}")


def test_not_an_object(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", ['["a list"]'])
    with pytest.raises(InputError, match=r"x.jsonl:1: expected a JSON object"):
        load_records(path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"instruction": "ok"}\n{"instruction": "\xff\xfe"}\n')
    with pytest.raises(InputError, match=r"x.jsonl:2: invalid UTF-8"):
        load_records(path, INSTRUCTION_FIELDS)


def test_bom_and_blank_lines_are_tolerated(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes('\ufeff{"instruction": "要約して"}\n\n   \n{"instruction": "b"}\n'.encode("utf-8"))
    assert [(n, r["instruction"]) for n, r in read_records(path, INSTRUCTION_FIELDS)] == [(1, "要約して"), (4, "b")]


def test_oversized_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"instruction": "x" * (MAX_RECORD_BYTES + 10)}) + "\n")
    with pytest.raises(InputError, match=r"x.jsonl:1: line is .* bytes"):
        load_records(path, INSTRUCTION_FIELDS)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_records(tmp_path / "empty.jsonl")
    assert load_records(tmp_path / "empty.jsonl", allow_empty=True) == []
    with pytest.raises(UserError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")


def test_atomic_write_crash_keeps_previous_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])
    before = path.read_bytes()

    def records():
        yield {"a": 2}
        raise RuntimeError("crash in the middle of writing")

    with pytest.raises(RuntimeError, match="^crash in the middle of writing$"):
        write_jsonl_atomic(path, records())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_atomic_write_keeps_ordinary_permissions(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    path.chmod(0o640)
    write_jsonl_atomic(path, [{"a": 2}])
    assert path.stat().st_mode & 0o777 == 0o640


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"x": "日本語"})
    assert json.loads(path.read_text("utf-8")) == {"x": "日本語"}
    with atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new"


def test_append_log_recovers_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    with AppendLog(path) as log:
        log.write({"id": 1})
        log.write({"id": 2})
    with open(path, "ab") as f:
        f.write(b'{"id": 3, "instr')  # killed mid-write
    warnings = []
    with AppendLog(path, warn=warnings.append) as log:
        assert [r["id"] for r in log.records] == [1, 2]
        assert log.torn_bytes == len(b'{"id": 3, "instr')
        log.write({"id": 3})
    assert len(warnings) == 1 and "cut off" in warnings[0]
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_append_log_recovers_torn_line_with_newline(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": 1}\n{"id": 2, "x\n')
    with AppendLog(path, warn=lambda m: None) as log:
        assert [r["id"] for r in log.records] == [1]
    assert path.read_text() == '{"id": 1}\n'


def test_append_log_refuses_corruption_in_the_middle(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(InputError, match=r"log.jsonl:2"):
        AppendLog(path)
    assert path.read_text() == '{"id": 1}\nnot json\n{"id": 3}\n'  # nothing cut


def test_append_log_flushes_each_record(tmp_path):
    path = tmp_path / "log.jsonl"
    log = AppendLog(path)
    log.write({"id": "a"})
    # Another reader sees the record before close: a kill -9 now would keep it.
    assert json.loads(path.read_text()) == {"id": "a"}
    log.close()


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "ok.jsonl", "--out") == tmp_path / "ok.jsonl"
    with pytest.raises(UserError, match=r"--out .*does not exist"):
        check_output_path(tmp_path / "missing" / "x.jsonl", "--out")
    with pytest.raises(UserError, match=r"--out .*is a folder"):
        check_output_path(tmp_path, "--out")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="--out"):
        check_output_path(blocker / "x.jsonl", "--out")
    assert "permission denied" in check_as_unprivileged_user("x.jsonl")


# An unprivileged user to drop to when the tests run as root (root may write anywhere).
NOBODY = 65534


def check_as_unprivileged_user(name: str) -> str:
    """`check_output_path` on a file in a read-only folder, as a user who is not root: the error text.

    As root the permission branch would never run, so a forked child drops to `nobody` first;
    the folder sits in a world-readable temporary folder that `nobody` can reach.
    """
    top = tempfile.mkdtemp(prefix="jsonl-perm-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        locked = os.path.join(top, "locked")
        os.mkdir(locked, mode=0o555)
        os.chmod(locked, 0o555)  # mkdir's mode goes through the umask
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop privileges, check, report, exit without pytest's cleanup
            message = "no error"
            try:
                if os.geteuid() == 0:
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                check_output_path(os.path.join(locked, name), "--out")
            except UserError as e:
                message = str(e)
            finally:
                os.write(write_end, message.encode())
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as f:
            message = f.read()
        os.waitpid(pid, 0)
        return message
    finally:
        shutil.rmtree(top)


# ---------------------------------------------------------------- numbers and shapes JSON readers refuse


@pytest.mark.parametrize("line, field", [
    ('{"instruction": "x", "score": NaN}', "score"),
    ('{"instruction": "x", "score": -Infinity}', "score"),
    ('{"instruction": "日本語", "instances": [{"input": "", "output": Infinity}]}', "instances[0].output"),
])
def test_nan_and_infinity_are_refused_naming_the_field(tmp_path, line, field):
    path = write_lines(tmp_path / "x.jsonl", ['{"instruction": "ok"}', line])
    with pytest.raises(InputError, match=r"x\.jsonl:2: " + field.replace("[", r"\[").replace("]", r"\]") + ": .*not a number JSON allows"):
        load_records(path)


def test_a_5000_digit_number_and_deep_nesting_are_one_line_errors(tmp_path):
    path = write_lines(tmp_path / "big.jsonl", ['{"instruction": "ok"}', '{"instruction": "x", "n": ' + "7" * 5000 + "}"])
    with pytest.raises(InputError, match=r"big\.jsonl:2: a number too long"):
        load_records(path)
    deep = write_lines(tmp_path / "deep.jsonl", ['{"instruction": "ok"}', '{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}"])
    with pytest.raises(InputError, match=r"deep\.jsonl:2: nested too deeply"):
        load_records(deep)


# ---------------------------------------------------------------- append logs: endings, empty files, a full disk


def test_a_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes('{"id": 1}\n{"id": 2, "instruction": "日本語の指示"}'.encode())
    warnings = []
    with AppendLog(path, warn=warnings.append) as log:
        assert [r["id"] for r in log.records] == [1, 2]
        log.write({"id": 3})
    assert warnings == [] and log.torn_bytes == 0
    assert [json.loads(line)["id"] for line in path.read_text("utf-8").splitlines()] == [1, 2, 3]


def test_an_append_log_that_got_no_record_leaves_no_empty_file(tmp_path):
    path = tmp_path / "x.rejected.jsonl"
    with AppendLog(path):
        assert path.exists()  # created at once, so a kill -9 leaves a valid (empty) file
    assert not path.exists(), "datasets cannot load a 0-byte JSONL file"
    write_jsonl_atomic(path, [{"id": 1}])
    assert write_jsonl_atomic(path, [], keep_empty=False) == 0 and not path.exists()


def test_a_full_disk_cuts_back_to_whole_records_and_a_rerun_resumes(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    real_write = os.write
    room = [len(b'{"id": 1, "text": "\xe6\x97\xa5\xe6\x9c\xac"}\n') + 10]  # one record, then 10 bytes of the next

    def write_until_full(fd, data):  # the kernel's behaviour on a full disk: a short write, then ENOSPC
        if fd != log._fd:
            return real_write(fd, data)
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = real_write(fd, data[:room[0]])
        room[0] -= written
        return written

    log = AppendLog(path)
    monkeypatch.setattr(os, "write", write_until_full)
    log.write({"id": 1, "text": "日本"})
    with pytest.raises(DiskFull, match=r"log\.jsonl: cannot write: No space left on device; .*rerun"):
        log.write({"id": 2, "text": "日本"})
    log.close()
    monkeypatch.setattr(os, "write", real_write)
    assert path.read_bytes() == '{"id": 1, "text": "日本"}\n'.encode()
    with AppendLog(path) as again:
        assert [r["id"] for r in again.records] == [1]
        again.write({"id": 2, "text": "日本"})
    assert [json.loads(line)["id"] for line in path.read_text("utf-8").splitlines()] == [1, 2]


def test_dev_full_is_one_line_and_dev_null_stays_a_device(tmp_path):
    with pytest.raises(DiskFull, match="/dev/full: cannot write: No space left on device"):
        write_jsonl_atomic("/dev/full", [{"id": 1}])
    with pytest.raises(DiskFull, match="/dev/full"):
        with AppendLog("/dev/full") as log:
            log.write({"id": 1})
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    write_jsonl_atomic("/dev/null", [{"id": 1}])
    with AppendLog("/dev/null") as log:
        log.write({"id": 1})
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode), "/dev/null must never become a regular file"
    assert check_output_path("/dev/null", "--out") == Path("/dev/null")
    assert not Path("/dev/null.lock").exists() and not Path("/dev/null.config.json").exists()


# ---------------------------------------------------------------- atomic writes: links and special files


def test_atomic_write_writes_a_symlinks_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "real" / "data.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "data.jsonl"
    link.symlink_to(target)
    write_jsonl_atomic(link, [{"instruction": "日本語"}])
    assert link.is_symlink() and link.resolve() == target
    assert json.loads(target.read_text("utf-8")) == {"instruction": "日本語"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.jsonl"], "no temporary file left"


def test_atomic_write_to_a_fifo_writes_into_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    write_jsonl_atomic(fifo, [{"instruction": "日本語"}])
    reader.join(timeout=10)
    assert got == ['{"instruction": "日本語"}\n'.encode()]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was not replaced by a file"


def test_atomic_write_refuses_a_socket(tmp_path):
    import socket

    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(UserError, match="not a regular file, a character device or a FIFO"):
            write_json_atomic(path, {})
        assert stat.S_ISSOCK(os.stat(path).st_mode)


# ---------------------------------------------------------------- an output is never an input


def test_an_output_that_is_an_input_is_refused_by_identity(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "日本語"}\n')
    hard = tmp_path / "hard.jsonl"
    os.link(seeds, hard)
    link = tmp_path / "link.jsonl"
    link.symlink_to(seeds)
    for out in (seeds, hard, link, tmp_path / "sub" / ".." / "seeds.jsonl"):
        with pytest.raises(UserError, match=r"--out .*is the input --seeds .*seeds\.jsonl; it would be overwritten"):
            check_outputs_apart({"--seeds": str(seeds)}, {"--out": out})
    # A file written beside an output (config, lock) counts too, and an input that does not exist yet.
    with pytest.raises(UserError, match=r"--out .*out\.jsonl: writes .*out\.config\.json, which is the input --in"):
        check_outputs_apart({"--in": tmp_path / "out.config.json"}, {"--out": tmp_path / "out.jsonl"})
    with pytest.raises(UserError, match=r"out\.lock, which is the input"):
        check_outputs_apart({"--in": [tmp_path / "a.jsonl", tmp_path / "out.lock"]}, {"--out": tmp_path / "out.jsonl"})
    check_outputs_apart({"--in": [seeds, None]}, {"--out": tmp_path / "other.jsonl", "--report": None})
    check_outputs_apart({"--in": "/dev/null"}, {"--out": "/dev/null"})  # writing a device destroys nothing
    assert seeds.read_text() == '{"instruction": "日本語"}\n'


# ---------------------------------------------------------------- one writer per output


HOLD_LOCK = """
import sys, time
from pipeline.jsonl import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder_until_it_dies_even_by_kill_9(tmp_path):
    out = tmp_path / "machine.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=rf"--out .*machine\.jsonl: another run is writing it \(pid {holder.pid}: .*"
                                            r"machine\.lock\); wait for it to end"):
            with AppendLog(out):
                pass
        assert not out.exists(), "refused before anything was written"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path_for(out).exists(), "kill -9 left the lock file, but no lock: the kernel released it"
    with AppendLog(out) as log:  # no manual cleanup
        log.write({"id": "新しい"})
    assert not lock_path_for(out).exists(), "released and removed at the end"
    assert json.loads(out.read_text("utf-8")) == {"id": "新しい"}


def test_locks_are_reentrant_within_a_run_and_released_after_it(tmp_path):
    out = tmp_path / "x.jsonl"

    @locked_outputs
    def stage():
        claim_outputs({"--in": tmp_path / "in.jsonl"}, {"--out": out})
        assert lock_path_for(out).exists()
        with output_lock(out), AppendLog(out) as log:  # the same run may open it again
            log.write({"id": 1})
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stage()
    assert not lock_path_for(out).exists()
    with output_lock(out):  # and it is free for the next run
        pass
    with pytest.raises(RuntimeError, match="locked_outputs"):
        claim_outputs({}, {"--out": out})


def test_two_names_for_one_file_share_one_lock(tmp_path):
    target = tmp_path / "store" / "out.jsonl"
    target.parent.mkdir()
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    assert lock_path_for(link) == lock_path_for(target) == tmp_path / "store" / "out.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(target)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=rf"another run is writing it \(pid {holder.pid}:"):
            AppendLog(link)
    finally:
        holder.kill()
        holder.wait()


def test_a_run_folder_under_a_folder_not_yet_made_can_be_locked(tmp_path):
    # `finetune --output-dir runs/sft` on a fresh clone: the lock `runs/sft.lock` needs `runs/` first.
    run_dir = tmp_path / "runs" / "sft"
    with output_lock(run_dir, "--output-dir"):
        assert lock_path_for(run_dir).is_file() and lock_path_for(run_dir).parent == tmp_path / "runs"
    assert not lock_path_for(run_dir).exists(), "released and removed"
