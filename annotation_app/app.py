"""cfkd annotation app: experts label each counterfactual as true class evidence or a spurious shortcut.

Started by ``cfkd annotate``, which passes the run directory (CFKD_RUN_DIR) and the optional token (CFKD_TOKEN).
"""

import os
from pathlib import Path

import streamlit as st

from annotation_app import services, views
from pipeline.store import FeedbackStore, consensus_of

run_dir = Path(os.environ.get("CFKD_RUN_DIR", "runs/default")).resolve()
st.set_page_config(page_title=f"cfkd review · {run_dir.name}", layout="wide")
token = os.environ.get("CFKD_TOKEN", "")
if token and not views.token_gate(token):
    st.stop()

# 1. who is labelling (kept in the URL, so a reload or a bookmark resumes as the same annotator)
with st.sidebar:
    st.title("cfkd annotate")
    annotator = st.text_input(
        "Your name", value=st.query_params.get("annotator", ""), key="annotator"
    ).strip()
    if annotator:
        st.query_params["annotator"] = annotator
    found = services.rounds(run_dir)
    if not found:
        st.error(f"No counterfactuals in {run_dir}: run `cfkd run` (explain stage) first.")
        st.stop()
    round_number = st.selectbox("Round", sorted(found), index=len(found) - 1, key="round")
    view = st.radio("View", ["Label", "Clusters", "Agreement"], key="view")
    order = st.radio(
        "Order",
        ["clusters first", "manifest"],
        key="order",
        help="clusters first: one representative per group of similar changes, then the most uncertain groups",
    )
if not annotator:
    st.info("Enter your name in the sidebar to start labelling.")
    st.stop()


# 2. the round's counterfactuals (cached until the manifest changes) and this annotator's labels
@st.cache_resource(show_spinner=False, max_entries=8)  # shared, not copied: the manifest is read-only
def load_round(run_dir: Path, number: int, stamp: float) -> services.Round:
    return services.load_round(run_dir, number)


try:
    manifest_file = found[round_number] / "manifest.csv"
    rnd = load_round(run_dir, round_number, manifest_file.stat().st_mtime if manifest_file.exists() else 0.0)
except services.AppError as exc:
    st.error(str(exc))
    st.stop()
if rnd.refused or rnd.missing:
    st.warning(
        f"{rnd.refused} counterfactual(s) refused (paths outside the run directory), "
        f"{rnd.missing} with missing images: not shown."
    )
store = FeedbackStore(run_dir / "feedback.sqlite")


@st.cache_resource(show_spinner="Grouping similar changes...", max_entries=8)
def change_clusters(run_dir: Path, number: int, stamp: float, _round: services.Round):
    return services.change_clusters(_round.manifest)  # the cache key: the run, the round, the manifest's time


stamp = manifest_file.stat().st_mtime if manifest_file.exists() else 0.0
groups = change_clusters(run_dir, round_number, stamp, rnd)
if view == "Clusters":
    views.cluster_view(rnd, groups, store, annotator)
    st.stop()
if view == "Agreement":
    views.agreement_view(store, round_number)
    st.stop()

# 3. filters in the sidebar; the progress and the card in a fragment, so a label reruns only the card
with st.sidebar:
    unlabelled = st.checkbox("Unlabelled only", key="unlabelled")
    pairs = sorted(set(rnd.manifest["source_class"] + " -> " + rnd.manifest["target_class"]))
    pair = st.selectbox("Class pair", ["all", *pairs], key="pair")
    attempts = ["all", *sorted(rnd.manifest["attempt"].unique())]
    attempt = st.selectbox("Attempt", attempts, key="attempt_filter")
    disagreement = st.checkbox("Annotators disagree", key="disagreement")


needed = services.min_labels(run_dir)


@st.fragment
def labelling() -> None:
    labels = services.current_labels(
        store, round_number, st.session_state.setdefault(f"read-{round_number}", {})
    )
    mine = labels[labels["annotator"] == annotator].set_index("cf_id")["label"]
    pair_filter, attempt_filter = None if pair == "all" else pair, None if attempt == "all" else int(attempt)
    ids = services.queue(
        rnd.manifest, labels, annotator, unlabelled, pair_filter, attempt_filter, disagreement
    )
    if order == "clusters first":  # the cards seen so far keep their places, so Back retraces them
        kept, seen = set(ids), st.session_state.setdefault(f"seen-{round_number}", [])
        fresh, were_seen = services.review_order(rnd.manifest, groups, labels, annotator), set(seen)
        ids = [i for i in [*seen, *(i for i in fresh if i not in were_seen)] if i in kept]
    views.round_header(services.header(rnd, labels, consensus_of(labels), annotator, needed), needed)
    done = int(services.among(rnd.manifest["id"], mine.index).sum())
    st.progress(done / len(rnd.manifest), text=f"{annotator}: {done} of {len(rnd.manifest)} labelled")
    counts = services.round_counts(rnd, labels)
    if not ids:
        st.caption(" · ".join(f"{name}: {n}" for name, n in counts.items()))
        st.success("Nothing left to label with these filters.")
        return
    current = st.session_state.get("current")
    if st.session_state.get("ordered_by") != order:  # a new order starts at its own first open card
        st.session_state["ordered_by"], current = order, None
    if current not in ids:  # first visit or filters changed: resume at the first card not yet labelled
        current = next((cf for cf in ids if cf not in mine.index), ids[0])
    st.session_state["current"] = current
    seen = st.session_state.setdefault(f"seen-{round_number}", [])
    if current not in seen:
        seen.append(current)
    last = f" · last: {st.session_state['last']}" if st.session_state.get("last") else ""
    where = f"card {ids.index(current) + 1} / {len(ids)}"
    st.caption(" · ".join([where, *(f"{name}: {n}" for name, n in counts.items())]) + last)
    row = rnd.manifest.loc[rnd.manifest["id"] == current].iloc[0]
    views.card(row, store, annotator, round_number, ids, mine.get(current), groups)


labelling()
