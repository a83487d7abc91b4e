"""AppTest: the serving policy in the UI (demo mode, access token, corpus paths, jobs per session).

Tiny random Llama only; nothing is downloaded, and no job runs a model (bad corpora are refused at submit).
"""
from __future__ import annotations

import os
import time

import pytest
from streamlit.testing.v1 import AppTest

APP = "../../app.py"
HUGE = "org/huge-model"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("LATENT_EXPLORER_MODEL", "tiny:llama")
    monkeypatch.setenv("LATENT_EXPLORER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LATENT_EXPLORER_JOB_THREADS", "1")
    for name in ("LATENT_EXPLORER_DEMO", "LATENT_EXPLORER_TOKEN", "LATENT_EXPLORER_MODELS", "LATENT_EXPLORER_DATA",
                 "LATENT_EXPLORER_MAX_JOBS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "cache").mkdir()
    yield
    from engine.jobs import wait_idle

    wait_idle(tmp_path / "cache" / "jobs", timeout=60)


@pytest.fixture
def loads(monkeypatch):
    """Every model load the app asks for; a hub download would fail the test."""
    import transformers

    import components.session as session
    import engine.core.models as models

    calls: list[str] = []
    real = models.load_model

    def recording(spec, *args, **kwargs):
        calls.append(spec)
        if not str(spec).startswith("tiny:"):
            raise AssertionError(f"the app tried to load {spec}")
        return real(spec, *args, **kwargs)

    def no_download(*args, **kwargs):
        raise AssertionError(f"from_pretrained was called with {args[:1]}")

    monkeypatch.setattr(models, "load_model", recording)
    monkeypatch.setattr(session, "load_model", recording)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_download)
    return calls


def _errors(at) -> list[str]:
    return [e.value for e in at.error]


def _one_sentence(text: str) -> bool:
    body = text.strip().rstrip(".")
    return "\n" not in body and ". " not in body.replace("e.g. ", "")


# --- demo mode: models ----------------------------------------------------------------------------
def test_demo_refuses_a_linked_model_before_loading_it(monkeypatch, loads):
    monkeypatch.setenv("LATENT_EXPLORER_DEMO", "1")
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["model"] = HUGE
    at.run()
    assert not at.exception, at.exception
    errors = _errors(at)
    assert len(errors) == 1 and HUGE in errors[0] and "does not load" in errors[0], errors
    assert _one_sentence(errors[0]), errors[0]
    assert "tiny:llama" in errors[0]  # names what may be chosen instead
    assert HUGE not in loads and not at.get("plotly_chart")
    # the app keeps working: choosing an allowed model renders the page
    at.selectbox(key="model_choice").set_value("tiny:llama").run()
    assert not at.exception and not at.error, _errors(at)
    assert at.get("plotly_chart") and HUGE not in loads


def test_demo_picker_lists_only_allowed_models_and_hides_remote_code(monkeypatch, loads):
    monkeypatch.setenv("LATENT_EXPLORER_DEMO", "1")
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["trust_remote_code"] = True  # even a stale state cannot switch it on
    at.run()
    assert not at.exception and not at.error, _errors(at)
    picker = at.selectbox(key="model_choice")
    assert [o.split(" — ")[0] for o in picker.options] == ["gemma-3-270m", "smollm2-135m", "tiny:llama"]
    assert not any(o.startswith("Other") for o in picker.options)
    assert not [c for c in at.checkbox if c.key == "trust_remote_code"]
    assert at.session_state["trust_remote_code"] is False
    assert any("demo mode" in m.value for m in at.sidebar.markdown)
    assert at.get("plotly_chart") and loads in ([], ["tiny:llama"])


def test_allow_list_with_a_pattern_checks_the_typed_model(monkeypatch, loads):
    monkeypatch.setenv("LATENT_EXPLORER_DEMO", "1")
    monkeypatch.setenv("LATENT_EXPLORER_MODELS", "tiny:*")
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["model"] = "tiny:gpt2"
    at.run()
    assert not at.exception and not at.error, _errors(at)
    assert at.session_state["model_other"] == "tiny:gpt2" and at.get("plotly_chart")
    at.text_input(key="model_other").set_value(HUGE).run()
    assert len(_errors(at)) == 1 and "does not load" in _errors(at)[0]
    assert HUGE not in loads


def test_outside_demo_mode_remote_code_box_is_shown_and_paths_stay_under_the_roots(loads):
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception
    assert [c for c in at.checkbox if c.key == "trust_remote_code"]
    assert not any("demo mode" in m.value for m in at.sidebar.markdown)
    at.session_state["model_other"] = "/etc"
    at.selectbox(key="model_choice").set_value("Other (Hugging Face id, folder or .gguf)…").run()
    assert not at.exception
    assert len(_errors(at)) == 1 and "outside the allowed data folders" in _errors(at)[0]
    assert "/etc" not in loads


