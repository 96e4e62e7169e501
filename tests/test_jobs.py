"""fastssl.jobs: fingerprints, resume refusal, output lock, atomic writes, checkpoints, JSONL, safetensors."""
import contextlib
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from fastssl import jobs
from fastssl.atomic import atomic_writer
from fastssl.errors import DataError, OutputLocked, ResumeMismatch
from fastssl.train.checkpoint import atomic_torch_save, truncate_metrics


def _write(path, data: bytes):
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


def _flip(path, offset):
    with open(path, "rb+") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --------------------------------------------------------------------------- fingerprints

def test_sampled_fingerprint_sees_first_last_and_size_but_full_sees_every_byte(tmp_path):
    rng = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (40 * jobs.BLOCK_SIZE + 123,), generator=rng, dtype=torch.uint8).numpy().tobytes()
    path = _write(tmp_path / "big.bin", data)
    base = jobs.fingerprint_files([path])[path]
    assert base["hashed"] == "sampled" and base["size"] == len(data)
    for offset in (0, len(data) - 1):               # first and last blocks are always sampled
        _flip(path, offset)
        assert jobs.fingerprint_files([path])[path]["sha256"] != base["sha256"]
        _flip(path, offset)
    middle = 3 * jobs.BLOCK_SIZE + 7                # block 3 of 41 is not among the 8 sampled
    assert 3 not in [o // jobs.BLOCK_SIZE for o in jobs._sampled_offsets(len(data))]
    full_before = jobs.fingerprint_files([path], full=True)[path]["sha256"]
    _flip(path, middle)
    assert jobs.fingerprint_files([path])[path]["sha256"] == base["sha256"]
    assert jobs.fingerprint_files([path], full=True)[path]["sha256"] != full_before


def test_small_file_is_hashed_whole(tmp_path):
    path = _write(tmp_path / "small.bin", bytes(range(256)) * 100)
    before = jobs.fingerprint_files([path])[path]
    assert before["hashed"] == "full"
    _flip(path, 12_345)
    assert jobs.fingerprint_files([path])[path]["sha256"] != before["sha256"]


def test_fingerprint_of_missing_or_directory_input_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        jobs.fingerprint_files([tmp_path / "nope"])
    with pytest.raises(IsADirectoryError, match="not a regular file"):
        jobs.fingerprint_files([tmp_path])


# --------------------------------------------------------------------------- resume identity

def _fp(tmp_path, **settings):
    data = _write(tmp_path / "input.npy", b"x" * 1000) if not (tmp_path / "input.npy").exists() else str(tmp_path / "input.npy")
    base = {"lr": 0.001, "epochs": 10, "mode": "paired"}
    return jobs.JobFingerprint("pretrain", {**base, **settings}, jobs.fingerprint_files([data]))


def test_resume_same_fingerprint_and_new_on_empty_dir(tmp_path):
    out = tmp_path / "run"
    fp = _fp(tmp_path)
    assert jobs.check_resume(out, fp) == "new"
    jobs.write_fingerprint(out, fp)
    assert jobs.check_resume(out, _fp(tmp_path)) == "resume"
    with jobs.OutputLock(out):                       # the lock file alone is not a run
        pass
    os.remove(out / "job.json")
    assert jobs.check_resume(out, fp) == "new"


def test_resume_refuses_naming_each_difference(tmp_path):
    out = tmp_path / "run"
    jobs.write_fingerprint(out, _fp(tmp_path))
    _write(out / "checkpoint.pt", b"ck")
    with pytest.raises(ResumeMismatch) as err:
        jobs.check_resume(out, _fp(tmp_path, lr=0.002, epochs=None, seed=3))
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "lr: 0.001 -> 0.002" in msg and "epochs: 10 -> null" in msg and "seed: (unset) -> 3" in msg
    assert "mode" not in msg
    assert "--overwrite" in msg and "checkpoint.pt" in msg and "job.json" in msg and "another --out" in msg
    assert jobs.check_resume(out, _fp(tmp_path, lr=0.002), ignore=["lr"]) == "resume"


def test_resume_refuses_changed_input_and_other_job(tmp_path):
    out = tmp_path / "run"
    jobs.write_fingerprint(out, _fp(tmp_path))
    _write(tmp_path / "input.npy", b"x" * 999 + b"y")
    with pytest.raises(ResumeMismatch, match=r"input .*input.npy: content changed"):
        jobs.check_resume(out, _fp(tmp_path))
    _write(tmp_path / "input.npy", b"x" * 10)
    with pytest.raises(ResumeMismatch, match=r"size 1000 -> 10 bytes"):
        jobs.check_resume(out, _fp(tmp_path))
    other = jobs.JobFingerprint("curate", _fp(tmp_path).settings, _fp(tmp_path).inputs)
    with pytest.raises(ResumeMismatch, match="job: pretrain -> curate"):
        jobs.check_resume(out, other)


def test_touching_an_input_is_not_a_change(tmp_path):
    out = tmp_path / "run"
    jobs.write_fingerprint(out, _fp(tmp_path))
    os.utime(tmp_path / "input.npy", ns=(1, 1))
    assert jobs.check_resume(out, _fp(tmp_path)) == "resume"


def test_overwrite_returns_new_changes_nothing_then_clear_keeps_the_lock(tmp_path, caplog):
    out = tmp_path / "run"
    jobs.write_fingerprint(out, _fp(tmp_path))
    os.makedirs(out / "sub")
    with jobs.OutputLock(out):
        with caplog.at_level("WARNING", logger="fastssl.jobs"):
            assert jobs.check_resume(out, _fp(tmp_path, lr=1.0), overwrite=True) == "new"
        assert "removing" in caplog.text and "job.json" in caplog.text
        assert sorted(os.listdir(out)) == [".fastssl.lock", "job.json", "sub"]
        assert jobs.clear_outputs(out) == ["job.json", "sub"]
        assert os.listdir(out) == [".fastssl.lock"]


def test_foreign_or_unreadable_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    os.makedirs(out)
    _write(out / "notes.txt", b"mine")
    with pytest.raises(ResumeMismatch, match="has no job.json"):
        jobs.check_resume(out, _fp(tmp_path))
    _write(out / "job.json", b"{not json")
    with pytest.raises(ResumeMismatch, match="job.json is unreadable"):
        jobs.check_resume(out, _fp(tmp_path))


def test_dataset_record_keeps_the_datasets_own_file(tmp_path):
    """A DatasetRecord is the settings alone, in the record file the dataset names (indent=1,
    keys sorted): it resumes on equal settings, names a changed one, and an unreadable or
    non-object record is refused, as job.json is."""
    out = tmp_path / "data"
    record = jobs.DatasetRecord("phantom", {"seed": 1, "size": [2, 3]}, record="made_with.json")
    jobs.write_fingerprint(out, record)
    assert sorted(os.listdir(out)) == ["made_with.json"]
    assert (out / "made_with.json").read_text() == '{\n "seed": 1,\n "size": [\n  2,\n  3\n ]\n}\n'
    assert jobs.check_resume(out, jobs.DatasetRecord("phantom", {"size": [2, 3], "seed": 1}, record="made_with.json")) \
        == "resume"
    with pytest.raises(ResumeMismatch, match=r"phantom run with other settings or inputs: seed: 1 -> 2"):
        jobs.check_resume(out, jobs.DatasetRecord("phantom", {"seed": 2, "size": [2, 3]}, record="made_with.json"))
    _write(out / "made_with.json", b"[1, 2]")
    with pytest.raises(ResumeMismatch, match=r"made_with.json is unreadable \(expected a JSON object, got list\)"):
        jobs.check_resume(out, record)


# --------------------------------------------------------------------------- lock

def test_second_lock_fails_at_once_naming_the_holder(tmp_path):
    with jobs.OutputLock(tmp_path / "out"):
        with pytest.raises(OutputLocked, match=rf"pid {os.getpid()} on host "):
            with jobs.OutputLock(tmp_path / "out"):
                pass
    with jobs.OutputLock(tmp_path / "out"):           # released on exit
        pass


def test_lock_of_a_killed_process_is_released(tmp_path):
    code = ("import sys, time; from fastssl.jobs import OutputLock\n"
            "lock = OutputLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=f"pid {child.pid}"):
            jobs.OutputLock(tmp_path).__enter__()
    finally:
        child.kill()
        child.wait()
    with jobs.OutputLock(tmp_path):
        pass


# --------------------------------------------------------------------------- atomic writes, tmp cleanup

def test_atomic_write_keeps_old_content_when_the_write_fails(tmp_path):
    path = tmp_path / "a.json"
    jobs.atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}

    class Unserialisable:
        pass
    with pytest.raises(TypeError):
        with atomic_writer(path, "w") as h:
            h.write("partial")
            json.dump(Unserialisable(), h)
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert os.listdir(tmp_path) == ["a.json"]
    jobs.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_remove_stale_tmp_only_removes_files_of_dead_writers(tmp_path):
    dead = _dead_pid()
    names = [f".ckpt.pt.tmp{dead}", f"index.csv.tmp{dead}", f".tree.json.tmp-{dead}",   # dead writers
             f".x.tmp{os.getpid()}", "tmpdata.npy", "a.tmp"]                            # alive / not ours
    for name in names:
        _write(tmp_path / name, b"")
    assert sorted(jobs.remove_stale_tmp(tmp_path)) == sorted(names[:3])
    assert sorted(os.listdir(tmp_path)) == sorted(names[3:])


# --------------------------------------------------------------------------- checkpoints

def _state():
    return {"step": 7, "w": torch.randn(64, 33, generator=torch.Generator().manual_seed(1))}


def test_checkpoint_roundtrip_and_plain_torch_load_still_works(tmp_path):
    path = tmp_path / "checkpoint.pt"
    jobs.save_checkpoint(_state(), path)
    assert (tmp_path / "checkpoint.pt.sha256").read_text().split() == [jobs._sha256_file(str(path))]
    for loaded in (jobs.load_checkpoint(path), torch.load(path, weights_only=True)):
        assert loaded["step"] == 7 and torch.equal(loaded["w"], _state()["w"])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.pt.sha256"]


def test_damaged_checkpoint_is_named_with_advice(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(_state(), path)                 # the old name writes the sidecar too
    _flip(path, os.path.getsize(path) // 2)
    with pytest.raises(DataError, match=r"checkpoint.pt: damaged checkpoint \(sha256 .*--no-resume"):
        jobs.load_checkpoint(path)
    jobs.save_checkpoint(_state(), path)
    with open(path, "rb+") as handle:
        handle.truncate(os.path.getsize(path) - 100)
    with pytest.raises(DataError, match="damaged checkpoint"):
        jobs.load_checkpoint(path)
    os.remove(tmp_path / "checkpoint.pt.sha256")     # an older run: no sidecar, torch's error is wrapped
    with pytest.raises(DataError, match=r"damaged checkpoint \((RuntimeError|OSError).*--no-resume"):
        jobs.load_checkpoint(path)


def test_checkpoint_verifies_after_a_crash_between_sidecar_and_replace(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    jobs.save_checkpoint({"step": 1}, path)
    real_replace = os.replace

    def crash_on_checkpoint(src, dst):
        if os.fspath(dst) == str(path):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)
    monkeypatch.setattr(jobs.os, "replace", crash_on_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        jobs.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert jobs.load_checkpoint(path)["step"] == 1    # sidecar accepted old and new digests
    assert len((tmp_path / "checkpoint.pt.sha256").read_text().split()) == 2
    jobs.save_checkpoint({"step": 3}, path)
    assert len((tmp_path / "checkpoint.pt.sha256").read_text().split()) == 1
    assert jobs.load_checkpoint(path)["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.pt.sha256"]


# --------------------------------------------------------------------------- JSONL

def test_read_jsonl_skips_a_torn_last_line_and_rejects_damage_inside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, b'{"step": 1}\n{"step": 2}\n{"st')
    assert jobs.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    _write(path, b'{"step": 1}\n{"step": 2}')          # complete record without its newline: kept
    assert jobs.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    _write(path, b'{"step": 1}\n\x00\x00\n{"step": 3}\n')
    with pytest.raises(DataError, match="metrics.jsonl: line 2 is not JSON"):
        jobs.read_jsonl(path)
    assert jobs.read_jsonl(tmp_path / "missing.jsonl") == []


def test_truncate_jsonl_and_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, b"".join(b'{"step": %d}\n' % s for s in range(1, 6)) + b'{"step": 6, "lo')
    assert jobs.truncate_jsonl(path, lambda rec: rec["step"] != 2) == 4
    assert path.read_bytes() == b'{"step": 1}\n{"step": 3}\n{"step": 4}\n{"step": 5}\n'
    truncate_metrics(str(path), 3)
    assert jobs.read_jsonl(path) == [{"step": 1}, {"step": 3}]
    assert jobs.truncate_jsonl(tmp_path / "missing.jsonl", bool) == 0


# --------------------------------------------------------------------------- safetensors

def test_verify_safetensors(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "enc.safetensors")
    save_file({"a": torch.randn(5, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, path, metadata={"k": "v"})
    assert jobs.verify_safetensors(path)
    data = open(path, "rb").read()
    assert not jobs.verify_safetensors(_write(tmp_path / "cut.safetensors", data[:-1]))
    assert not jobs.verify_safetensors(_write(tmp_path / "hdr.safetensors", data[:8] + b"!" + data[9:]))
    assert not jobs.verify_safetensors(_write(tmp_path / "len.safetensors", b"\xff" * 8 + data[8:]))
    assert not jobs.verify_safetensors(_write(tmp_path / "tiny.safetensors", b"\x01"))
    assert not jobs.verify_safetensors(tmp_path / "missing.safetensors")
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header["a"]["shape"] = [5, 4]                     # claims more bytes than its offsets hold
    raw = json.dumps(header).encode()
    assert not jobs.verify_safetensors(_write(tmp_path / "shape.safetensors",
                                              len(raw).to_bytes(8, "little") + raw + data[8 + header_len:]))


# --------------------------------------------------------------------------- the job opener

def _locked_by_someone(out) -> bool:
    try:
        with jobs.OutputLock(out):
            return False
    except OutputLocked:
        return True


def test_open_job_new_resume_refuse_overwrite_restart(tmp_path):
    out, dead = tmp_path / "run", _dead_pid()
    calls = []
    with jobs.open_job(out, lambda: calls.append(1) or _fp(tmp_path)) as status:
        assert status == "new" and calls == [1] and _locked_by_someone(out)
        _write(out / "keep.bin", b"result")
        (out / "parts").mkdir()
    assert not _locked_by_someone(out)
    assert json.loads((out / "job.json").read_text()) == {
        "job": "pretrain", "settings": {"lr": 0.001, "epochs": 10, "mode": "paired"},
        "inputs": {str(tmp_path / "input.npy"): {"size": 1000, "mtime_ns": os.stat(tmp_path / "input.npy").st_mtime_ns,
                                                 "sha256": hashlib.sha256(b"x" * 1000).hexdigest(),
                                                 "hashed": "full"}}}
    stale = [out / f".a.npy.tmp{dead}", out / "parts" / f".p.csv.tmp{dead}"]  # a killed writer's
    for path in stale:
        _write(path, b"torn")
    with jobs.open_job(out, _fp(tmp_path), stale=("parts",)) as status:
        assert status == "resume" and not any(p.exists() for p in stale)
    with jobs.open_job(out, _fp(tmp_path)) as status:
        assert status == "resume" and (out / "keep.bin").read_bytes() == b"result"
    with pytest.raises(ResumeMismatch, match=r"lr: 0.001 -> 0.002"):
        with jobs.open_job(out, _fp(tmp_path, lr=0.002)):
            pytest.fail("a different run must not start")
    assert (out / "keep.bin").exists() and not _locked_by_someone(out)
    with jobs.open_job(out, _fp(tmp_path), restart=True) as status:    # pretrain --no-resume
        assert status == "new" and not (out / "keep.bin").exists()
    _write(out / "keep.bin", b"result")
    with jobs.open_job(out, _fp(tmp_path, lr=0.002), overwrite=True) as status:
        assert status == "new" and sorted(os.listdir(out)) == [jobs.LOCK_NAME, "job.json"]
        assert json.loads((out / "job.json").read_text())["settings"]["lr"] == 0.002


def test_open_job_refuses_a_second_job_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    with jobs.OutputLock(out):
        with pytest.raises(OutputLocked, match="in use by another job"):
            with jobs.open_job(out, _fp(tmp_path)):
                pytest.fail("the second job must not run")
    assert os.listdir(out) == [jobs.LOCK_NAME]


def test_resume_mismatch_keeps_what_differs_apart_from_the_advice(tmp_path):
    """ResumeMismatch.problem is the refusal without "use --overwrite ..." (fastssl demo words
    its own advice from it); it survives pickling."""
    import pickle

    out = tmp_path / "run"
    jobs.write_fingerprint(out, _fp(tmp_path))
    _write(out / "keep.bin", b"result")
    with pytest.raises(ResumeMismatch) as refused:
        with jobs.open_job(out, _fp(tmp_path, lr=0.002)):
            pytest.fail("a different run must not start")
    problem = refused.value.problem
    assert problem.endswith("lr: 0.001 -> 0.002") and "--overwrite" not in problem
    assert str(refused.value).startswith(problem + "; use --overwrite")
    again = pickle.loads(pickle.dumps(refused.value))
    assert (str(again), again.problem) == (str(refused.value), problem)


def _fake_broadcast(monkeypatch, sent: list, received: list):
    """fastssl.distributed.broadcast as rank 0 sees it (records what it sends) or as another rank
    does (returns what rank 0 sent, in order)."""
    from fastssl import distributed

    def broadcast(x, src=0):
        if received:
            return received.pop(0)
        sent.append(x.copy())
        return x

    monkeypatch.setattr(distributed, "broadcast", broadcast)


@pytest.mark.parametrize("refuse", [False, True])
def test_open_job_other_ranks_follow_rank0_verdict(tmp_path, monkeypatch, refuse):
    out = tmp_path / "run"
    jobs.write_fingerprint(out, _fp(tmp_path))
    sent: list = []
    _fake_broadcast(monkeypatch, sent, [])
    now = _fp(tmp_path, lr=0.002 if refuse else 0.001)
    with pytest.raises(ResumeMismatch) if refuse else contextlib.nullcontext():
        with jobs.open_job(out, now, rank=0, world=2) as status:
            assert status == "resume"
    told = bytes(sent[1]).decode()
    assert int(sent[0][0]) == len(sent[1])
    assert told.startswith("refused: ResumeMismatch: ") if refuse else told == "resume"
    fresh = tmp_path / "rank1"                               # rank 1 takes no lock and writes nothing
    _fake_broadcast(monkeypatch, [], list(sent))
    with pytest.raises(ValueError, match=r"rank 0 refused this run \(ResumeMismatch: .*lr: 0.001 -> 0.002") \
            if refuse else contextlib.nullcontext():
        with jobs.open_job(fresh, lambda: pytest.fail("only rank 0 fingerprints"), rank=1, world=2) as status:
            assert status == "resume"
    assert not fresh.exists()


def test_only_jobs_py_opens_output_dirs():
    """Every command that writes an output dir opens it through jobs.open_job: no other module
    takes the lock, checks a resume, clears outputs or writes job.json itself."""
    import ast
    import pathlib

    import fastssl

    root = pathlib.Path(fastssl.__file__).parent
    private = {"OutputLock", "check_resume", "clear_outputs", "write_fingerprint", "LOCK_NAME", "FINGERPRINT_NAME"}
    users, openers = {}, set()
    for path in sorted(root.rglob("*.py")):
        if path.name == "jobs.py" and path.parent == root:
            continue
        names = {node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else
                 alias.name for node in ast.walk(ast.parse(path.read_text())) for alias in
                 (node.names if isinstance(node, ast.ImportFrom) else [None])
                 if isinstance(node, (ast.Attribute, ast.Name)) or alias is not None}
        rel = str(path.relative_to(root))
        if names & private:
            users[rel] = sorted(names & private)
        if "open_job" in names:
            openers.add(rel)
    assert users == {}
    assert openers == {"data/phantom.py", "data/cache.py", "train/pretrain.py", "eval/probe.py", "eval/finetune.py",
                       "curation/tile.py", "curation/embed.py", "train/curate.py", "models/export.py",
                       "curation/tiles.py", "demo.py"}


def _open_as_rank(rank, world, init_file, out, lr, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fp = jobs.JobFingerprint("pretrain", {"lr": lr})
        with jobs.open_job(out, fp, rank=rank, world=world) as status:
            verdict = status
    except ValueError as exc:
        verdict = f"{type(exc).__name__}: {exc}"
    finally:
        dist.destroy_process_group()
    with open(os.path.join(results, f"rank{rank}"), "w", encoding="utf-8") as handle:
        handle.write(verdict)


@pytest.mark.slow
def test_open_job_two_gloo_ranks_share_the_refusal(tmp_path):
    """Real collectives: rank 1 learns rank 0's refusal (its text) and neither hangs."""
    import torch.multiprocessing as mp

    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    jobs.write_fingerprint(out, jobs.JobFingerprint("pretrain", {"lr": 0.001}))
    mp.spawn(_open_as_rank, args=(2, str(tmp_path / "rdzv"), str(out), 0.002, str(results)), nprocs=2, join=True)
    rank0, rank1 = ((results / f"rank{r}").read_text() for r in (0, 1))
    assert rank0.startswith("ResumeMismatch: ") and "lr: 0.001 -> 0.002" in rank0
    assert rank1 == f"ValueError: {out}: rank 0 refused this run ({rank0})"
