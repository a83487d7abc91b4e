"""Latent Explorer: look inside language models. Entry point: navigation and the shared sidebar."""
from __future__ import annotations

from pathlib import Path

import streamlit as st
from streamlit import runtime


def serve(argv: list[str]) -> None:
    """`python app.py [streamlit options]`: serve this app with Streamlit's legacy `pages/` mode off.

    Streamlit sees the `pages/` folder next to this file and, until the first `st.navigation` call of
    the process, routes the first request through its old one-script-per-file mode; a deep link such as
    /concept-space then flashes a "Page not found" dialog (or runs the page without this entry file).
    Switching the mode off before the server starts removes that first-request glitch.
    """
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.web import cli

    PagesManager.uses_pages_directory = False
    cli.main.main(args=["run", str(Path(__file__).resolve()), *argv], prog_name="streamlit")


# (file, title, icon, url path). The url paths differ from the file names on purpose: started with
# `streamlit run app.py` instead of `python app.py`, Streamlit's legacy mode (see serve) would map
# /<file stem> to pages/<file stem>.py as a stand-alone script without this entry file's sidebar.
# The first page is the default one, served at /; its own path forwards there (see navigation_pages).
PAGES = [
    ("pages/lens.py", "Lens", ":material/stacked_line_chart:", "lens-view"),
    ("pages/concepts.py", "Concept space", ":material/scatter_plot:", "concept-space"),
    ("pages/features.py", "SAE features", ":material/extension:", "sae-features"),
    ("pages/interventions.py", "Interventions", ":material/tune:", "intervene"),
    ("pages/tours.py", "Tours", ":material/school:", "tours"),
    ("pages/jobs.py", "Jobs & data", ":material/settings:", "jobs-and-data"),
]
HERE = Path(__file__).resolve().parent


def _forward_to(page):
    """A page body that opens ``page`` instead, keeping the link's query parameters."""
    def forward() -> None:
        st.switch_page(page, query_params=st.query_params.to_dict())
    return forward


def navigation_pages() -> list:
    """The app's pages for ``st.navigation``, plus a hidden alias for the default page's own path.

    Streamlit serves the default page at / only, so /lens-view (the lens's path in PAGES) would show "Page not
    found"; the alias forwards it to /, with the link's query parameters."""
    pages, alias = [], []
    for i, (file, title, icon, path) in enumerate(PAGES):
        if not (HERE / file).exists():
            continue
        if i == 0:
            pages.append(st.Page(str(HERE / file), title=title, icon=icon, url_path="", default=True))
            alias.append(st.Page(_forward_to(pages[0]), title=title, icon=icon, url_path=path, visibility="hidden"))
        else:
            pages.append(st.Page(str(HERE / file), title=title, icon=icon, url_path=path))
    return pages + alias


def _take_typed_token() -> None:
    """The password box's callback (runs before the script, so a right token opens the page in the same run)."""
    st.session_state["access_token"] = st.session_state.get("access_token_input", "")


def token_gate(policy) -> bool:
    """True when this session may see the app: no token is configured, or it has been given.

    The token comes once from ``?token=`` (then removed from the address bar, so shared links do not carry
    it) or from a password box, and is kept in this session's state; it is checked again on every run.
    """
    if not policy.token_required:
        return True
    state = st.session_state
    if "token" in st.query_params:
        state["access_token"] = st.query_params.get("token", "")
        del st.query_params["token"]
    if policy.check_token(state.get("access_token")):
        return True
    st.title("Latent Explorer")
    st.text_input("Access token", type="password", key="access_token_input", on_change=_take_typed_token,
                  help="This server asks for a token; whoever shared the link can give it to you.")
    if state.get("access_token"):
        st.error("That access token is not right.")
    else:
        st.info("This server is private: enter the access token to continue.")
    return False


def main() -> None:
    """One script run: access check, navigation, the shared sidebar (model picker, job tray), then the page."""
    from components.first_run import ensure_demo
    from components.jobs_ui import job_tray
    from components.session import sidebar
    from engine.serving import current_policy

    st.set_page_config(page_title="Latent Explorer", page_icon=":material/visibility:", layout="wide")
    policy = current_policy()  # once per run: the environment decides (demo mode, token, allow-list)
    pages = navigation_pages()
    allowed = token_gate(policy)
    navigation = st.navigation(pages, position="sidebar" if allowed else "hidden")
    if not allowed:
        st.stop()  # no page, no sidebar, no job tray without the token
    if policy.demo:
        st.sidebar.badge("demo mode", icon=":material/shield:", color="orange",
                         help="This shared server loads only the listed models, downloads nothing, runs no code "
                              "that comes with a model and keeps paths under its data folders.")
    sidebar(policy)
    with st.sidebar:
        job_tray(next((page for page in pages if page.url_path == "jobs-and-data"), None))
    try:
        navigation.run()  # the page loads the model under its "Loading…" spinner
    finally:  # also after a page's st.stop(): first start on an embedded model without an SAE queues the demo
        ensure_demo()  # (LATENT_EXPLORER_NO_DEMO=1: off)


if __name__ == "__main__" and not runtime.exists():
    import sys

    serve(sys.argv[1:])
    raise SystemExit(0)
if __name__ == "__main__":  # a Streamlit script run; a job's worker process imports this file as __mp_main__
    main()
