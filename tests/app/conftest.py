"""Fixtures shared by the AppTest page tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    """A cache folder holding a tiny store, SAE and dashboard build (one per test module), built on one thread."""
    from tests.app.test_features_page import build_feature_fixture

    cache = tmp_path_factory.mktemp("cache")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    build_feature_fixture(cache)
    torch.set_num_threads(before)
    return cache


@pytest.fixture
def downloads(monkeypatch):
    """Run a deferred ``st.download_button(data=callable)`` of an AppTest the way a click does."""
    import streamlit.testing.v1.app_test as app_test
    from streamlit.runtime.media_file_manager import MediaFileManager

    managers = []

    class Recording(MediaFileManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            managers.append(self)

    monkeypatch.setattr(app_test, "MediaFileManager", Recording)

    def fetch(at, label: str) -> bytes:
        button = next(b for b in at.get("download_button") if b.proto.label == label)
        assert button.proto.deferred_file_id  # made on click, not on every rerun
        url = managers[-1].execute_deferred(button.proto.deferred_file_id)
        return managers[-1]._storage.get_file(url.rsplit("/", 1)[-1]).content

    return fetch
