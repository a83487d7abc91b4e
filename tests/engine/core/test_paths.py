"""Data roots, safe file access and the serving policy: every bad path gives one sentence, quickly."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from engine import serving
from engine.core import paths
from engine.core.errors import UserError
from engine.core.paths import PathNotAllowed
from engine.serving import NotAllowed, ServingPolicy

QUICK = 5.0  # seconds any refusal may take


def within(seconds: float, fn, *args, **kwargs):
    """Run ``fn`` in a daemon thread; fail when it has not finished in ``seconds``; re-raise what it raised."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed back to the test
            box["error"] = exc

    start = time.perf_counter()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} did not finish within {seconds} s"
    box["seconds"] = time.perf_counter() - start
    if "error" in box:
        raise box["error"]
    return box["value"]


def one_sentence(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text.endswith(".") and len(text) < 400, text
    return text


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    for name in ("LATENT_EXPLORER_DATA", "LATENT_EXPLORER_DEMO", "LATENT_EXPLORER_TOKEN", "LATENT_EXPLORER_MODELS",
                 "LATENT_EXPLORER_MAX_JOBS", "LATENT_EXPLORER_MAX_UPLOAD_BYTES", "LATENT_EXPLORER_MODEL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """tmp/data is the only data root; tmp/outside holds a secret."""
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("secret")
    monkeypatch.setenv("LATENT_EXPLORER_DATA", str(data))
    return data


# --- roots ---------------------------------------------------------------------------------
def test_default_roots_are_the_cache_and_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    from engine.core.models import cache_root

    assert paths.data_roots() == [cache_root().resolve(), (paths.REPO_ROOT / "data").resolve()]
    assert paths.default_cache_root() == cache_root()


def test_roots_from_env_are_a_pathsep_list(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("LATENT_EXPLORER_DATA", f"{a}{os.pathsep}{b}{os.pathsep}{a}{os.pathsep}")
    assert paths.data_roots() == [a.resolve(), b.resolve()]
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LATENT_EXPLORER_DATA", "~/a")
    assert paths.data_roots() == [a.resolve()]


def test_roots_are_enforced_in_the_ui_always_and_in_the_cli_only_with_the_env(monkeypatch, tmp_path):
    assert paths.roots_enforced(ui=True) and not paths.roots_enforced(ui=False)
    monkeypatch.setenv("LATENT_EXPLORER_DATA", "  ")
    assert not paths.roots_enforced(ui=False)
    monkeypatch.setenv("LATENT_EXPLORER_DATA", str(tmp_path))
    assert paths.roots_enforced(ui=False) and paths.roots_enforced(ui=True)


def test_resolve_under_roots(root, tmp_path):
    (root / "sub").mkdir()
    (root / "sub" / "a.txt").write_text("a")
    assert paths.resolve_under_roots(root / "sub" / "a.txt") == (root / "sub" / "a.txt").resolve()
    assert paths.resolve_under_roots(root) == root.resolve()
    assert paths.resolve_under_roots(f"{root}/sub/../sub/a.txt") == (root / "sub" / "a.txt").resolve()
    assert paths.resolve_under_roots(root / "not-yet-there") == root.resolve() / "not-yet-there"
    for bad in (f"{root}/../outside/secret.txt", str(tmp_path / "outside"), "/etc/passwd", "/dev/zero", "/",
                f"{root}2/x.txt"):
        with pytest.raises(PathNotAllowed, match="outside the allowed data folders") as info:
            within(QUICK, paths.resolve_under_roots, bad)
        one_sentence(info.value)
    (root / "escape").symlink_to(tmp_path / "outside")
    (root / "escape.txt").symlink_to(tmp_path / "outside" / "secret.txt")
    for bad in (root / "escape" / "secret.txt", root / "escape.txt"):
        with pytest.raises(PathNotAllowed, match="outside the allowed data folders"):
            paths.resolve_under_roots(bad)
    (root / "inside.txt").symlink_to(root / "sub" / "a.txt")
    assert paths.resolve_under_roots(root / "inside.txt") == (root / "sub" / "a.txt").resolve()
    assert paths.resolve_under_roots(tmp_path / "outside", roots=[tmp_path]) == (tmp_path / "outside").resolve()
    with pytest.raises(PathNotAllowed, match="No corpus path"):
        paths.resolve_under_roots("  ")
    with pytest.raises(PathNotAllowed, match="cannot be resolved"):
        paths.resolve_under_roots(f"{root}/a\x00b")


def test_system_folders_and_pseudo_files_are_refused_without_roots():
    for bad, expected in (("/", "system folder"), ("/etc", "system folder"), ("/etc/", "system folder"),
                          ("/dev/zero", "pseudo-file system"), ("/proc/self/status", "pseudo-file system"),
                          ("/sys/kernel", "pseudo-file system"), ("/dev/stdin", "pseudo-file system")):
        with pytest.raises(PathNotAllowed, match=expected) as info:
            within(QUICK, paths.resolve_path, bad)
        one_sentence(info.value)
    assert paths.safe_path("/etc/hostname", enforce_roots=False) == Path("/etc/hostname").resolve()


# --- regular files -------------------------------------------------------------------------
def test_only_regular_files_within_the_size_limit(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(PathNotAllowed, match="is a named pipe, not a regular file") as info:
        within(QUICK, paths.check_regular_file, fifo)
    one_sentence(info.value)
    with pytest.raises(PathNotAllowed, match="is a named pipe"):
        within(QUICK, paths.read_text_limited, fifo)
    with pytest.raises(PathNotAllowed, match="is a named pipe"):
        within(QUICK, paths.open_regular, fifo)  # non-blocking open + fstat, even without the stat first
    with pytest.raises(PathNotAllowed, match="character device"):
        within(QUICK, paths.read_bytes_limited, "/dev/zero")
    with pytest.raises(PathNotAllowed, match="a folder"):
        paths.check_regular_file(tmp_path)
    with pytest.raises(PathNotAllowed, match="does not exist"):
        paths.check_regular_file(tmp_path / "missing.txt")
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(PathNotAllowed, match="a socket"):
            paths.check_regular_file(sock_path)

    huge = tmp_path / "huge.txt"
    with huge.open("wb") as handle:  # sparse: takes no disk space, never read
        handle.truncate(paths.MAX_FILE_BYTES + 1)
    with pytest.raises(PathNotAllowed, match="is 67,108,865 bytes, over the limit of 67,108,864 bytes per file"):
        within(QUICK, paths.read_bytes_limited, huge)
    with huge.open("wb") as handle:
        handle.truncate(paths.MAX_FILE_BYTES * 3)
    with pytest.raises(PathNotAllowed, match="is 192.0 MiB, over the limit of 64.0 MiB per file") as info:
        within(QUICK, paths.read_bytes_limited, huge)
    one_sentence(info.value)

    small = tmp_path / "small.txt"
    small.write_text("héllo wörld", encoding="utf-8")
    assert paths.check_regular_file(small) == len("héllo wörld".encode())
    assert paths.read_text_limited(small) == "héllo wörld"
    with pytest.raises(PathNotAllowed, match="over the limit of 5 bytes"):
        paths.read_bytes_limited(small, 5)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(PathNotAllowed, match="not utf-8 text"):
        paths.read_text_limited(latin)


def test_a_file_that_grows_after_the_stat_is_cut_at_the_cap(tmp_path, monkeypatch):
    grown = tmp_path / "grown.txt"
    grown.write_bytes(b"x" * 100)
    monkeypatch.setattr(paths, "check_regular_file", lambda *args, **kwargs: 1)  # the stat saw 1 byte
    with pytest.raises(PathNotAllowed, match="grew past the limit of 10 bytes"):
        paths.read_bytes_limited(grown, 10)


# --- bounded walk --------------------------------------------------------------------------
def test_walk_keeps_regular_files_and_notes_what_it_skipped(tmp_path):
    top = tmp_path / "corpus"
    (top / "sub").mkdir(parents=True)
    (top / "b.txt").write_text("b")
    (top / "a.txt").write_text("a")
    (top / "sub" / "c.txt").write_text("c")
    (top / "other.bin").write_bytes(b"\x00")
    os.mkfifo(top / "pipe.txt")
    (tmp_path / "secret.txt").write_text("secret")
    (top / "escape.txt").symlink_to(tmp_path / "secret.txt")
    (top / "inside.txt").symlink_to(top / "sub" / "c.txt")
    (top / "loop").symlink_to(top)
    (top / "broken.txt").symlink_to(top / "nowhere")
    with (top / "big.txt").open("wb") as handle:
        handle.truncate(1000)
    files, notes = within(QUICK, paths.walk_files, top, suffixes=(".txt",), max_file_bytes=100)
    assert [f.relative_to(top.resolve()).as_posix() for f in files] == ["a.txt", "b.txt", "inside.txt", "sub/c.txt"]
    joined = " | ".join(notes)
    for expected in ("pipe.txt (a named pipe)", "escape.txt (symbolic link to outside the folder)",
                     "loop (symbolic link to a folder, not followed)", "broken.txt (broken symbolic link)",
                     "big.txt (1,000 bytes, over the limit of 100 bytes per file)"):
        assert expected in joined
    assert "other.bin" not in joined
    summary = paths.describe_skipped(notes, limit=2)
    assert summary.endswith(f"and {len(notes) - 2} more")


def test_walk_stops_at_its_limits(tmp_path):
    for i in range(12):
        (tmp_path / f"{i:02d}.txt").write_text("x" * 10)
    files, notes = paths.walk_files(tmp_path, max_files=5)
    assert len(files) == 5 and notes == ["stopped at the limit of 5 files"]
    files, notes = paths.walk_files(tmp_path, max_total_bytes=35)
    assert len(files) == 3 and "limit of 35 bytes per corpus" in notes[0]
    files, notes = paths.walk_files(tmp_path, max_entries=4)
    assert len(files) == 0 and notes == ["stopped after looking at 4 folder entries"]
    files, _ = paths.walk_files(tmp_path, suffixes=())
    assert len(files) == 12


def test_walking_the_whole_file_system_is_bounded():
    files, notes = within(QUICK, paths.walk_files, "/", max_entries=2000)
    assert notes and len(files) <= 2000


# --- serving policy ------------------------------------------------------------------------
def test_policy_from_env(monkeypatch):
    plain = ServingPolicy.from_env()
    assert not plain.demo and not plain.token_required and plain.allow_remote_code and plain.allow_hub_downloads
    assert plain.max_jobs_per_session == 0 and plain.max_upload_bytes == serving.DEFAULT_MAX_UPLOAD_BYTES
    env = {"LATENT_EXPLORER_DEMO": "1", "LATENT_EXPLORER_TOKEN": "s3cret", "LATENT_EXPLORER_MODELS": " a , tiny:* ,",
           "LATENT_EXPLORER_MAX_UPLOAD_BYTES": "1_000"}
    demo = ServingPolicy.from_env(env)
    assert demo.demo and demo.token_required and not demo.allow_remote_code and not demo.allow_hub_downloads
    assert demo.models == ("a", "tiny:*") and demo.max_upload_bytes == 1000 and demo.max_jobs_per_session == 1
    assert "s3cret" not in repr(demo) and "s3cret" not in str(demo)
    monkeypatch.setenv("LATENT_EXPLORER_DEMO", "true")
    assert serving.current_policy().demo


def test_token_is_compared_in_constant_time(monkeypatch):
    assert ServingPolicy().check_token(None) and ServingPolicy().check_token("anything")
    policy = ServingPolicy(token="s3cret")
    calls = []
    real = serving.hmac.compare_digest
    monkeypatch.setattr(serving.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert policy.check_token("s3cret")
    assert not policy.check_token("s3cre") and not policy.check_token("") and not policy.check_token(None)
    assert not policy.check_token("s3cret ") and len(calls) == 5
    assert policy.check_token("s3cret") is True


def test_demo_allows_embedded_and_refuses_hub_and_remote_code(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(serving, "_hub_cached", lambda repo: False)
    demo = ServingPolicy(demo=True)
    demo.check_model("gemma-3-270m")
    demo.check_model("smollm2-135m")
    with pytest.raises(NotAllowed, match="does not load 'Qwen/Qwen2.5-0.5B'; choose one of: gemma-3-270m") as info:
        demo.check_model("Qwen/Qwen2.5-0.5B")
    one_sentence(info.value)
    with pytest.raises(NotAllowed, match="Trust remote code"):
        demo.check_model("gemma-3-270m", trust_remote_code=True)
    with pytest.raises(NotAllowed, match="does not load"):
        within(QUICK, demo.check_model, "/dev/zero.gguf")
    with pytest.raises(NotAllowed, match="does not load"):
        demo.check_model("tiny:llama")
    with pytest.raises(UserError, match="No model"):
        demo.check_model(" ")

    listed = ServingPolicy(demo=True, models=("Qwen/Qwen2.5-0.5B", "tiny:*"))
    with pytest.raises(NotAllowed, match="does not download from the Hugging Face hub"):
        listed.check_model("Qwen/Qwen2.5-0.5B")
    monkeypatch.setattr(serving, "_hub_cached", lambda repo: True)
    listed.check_model("Qwen/Qwen2.5-0.5B")  # on the list and already downloaded
    listed.check_model("tiny:llama")
    with pytest.raises(NotAllowed, match="choose one of: Qwen/Qwen2.5-0.5B, tiny:"):
        listed.check_model("gemma-3-270m")

    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")  # the server's own default is allowed
    ServingPolicy(demo=True).check_model("tiny:llama")


def test_demo_allows_models_already_converted_in_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(cache))
    done, half = cache / "models" / "gguf-0123456789abcdef", cache / "models" / "half"
    for folder in (done, half):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (done / "model.safetensors").write_bytes(b"")
    (done / "latent_explorer.json").write_text("{}")
    assert serving.cached_model_folders() == [done.resolve()]
    demo = ServingPolicy(demo=True)
    assert str(done.resolve()) in demo.allowed_models()
    demo.check_model(str(done))
    with pytest.raises(NotAllowed, match="does not load"):
        demo.check_model(str(half))


def test_model_paths_stay_under_the_roots_even_outside_demo(root, tmp_path):
    policy = ServingPolicy()
    policy.check_model("Qwen/Qwen2.5-0.5B")  # hub ids are fine outside demo mode (nothing is downloaded here)
    policy.check_model("gemma-3-270m", trust_remote_code=True)
    model = tmp_path / "outside" / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(PathNotAllowed, match="model .* is outside the allowed data folders"):
        policy.check_model(str(model))
    with pytest.raises(PathNotAllowed, match="outside the allowed data folders"):
        within(QUICK, policy.check_model, "/dev/zero.gguf")
    inside = root / "model"
    inside.mkdir()
    (inside / "config.json").write_text("{}")
    policy.check_model(str(inside))


def test_policy_paths_corpora_uploads_and_jobs(root, tmp_path):
    (root / "notes.txt").write_text("hello")
    for policy in (ServingPolicy(), ServingPolicy(demo=True)):
        assert policy.check_path(root / "notes.txt") == (root / "notes.txt").resolve()
        with pytest.raises(PathNotAllowed, match="outside"):
            policy.check_path(tmp_path / "outside" / "secret.txt")
        assert policy.check_corpus("builtin") == "builtin"
        assert policy.check_corpus(str(root / "notes.txt")) == str((root / "notes.txt").resolve())
        with pytest.raises(PathNotAllowed, match="corpus '/etc' is outside"):
            within(QUICK, policy.check_corpus, "/etc")
    assert ServingPolicy().check_corpus("hf:roneneldan/TinyStories") == "hf:roneneldan/TinyStories"
    with pytest.raises(NotAllowed, match="does not download Hugging Face datasets"):
        ServingPolicy(demo=True).check_corpus("hf:roneneldan/TinyStories")
    policy = ServingPolicy(max_upload_bytes=1000, max_jobs_per_session=1)
    policy.check_upload(1000)
    with pytest.raises(NotAllowed, match="over this server's limit of 1,000 bytes"):
        policy.check_upload(1001)
    policy.check_jobs(0)
    with pytest.raises(NotAllowed, match="already runs 1 job"):
        policy.check_jobs(1)
    ServingPolicy().check_jobs(100)
