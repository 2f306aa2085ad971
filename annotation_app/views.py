"""The app's views as functions of (state, store): the labelling card, the cluster view and the agreement view.
Every read and write goes through pipeline.store.FeedbackStore."""

from __future__ import annotations

import hmac
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from annotation_app import services  # noqa: E402
from pipeline.store import FeedbackStore  # noqa: E402

KEYS = {"true": "T", "spurious": "S", "unsure": "U"}
HELP = {
    "true": "the change is real class evidence",
    "spurious": "the model flipped for a shortcut",
    "unsure": "cannot tell / out of distribution",
}


def token_gate(expected: str) -> bool:
    """Without the right token (URL ?token=... or typed) the app shows nothing else."""
    given = st.query_params.get("token", "") or st.session_state.get("token", "")
    if given and hmac.compare_digest(str(given), expected):
        return True
    st.title("cfkd annotation")
    st.text_input("Access token", type="password", key="token")
    if st.session_state.get("token"):
        st.error("Wrong access token.")
    return False


@st.cache_data
def colour_bar() -> bytes:
    fig, ax = plt.subplots(figsize=(3, 0.35))
    fig.colorbar(
        plt.cm.ScalarMappable(norm=plt.Normalize(-1, 1), cmap="RdBu_r"), cax=ax, orientation="horizontal"
    )
    ax.set_xticks([-1, 0, 1], ["darker", "0", "brighter"], fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _label(store: FeedbackStore, ids: list[str], cf_id: str, annotator: str, label: str, round: int) -> None:
    store.add(cf_id, annotator, label, round, st.session_state.get(f"comment-{cf_id}", ""))
    st.session_state.setdefault("history", []).append(cf_id)
    position = ids.index(cf_id)
    st.session_state["current"] = ids[position + 1] if position + 1 < len(ids) else cf_id
    st.session_state["last"] = f"{cf_id}: {label}"


def _undo(store: FeedbackStore, cf_id: str, annotator: str, round: int) -> None:
    """Undo the last label this session made (or the shown card's) and go back to that card."""
    history = st.session_state.get("history", [])
    target = history.pop() if history else cf_id
    restored = store.undo(target, annotator, round)
    st.session_state["current"] = target
    st.session_state["last"] = f"{target}: undone ({'no label' if restored in (None, 'none') else restored})"


def _move(ids: list[str], cf_id: str, step: int) -> None:
    st.session_state["current"] = ids[min(max(ids.index(cf_id) + step, 0), len(ids) - 1)]


def card(
    row: pd.Series, store: FeedbackStore, annotator: str, round: int, ids: list[str], mine: str | None
) -> None:
    """original | counterfactual | signed change, probabilities, label buttons with keys T / S / U, arrows, Z
    (Streamlit shows each button's key beside its label)."""
    st.markdown(
        f"**{row['source_class']} &rarr; {row['target_class']}** &middot; attempt {row['attempt']} &middot; "
        f"p(target) {float(row.get('p_target_before', float('nan'))):.2f} &rarr; "
        f"{float(row.get('p_target_after', float('nan'))):.2f} &middot; `{row['id']}`"
    )
    big = st.toggle("Enlarge", key="enlarge")
    width = 420 if big else 220
    columns = st.columns(3)
    for column, key, caption in zip(
        columns,
        ("original", "counterfactual", "difference"),
        ("original", "counterfactual", "change (red brighter, blue darker)"),
    ):
        problem = services.image_problem(row[key])
        if problem:  # one line in place of the image; the card can still be judged or skipped
            column.error(problem)
        else:
            column.image(str(row[key]), caption=caption, width=width)
    columns[2].image(colour_bar(), width=width)
    st.caption(f"your label: **{mine or '—'}**")
    st.text_input("Comment (optional)", key=f"comment-{row['id']}")
    buttons = st.columns(6)
    for column, (label, key) in zip(buttons, KEYS.items()):
        column.button(
            label.capitalize(),
            key=f"label-{label}",
            shortcut=key,
            help=HELP[label],
            type="primary" if mine == label else "secondary",
            on_click=_label,
            args=(store, ids, row["id"], annotator, label, round),
        )
    buttons[3].button("Back", key="prev", shortcut="Left", on_click=_move, args=(ids, row["id"], -1))
    buttons[4].button("Next", key="next", shortcut="Right", on_click=_move, args=(ids, row["id"], 1))
    buttons[5].button(
        "Undo", key="undo", shortcut="Z", on_click=_undo, args=(store, row["id"], annotator, round)
    )


def cluster_view(rnd: services.Round, store: FeedbackStore, annotator: str) -> None:
    st.subheader("Clusters of similar changes")
    k = st.slider("Clusters", 2, 12, min(6, max(2, len(rnd.manifest) // 4)), key="k")
    assignment = services.clusters(rnd.manifest, k)
    for cluster in sorted(assignment.unique()):
        ids = assignment.index[assignment == cluster].tolist()
        members = rnd.manifest.set_index("id").loc[ids]
        with st.expander(f"cluster {cluster + 1}: {len(ids)} counterfactuals", expanded=cluster == 0):
            st.image([str(p) for p in members["difference"][:24]], width=64)
            st.image([str(p) for p in members["counterfactual"][:24]], width=64)
            columns = st.columns(3)
            for column, label in zip(columns, KEYS):
                if column.button(f"Label all {label}", key=f"cluster-{cluster}-{label}"):
                    store.add_many(
                        {
                            "cf_id": i,
                            "annotator": annotator,
                            "label": label,
                            "round": rnd.number,
                            "comment": f"cluster {cluster + 1}",
                        }
                        for i in ids
                    )
                    st.success(
                        f"{len(ids)} counterfactuals labelled {label}; override any of them in the card view."
                    )


def agreement_view(store: FeedbackStore, round: int) -> None:
    st.subheader("Agreement")
    labels = store.labels(round)
    if labels.empty:
        st.info("No labels yet in this round.")
        return
    result = services.agreement(labels)
    kappa = result["fleiss_kappa"]
    st.metric("Fleiss' kappa (all annotators)", "—" if kappa is None else f"{kappa:.3f}")
    st.markdown("Cohen's kappa per annotator pair")
    st.dataframe(result["pairs"], hide_index=True)
    st.markdown("Labels per annotator")
    st.dataframe(result["counts"])
    st.markdown("Consensus (majority; ties are unsure)")
    st.dataframe(store.consensus(round), hide_index=True)
    st.download_button(
        "Export all label events (CSV)", store.events().to_csv(index=False), "feedback.csv", "text/csv"
    )