# --- access token ------------------------------------------------------------------------------
def test_token_gate_blocks_every_page_until_the_token_is_given(monkeypatch, loads):
    monkeypatch.setenv("LATENT_EXPLORER_TOKEN", "s3cret-token")
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception
    assert at.text_input(key="access_token_input") is not None
    assert not at.get("plotly_chart") and not at.sidebar.markdown and not loads
    at.switch_page("pages/jobs.py")
    at.run()
    assert not at.exception and not any(t.value == "Jobs & data" for t in at.title)
    at.text_input(key="access_token_input").set_value("wrong").run()
    assert _errors(at) == ["That access token is not right."] and not loads
    at.text_input(key="access_token_input").set_value("s3cret-token").run()
    assert not at.exception and not at.error, _errors(at)
    assert any(t.value == "Jobs & data" for t in at.title)
    at.run()  # kept in the session: the next run needs no token
    assert any(t.value == "Jobs & data" for t in at.title)


def test_token_from_the_link_is_used_once_and_removed(monkeypatch, loads):
    monkeypatch.setenv("LATENT_EXPLORER_TOKEN", "s3cret-token")
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["token"] = "s3cret-token"
    at.run()
    assert not at.exception and not at.error, _errors(at)
    assert at.get("plotly_chart") and "token" not in at.query_params
    at.run()
    assert at.get("plotly_chart")


# --- corpora on the Jobs page ------------------------------------------------------------------------
def _jobs_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("pages/jobs.py")
    at.run()
    assert not at.exception, at.exception
    return at


def _bad_corpora(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (path typed, words the message must contain)."""
    data = tmp_path / "cache" / "corpora"
    data.mkdir(parents=True)
    fifo = data / "pipe.txt"
    os.mkfifo(fifo)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for visitors " * 20, encoding="utf-8")
    (data / "escape").symlink_to(outside)
    return {"dev-zero": ("/dev/zero", "outside the allowed data folders"),
            "root": ("/", "outside the allowed data folders"),
            "etc": ("/etc", "outside the allowed data folders"),
            "fifo": (str(fifo), "named pipe"),
            "symlink": (str(data / "escape" / "secret.txt"), "outside the allowed data folders")}


def test_bad_corpora_give_one_message_and_submit_nothing(tmp_path, loads):
    cases = _bad_corpora(tmp_path)
    at = _jobs_page()
    at.selectbox(key="capture_corpus_kind").set_value("path").run()
    assert "data/" in at.text_input(key="capture_corpus_path").placeholder
    timings = {}
    for name, (typed, words) in cases.items():
        at.text_input(key="capture_corpus_path").set_value(typed).run()
        started = time.monotonic()
        at.button(key="capture_start").click().run(timeout=30)
        timings[name] = time.monotonic() - started
        assert not at.exception, (name, at.exception)
        errors = _errors(at)
        assert len(errors) == 1 and words in errors[0], (name, errors)
        assert not [i.value for i in at.info if "Job `" in i.value], name
    print("\nmessage after Start (script run):", {k: f"{v:.2f} s" for k, v in timings.items()})
    assert max(timings.values()) < 10
    jobs_dir = tmp_path / "cache" / "jobs"
    assert not jobs_dir.exists() or not any(jobs_dir.rglob("*.json")), list(jobs_dir.rglob("*"))
    # the app keeps working: the next interaction renders the page without the error
    at.checkbox(key="capture_all_layers").set_value(False).run()
    assert not at.exception and not at.error, _errors(at)
    assert at.button(key="capture_start") is not None


def test_tuned_lens_corpus_is_checked_at_submit(tmp_path, loads):
    at = _jobs_page()
    at.text_input(key="tl_corpus").set_value("/etc").run()
    at.button(key="tl_start").click().run(timeout=30)
    assert not at.exception
    assert len(_errors(at)) == 1 and "outside the allowed data folders" in _errors(at)[0]
    assert not [i.value for i in at.info if "Job `" in i.value]


def test_folder_corpus_notes_what_it_skipped():
    """The check the forms run: a folder's skipped files come back as one sentence (no job needed)."""
    from engine.core.paths import default_cache_root
    from engine.data.corpora import check_corpus
    from engine.serving import ServingPolicy

    folder = default_cache_root() / "corpora" / "mixed"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("some text " * 30, encoding="utf-8")
    os.mkfifo(folder / "b.txt")
    found = check_corpus(ServingPolicy(demo=True).check_corpus(str(folder)), enforce_roots=True)
    assert found.kind == "folder" and len(found.files) == 1 and "Skipped" in found.note()


def test_demo_hides_hub_datasets_and_caps_jobs_per_session(monkeypatch, tmp_path, loads):
    monkeypatch.setenv("LATENT_EXPLORER_DEMO", "1")
    at = _jobs_page()
    assert "hf" not in at.selectbox(key="capture_corpus_kind").options
    from components.jobs_ui import get_runner

    runner = get_runner()  # the same st.cache_resource runner the app uses (one process)
    job = runner.submit({"kind": "selftest", "params": {"steps": 400, "seconds_per_step": 0.05}})
    at.session_state["session_job_ids"] = [job.id]
    try:
        at.button(key="capture_start").click().run(timeout=30)
        assert not at.exception
        errors = _errors(at)
        assert len(errors) == 1 and "already runs 1 job(s)" in errors[0], errors
        assert not [i.value for i in at.info if "Job `capture-" in i.value]
    finally:
        runner.cancel(job.id)
